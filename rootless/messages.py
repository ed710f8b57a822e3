"""Parent/child handshake messages and their framing.

A frame is a 4-byte big-endian length followed by a msgpack-encoded message from the
tagged union below. `FrameDecoder` is sans-io: it is fed bytes and returns whole
messages, so the blocking reader here and an async reader share one decoder.
No trio import: the child uses this module before its namespaces exist.
"""
import os
import select
import struct
import time

import msgspec

from .errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # a handshake message is tiny; anything near this is garbage
_HEADER = struct.Struct(">I")


class Message(msgspec.Struct, tag=True, frozen=True):
    pass


class ParentHello(Message):
    version: int = PROTOCOL_VERSION


class ChildHello(Message):
    pid: int  # the child's pid as seen from the parent: the namespaces' anchor
    version: int = PROTOCOL_VERSION


class ParentInitIdmapCompleted(Message):
    pass


class ChildInitUserNSCompleted(Message):
    pass


class NetworkInfo(msgspec.Struct, frozen=True):
    """What the network driver tells the child about its interface (issue: net drivers)."""

    driver: str
    ifname: str = ""
    ip: str = ""
    netmask: int = 0
    gateway: str = ""
    dns: tuple[str, ...] = ()
    mtu: int = 0
    opaque: dict[str, str] = {}


class ParentInitNetworkDriverCompleted(Message):
    network: NetworkInfo


class ParentInitPortDriverCompleted(Message):
    opaque: dict[str, str] = {}


class ChildCommandStarted(Message):
    pass


class ChildFailed(Message):
    """The child could not finish set-up or start the command; `message` is for the user."""

    message: str
    exit_code: int = 1


AnyMessage = (ParentHello | ChildHello | ParentInitIdmapCompleted | ChildInitUserNSCompleted
              | ParentInitNetworkDriverCompleted | ParentInitPortDriverCompleted
              | ChildCommandStarted | ChildFailed)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Accumulates bytes and yields complete messages; raises ProtocolError on garbage."""

    def __init__(self, max_frame: int = MAX_FRAME):
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self._max}-byte limit")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[_HEADER.size:end])
            del self._buf[:end]
            try:
                out.append(_decoder.decode(payload))
            except msgspec.DecodeError as exc:
                raise ProtocolError(f"undecodable handshake message: {exc}") from None
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return len(self._buf)


class Channel:
    """Blocking message channel over a pair of pipe fds (used by both sides of the fork)."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd = rfd
        self.wfd = wfd
        self._decoder = FrameDecoder()
        self._queue: list[Message] = []

    def send(self, message: Message) -> None:
        data = encode(message)
        while data:
            data = data[os.write(self.wfd, data):]

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message, or None at EOF. Raises TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._queue:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                    raise TimeoutError
            data = os.read(self.rfd, 65536)
            if not data:
                if self._decoder.pending:
                    raise ProtocolError("pipe closed in the middle of a frame")
                return None
            self._queue.extend(self._decoder.feed(data))
        return self._queue.pop(0)

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass
