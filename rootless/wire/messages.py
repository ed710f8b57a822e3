"""Parent/child handshake messages: one tagged union of msgspec Structs, msgpack-encoded.

Framing and the pipes are in `framing.py` (no msgspec there): the payload-free messages
travel as pre-encoded frames and the network driver's message is encoded by hand, so a
run without errors never imports msgspec before its command starts; these Structs are
the schema that both must match (tests/test_messages.py). No trio import: the child
uses this module.
"""
import msgspec

from ..errors import ProtocolError
from .netinfo import FIELDS

PROTOCOL_VERSION = 1


class Message(msgspec.Struct, tag=True, frozen=True):
    pass


class ParentHello(Message):
    version: int = PROTOCOL_VERSION


class ChildHello(Message):
    # The host pid of the process anchoring the namespaces, when it is not the forked
    # child itself (with --pidns: the new namespace's pid 1); 0 = the forked child.
    pid: int = 0
    version: int = PROTOCOL_VERSION


class ParentInitIdmapCompleted(Message):
    pass


class ChildInitUserNSCompleted(Message):
    pass


#: The wire schema of netinfo.NetworkInfo (a plain class, encoded by hand in framing.py):
#: built from its FIELDS, so the two cannot drift apart.
NetworkInfoStruct = msgspec.defstruct("NetworkInfo", FIELDS, frozen=True)


class ParentInitNetworkDriverCompleted(Message):
    network: NetworkInfoStruct | None = None  # None: nothing to configure (host, none)


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

#: Messages whose default instance is sent as a constant frame (see framing.py).
CONSTANT = (ParentHello, ChildHello, ParentInitIdmapCompleted, ChildInitUserNSCompleted,
            ParentInitNetworkDriverCompleted, ParentInitPortDriverCompleted, ChildCommandStarted)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    """The payload of a frame (without the length header)."""
    return _encoder.encode(message)


def decode(payload: bytes) -> Message:
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable handshake message: {exc}") from None
