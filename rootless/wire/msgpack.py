"""The part of msgpack the handshake's data-carrying message needs: None, bool, int,
str, arrays and maps, encoded as msgspec encodes them (the shortest form), so the
frames are the same bytes either way (tests/test_messages.py compares them).

Written out because importing msgspec takes 9-11 ms, on the way to the command in a
start-up of about 30, and one message of a few fields is all that needs encoding.
"""
import struct

from ..errors import ProtocolError

# (type byte, struct format) for each width, narrowest first.
_UINT = ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16), (0xCE, ">I", 1 << 32), (0xCF, ">Q", 1 << 64))
_INT = ((0xD0, ">b", 1 << 7), (0xD1, ">h", 1 << 15), (0xD2, ">i", 1 << 31), (0xD3, ">q", 1 << 63))
_STR = ((0xD9, ">B", 1 << 8), (0xDA, ">H", 1 << 16), (0xDB, ">I", 1 << 32))
_ARRAY = ((0xDC, ">H", 1 << 16), (0xDD, ">I", 1 << 32))
_MAP = ((0xDE, ">H", 1 << 16), (0xDF, ">I", 1 << 32))
# A handshake message nests two deep: far deeper is garbage, which would otherwise
# exhaust the stack (RecursionError) before it ran out of bytes.
_MAX_DEPTH = 64


def _sized(n: int, widths) -> bytes:
    for code, fmt, limit in widths:
        if n < limit:
            return bytes((code,)) + struct.pack(fmt, n)
    raise ValueError(f"{n} is too large for msgpack")


def pack(value) -> bytes:
    if value is None:
        return b"\xc0"
    if value is True or value is False:
        return b"\xc3" if value else b"\xc2"
    if isinstance(value, int):
        if 0 <= value < 128:
            return bytes((value,))
        if -32 <= value < 0:
            return bytes((value & 0xFF,))
        if value >= 0:
            return _sized(value, _UINT)
        for code, fmt, limit in _INT:
            if value >= -limit:
                return bytes((code,)) + struct.pack(fmt, value)
        raise ValueError(f"{value} is too small for msgpack")
    if isinstance(value, str):
        data = value.encode()
        head = bytes((0xA0 | len(data),)) if len(data) < 32 else _sized(len(data), _STR)
        return head + data
    if isinstance(value, (list, tuple)):
        head = bytes((0x90 | len(value),)) if len(value) < 16 else _sized(len(value), _ARRAY)
        return head + b"".join(pack(v) for v in value)
    if isinstance(value, dict):
        head = bytes((0x80 | len(value),)) if len(value) < 16 else _sized(len(value), _MAP)
        return head + b"".join(pack(k) + pack(v) for k, v in value.items())
    raise TypeError(f"cannot encode {type(value).__name__} in a handshake message")


def unpack(data: bytes):
    """The one value `data` holds; ProtocolError if it is anything else."""
    try:
        value, end = _unpack(data, 0)
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable handshake message: {exc}") from None
    if end != len(data):
        raise ProtocolError("undecodable handshake message: bytes after its end")
    return value


_FIXED = {0xC0: None, 0xC2: False, 0xC3: True}
_WIDE = {code: (fmt, kind) for kind, widths in (("int", _UINT), ("int", _INT), ("str", _STR),
                                                ("array", _ARRAY), ("map", _MAP))
         for code, fmt, _ in widths}


def _unpack(data: bytes, at: int, depth: int = 0):
    code = data[at]
    at += 1
    if code < 0x80:
        return code, at
    if code >= 0xE0:
        return code - 0x100, at
    if code in _FIXED:
        return _FIXED[code], at
    if 0xA0 <= code < 0xC0:
        kind, n = "str", code & 0x1F
    elif 0x90 <= code < 0xA0:
        kind, n = "array", code & 0x0F
    elif 0x80 <= code < 0x90:
        kind, n = "map", code & 0x0F
    elif code in _WIDE:
        fmt, kind = _WIDE[code]
        (n,) = struct.unpack_from(fmt, data, at)
        at += struct.calcsize(fmt)
        if kind == "int":
            return n, at
    else:
        raise ProtocolError(f"undecodable handshake message: msgpack type 0x{code:02x}")
    if kind == "str":
        if at + n > len(data):
            raise IndexError("string past the end")
        return data[at:at + n].decode(), at + n
    if depth == _MAX_DEPTH:
        raise ProtocolError(f"undecodable handshake message: nested over {_MAX_DEPTH} deep")
    items = []
    for _ in range(n * (2 if kind == "map" else 1)):
        item, at = _unpack(data, at, depth + 1)
        items.append(item)
    if kind == "array":
        return items, at
    keys = items[::2]
    if not all(isinstance(k, str) for k in keys):
        raise ProtocolError("undecodable handshake message: a map key is not a string")
    return dict(zip(keys, items[1::2])), at
