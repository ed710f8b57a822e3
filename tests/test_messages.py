"""The handshake's framing and messages, without namespaces: constant frames against
msgspec's own encoding, the frame splitter, and the channel over real pipes."""
import os
import struct

import pytest

from rootless import messages
from rootless._framing import CONSTANT_PAYLOADS, MAX_FRAME, Channel, FrameSplitter, classify, frame
from rootless.errors import ProtocolError


@pytest.mark.parametrize("cls", messages.CONSTANT, ids=lambda c: c.__name__)
def test_constant_payload_is_msgspec_encoding(cls):
    assert CONSTANT_PAYLOADS[cls.__name__] == messages.encode(cls())


def test_constants_cover_exactly_the_constant_messages():
    assert set(CONSTANT_PAYLOADS) == {cls.__name__ for cls in messages.CONSTANT}


@pytest.mark.parametrize("cls", messages.CONSTANT, ids=lambda c: c.__name__)
def test_constant_payload_decodes_to_default(cls):
    assert messages.decode(CONSTANT_PAYLOADS[cls.__name__]) == cls()


def test_splitter_one_byte_at_a_time():
    payloads = [CONSTANT_PAYLOADS["ParentHello"], b"", b"x" * 300]
    data = b"".join(frame(p) for p in payloads)
    splitter = FrameSplitter()
    out = []
    for i in range(len(data)):
        out += splitter.feed(data[i:i + 1])
    assert out == payloads
    assert splitter.pending == 0


def test_splitter_several_frames_in_one_chunk():
    payloads = [CONSTANT_PAYLOADS[name] for name in CONSTANT_PAYLOADS]
    data = b"".join(frame(p) for p in payloads)
    splitter = FrameSplitter()
    tail = frame(b"partial")[:-3]
    assert splitter.feed(data + tail) == payloads
    assert splitter.pending == len(tail)
    assert splitter.feed(b"ial") == [b"partial"]


def test_splitter_rejects_oversized_header():
    splitter = FrameSplitter()
    with pytest.raises(ProtocolError, match="exceeds"):
        splitter.feed(struct.pack(">I", MAX_FRAME + 1))  # the header alone is enough


def test_splitter_accepts_frame_at_limit():
    splitter = FrameSplitter(max_frame=16)
    assert splitter.feed(frame(b"a" * 16)) == [b"a" * 16]
    with pytest.raises(ProtocolError):
        splitter.feed(frame(b"a" * 17))


@pytest.mark.parametrize("payload", [b"\xc1", b"\x81\xa4type\xa4Nope", b"not msgpack at all"],
                         ids=["reserved-byte", "unknown-type", "text"])
def test_classify_garbage_is_protocol_error(payload):
    with pytest.raises(ProtocolError):
        classify(payload)


def test_classify_constant_needs_no_decoding():
    assert classify(CONSTANT_PAYLOADS["ChildCommandStarted"]) == ("ChildCommandStarted", None)


@pytest.fixture
def pipe_pair():
    """Two Channels joined by two real pipes: (a, b); a sends to b and back."""
    a_to_b = os.pipe()
    b_to_a = os.pipe()
    a = Channel(b_to_a[0], a_to_b[1])
    b = Channel(a_to_b[0], b_to_a[1])
    yield a, b
    a.close()
    b.close()


def test_channel_round_trip_constant(pipe_pair):
    a, b = pipe_pair
    a.send("ParentHello")
    assert b.recv(timeout=5) == ("ParentHello", None)


def test_channel_round_trip_data_message(pipe_pair):
    a, b = pipe_pair
    sent = messages.ChildFailed(message="cannot mount /proc: denied", exit_code=3)
    b.send(sent)
    b.send("ChildInitUserNSCompleted")
    name, received = a.recv(timeout=5)
    assert (name, received) == ("ChildFailed", sent)
    assert a.recv(timeout=5) == ("ChildInitUserNSCompleted", None)


def test_channel_round_trip_non_default_constant_type(pipe_pair):
    # A constant type carrying data is not the constant frame: it must arrive decoded.
    a, b = pipe_pair
    a.send(messages.ChildHello(pid=4242))
    name, received = b.recv(timeout=5)
    assert name == "ChildHello" and received.pid == 4242


def test_channel_eof_mid_frame(pipe_pair):
    a, b = pipe_pair
    os.write(a.wfd, frame(CONSTANT_PAYLOADS["ParentHello"])[:5])
    os.close(a.wfd)
    a.wfd = -1
    with pytest.raises(ProtocolError, match="middle of a frame"):
        b.recv(timeout=5)


def test_channel_eof_at_boundary(pipe_pair):
    a, b = pipe_pair
    a.send("ParentHello")
    os.close(a.wfd)
    a.wfd = -1
    assert b.recv(timeout=5) == ("ParentHello", None)
    assert b.recv(timeout=5) is None


def test_channel_timeout(pipe_pair):
    _, b = pipe_pair
    with pytest.raises(TimeoutError):
        b.recv(timeout=0.05)

