"""Frames on the parent/child pipes: a 4-byte big-endian length, then a msgpack payload.

The payload-free handshake messages (each message type's default instance) are kept
here pre-encoded, and the one that carries data on the way to the command (the network
driver's NetworkInfo) is encoded by hand (`msgpack.py`), so a handshake never imports
msgspec (9-11 ms here: half of rootlesskit's whole start-up) unless something fails.
tests/test_messages.py checks both against msgspec's own encoding.
"""
import os
import struct
import time

from .._process import readable
from ..errors import ProtocolError

MAX_FRAME = 1 << 20  # a handshake message is tiny: anything near this is garbage
_HEADER = struct.Struct(">I")

CONSTANT_PAYLOADS: dict[str, bytes] = {
    "ParentHello": b"\x82\xa4type\xabParentHello\xa7version\x01",
    "ChildHello": b"\x83\xa4type\xaaChildHello\xa3pid\x00\xa7version\x01",
    "ParentInitIdmapCompleted": b"\x81\xa4type\xb8ParentInitIdmapCompleted",
    "ChildInitUserNSCompleted": b"\x81\xa4type\xb8ChildInitUserNSCompleted",
    "ParentInitNetworkDriverCompleted":
        b"\x82\xa4type\xd9 ParentInitNetworkDriverCompleted\xa7network\xc0",
    "ParentInitPortDriverCompleted":
        b"\x82\xa4type\xbdParentInitPortDriverCompleted\xa6opaque\x80",
    "ChildCommandStarted": b"\x81\xa4type\xb3ChildCommandStarted",
}
_NAME_OF_PAYLOAD = {payload: name for name, payload in CONSTANT_PAYLOADS.items()}
# The network message with a NetworkInfo: its constant form, but for the value.
_NETWORK = "ParentInitNetworkDriverCompleted"
_NETWORK_PREFIX = CONSTANT_PAYLOADS[_NETWORK][:-1]


class NetworkCompleted:
    """ParentInitNetworkDriverCompleted carrying a NetworkInfo, as decoded by hand."""

    __slots__ = ("network",)

    def __init__(self, network):
        self.network = network


def network_payload(info) -> bytes:
    """The payload of ParentInitNetworkDriverCompleted(network=info)."""
    from .msgpack import pack
    return _NETWORK_PREFIX + pack(info.to_wire())


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


class FrameSplitter:
    """Sans-io: fed bytes, returns the payloads of complete frames."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self._max}-byte limit")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[_HEADER.size:end]))
            del self._buf[:end]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return len(self._buf)


def classify(payload: bytes):
    """(message type name, decoded message or None when it was a constant frame)."""
    name = _NAME_OF_PAYLOAD.get(payload)
    if name is not None:
        return name, None
    if payload.startswith(_NETWORK_PREFIX):
        from .msgpack import unpack
        from .netinfo import NetworkInfo
        return _NETWORK, NetworkCompleted(NetworkInfo.from_wire(
            unpack(payload[len(_NETWORK_PREFIX):])))
    from .messages import decode
    message = decode(payload)
    return type(message).__name__, message


class Channel:
    """Blocking message channel over a pair of pipe fds (both sides of the fork)."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd = rfd
        self.wfd = wfd
        self._splitter = FrameSplitter()
        self._queue: list[bytes] = []

    def send(self, message) -> None:
        """`message`: the name of a payload-free message, or a messages.Message."""
        if isinstance(message, str):
            payload = CONSTANT_PAYLOADS[message]
        else:
            from .messages import encode
            payload = encode(message)
        self._write(payload)

    def send_network(self, info) -> None:
        """ParentInitNetworkDriverCompleted with `info` (a netinfo.NetworkInfo)."""
        self._write(network_payload(info))

    def _write(self, payload: bytes) -> None:
        data = frame(payload)
        while data:
            data = data[os.write(self.wfd, data):]

    def recv(self, timeout: float | None = None):
        """The next (name, message-or-None), or None at EOF; TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._queue:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not readable(self.rfd, left):
                    raise TimeoutError
            data = os.read(self.rfd, 65536)
            if not data:
                if self._splitter.pending:
                    raise ProtocolError("pipe closed in the middle of a frame")
                return None
            self._queue.extend(self._splitter.feed(data))
        return classify(self._queue.pop(0))

    def close_write(self) -> None:
        """Our end of the other side's pipe: it then reads EOF."""
        if self.wfd >= 0:
            os.close(self.wfd)
            self.wfd = -1

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.rfd = self.wfd = -1
