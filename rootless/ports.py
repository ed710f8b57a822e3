"""The port model, as rootlesskit's pkg/port has it: what a published port is (its
spec), what the port drivers list (its status), and how a port request fails. The
drivers and portspec (the spec's text form) use it; the API (rootless.api) serves it
with rootlesskit's JSON field names, converting at its edge (api.models builds its
msgspec schema from FIELDS), and maps the errors to HTTP statuses: the API depends on
the port side, never the reverse.

Plain classes, not msgspec Structs: -p is parsed in the parent before the fork, and
msgspec's import (its _core loads typing, decimal, uuid, datetime: 3.1 MiB shared with
the child, 10-16 ms) would sit on the way to the command; msgspec loads with the API,
at its first client.

A module of its own, outside the drivers' package: portspec needs it and the drivers
need portspec, and a module in the package would tie portspec to the package's
__init__ (the registry).
"""
from .errors import RootlessError

REQUIRED = object()  # in FIELDS: the default of a field that has none


class _Record:
    """A frozen value with keyword-only fields: FIELDS, (name, type, default) in
    rootlesskit's order (its JSON's), a default of REQUIRED for a field that has none.
    Equal to a record of the same class with equal fields, hashed on them."""
    __slots__ = ()
    FIELDS: tuple = ()

    def __init__(self, **values):
        unknown = set(values).difference(name for name, _, _ in self.FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        for name, _, default in self.FIELDS:
            value = values.get(name, default)
            if value is REQUIRED:
                raise TypeError(f"{type(self).__name__} needs {name}")
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    __delattr__ = __setattr__

    def _key(self) -> tuple:
        return tuple(getattr(self, name) for name, _, _ in self.FIELDS)

    def asdict(self) -> dict:
        return {name: getattr(self, name) for name, _, _ in self.FIELDS}

    def replace(self, **changes):
        """A copy with `changes` made to it."""
        return type(self)(**{**self.asdict(), **changes})

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        fields = ", ".join(f"{name}={value!r}" for name, value in self.asdict().items())
        return f"{type(self).__name__}({fields})"


class PortSpec(_Record):
    # Empty optional fields are left out of the JSON, as rootlesskit's Go structs do
    # with omitempty.
    FIELDS = (("proto", str, REQUIRED),
              ("parentIP", str, ""),
              ("parentPort", int, 0),  # rootlessctl omits 0 (Go omitempty): "pick a free port"
              ("childIP", str, ""),
              ("childPort", int, REQUIRED))
    __slots__ = tuple(name for name, _, _ in FIELDS)


class PortStatus(_Record):
    FIELDS = (("id", int, REQUIRED), ("spec", PortSpec, REQUIRED))
    __slots__ = tuple(name for name, _, _ in FIELDS)


# -- how a port request fails (the message names the cause and the fix) -----------------

class PortError(RootlessError):
    """The driver failed to carry out a port request, for no fault of the request."""


class PortRequestInvalid(PortError):
    """The request cannot be done as asked (by this driver, with this protocol or
    address, on this host)."""


class PortNotFound(PortError):
    """No published port has the id asked for."""


class PortConflict(PortError):
    """The port is taken: published already, or in use on the host."""


class PortHelperFailed(PortError):
    """The helper that forwards the ports (slirp4netns) answered what it should not."""


class PortsUnavailable(PortError):
    """Not now: out of resources, the helper unreachable, the run ending. The same
    request may do later."""
