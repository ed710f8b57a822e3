"""The port model, as rootlesskit's pkg/port has it: what a published port is (its
spec), what the port drivers list (its status), and how a port request fails. The
drivers and portspec (the spec's text form) use it; the API (rootless.api) serves it
as it is, with rootlesskit's JSON field names, and maps the errors to HTTP statuses:
the API depends on the port side, never the reverse.

A module of its own, outside the drivers' package: portspec needs it and the drivers
need portspec, and a module in the package would tie portspec to the package's
__init__ (the registry). Imported only where ports are handled (the service thread,
-p parsing, rootless-ctl): msgspec stays off the path of a run without ports.
"""
import msgspec

from .errors import RootlessError


class PortSpec(msgspec.Struct, omit_defaults=True, frozen=True, kw_only=True):
    # kw_only: fields in rootlesskit's order, optional ones among them. Empty optional
    # fields are omitted, as rootlesskit's Go structs do with omitempty.
    proto: str
    parentIP: str = ""
    parentPort: int = 0  # rootlessctl omits 0 (Go omitempty): "pick a free port"
    childIP: str = ""
    childPort: int


class PortStatus(msgspec.Struct, omit_defaults=True):
    id: int
    spec: PortSpec


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
