"""What a network driver tells the child to configure on its interface.

A plain class, not a msgspec Struct: it is the payload of the handshake's one message
that carries data, which `framing.py` encodes by hand so that msgspec's import stays off
the way to the command. `messages` builds the same message's msgspec schema from
FIELDS, and tests/test_messages.py checks that both give the same bytes.
"""
from ..errors import ProtocolError

#: (name, type, default), in wire order.
FIELDS = (("ifname", str, ""), ("ip", str, ""), ("netmask", int, 0), ("gateway", str, ""),
          ("dns", tuple[str, ...], ()), ("mtu", int, 0), ("opaque", dict[str, str], {}))
_NAMES = tuple(name for name, _, _ in FIELDS)


class NetworkInfo:
    __slots__ = _NAMES

    def __init__(self, **values):
        unknown = set(values) - set(_NAMES)
        if unknown:
            raise TypeError(f"NetworkInfo has no field {', '.join(sorted(unknown))}")
        for name, _, default in FIELDS:
            value = values.get(name, default)
            # Own copies, so that the caller's list or dict cannot change it later.
            if name in ("dns", "opaque"):
                value = (tuple if name == "dns" else dict)(value)
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("NetworkInfo is immutable")

    def __eq__(self, other):
        return isinstance(other, NetworkInfo) and self.to_wire() == other.to_wire()

    def __repr__(self):
        return "NetworkInfo(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in _NAMES) + ")"

    def to_wire(self) -> dict:
        return {name: list(self.dns) if name == "dns" else getattr(self, name)
                for name in _NAMES}

    @classmethod
    def from_wire(cls, fields) -> "NetworkInfo":
        """From a decoded map; ProtocolError for a field missing or of the wrong type."""
        if not isinstance(fields, dict) or set(fields) != set(_NAMES):
            raise ProtocolError(f"malformed network info: {fields!r:.200}")
        for name, kind, _ in FIELDS:
            value = fields[name]
            if kind is str or kind is int:
                ok = type(value) is kind
            elif name == "dns":
                ok = isinstance(value, list) and all(type(v) is str for v in value)
            else:
                ok = isinstance(value, dict) and all(type(v) is str for v in value.values())
            if not ok:
                raise ProtocolError(f"malformed network info: {name}={value!r:.100}")
        return cls(**fields)
