"""The handshake's framing and messages, without namespaces: constant frames against
msgspec's own encoding, the frame splitter, and the channel over real pipes."""
import os
import struct
import subprocess
import sys

import msgspec
import pytest

from rootless.wire import messages
from rootless.wire import msgpack as _msgpack
from rootless.wire.framing import (CONSTANT_PAYLOADS, MAX_FRAME, Channel, FrameSplitter, classify,
                               frame, network_payload)
from rootless.errors import ProtocolError
from rootless.wire.netinfo import NetworkInfo

NETWORKS = [
    NetworkInfo(),
    NetworkInfo(ifname="tap0", ip="10.0.2.100", netmask=24, gateway="10.0.2.2",
                dns=("10.0.2.3",), mtu=65520, opaque={"api_socket": "/run/user/1001/x.sock"}),
    NetworkInfo(ifname="eth-with-a-long-name", ip="fd00::100", netmask=64, gateway="fd00::2",
                dns=("fd00::3", "10.0.2.3"), mtu=1280, opaque={f"k{i}": "v" * 300 for i in range(20)}),
]


@pytest.mark.parametrize("cls", messages.CONSTANT, ids=lambda c: c.__name__)
def test_constant_payload_is_msgspec_encoding(cls):
    assert CONSTANT_PAYLOADS[cls.__name__] == messages.encode(cls())


def test_constants_cover_exactly_the_constant_messages():
    assert set(CONSTANT_PAYLOADS) == {cls.__name__ for cls in messages.CONSTANT}


@pytest.mark.parametrize("cls", messages.CONSTANT, ids=lambda c: c.__name__)
def test_constant_payload_decodes_to_default(cls):
    assert messages.decode(CONSTANT_PAYLOADS[cls.__name__]) == cls()


def _msgspec_network_payload(info):
    struct = messages.NetworkInfoStruct(**info.to_wire())
    return messages.encode(messages.ParentInitNetworkDriverCompleted(network=struct))


@pytest.mark.parametrize("info", NETWORKS, ids=["defaults", "slirp4netns", "long"])
def test_network_payload_is_msgspec_encoding(info):
    # Encoded by hand so that msgspec stays unimported: the same bytes as msgspec's.
    assert network_payload(info) == _msgspec_network_payload(info)
    name, decoded = classify(_msgspec_network_payload(info))
    assert name == "ParentInitNetworkDriverCompleted" and decoded.network == info
    struct = messages.decode(network_payload(info)).network
    assert NetworkInfo(**msgspec.structs.asdict(struct)) == info


@pytest.mark.parametrize("value", [None, True, False, 0, 127, 128, 65536, 2**32, -1, -33,
                                   -2**31 - 1, "", "é" * 40, "x" * 70000, [1] * 16,
                                   {str(i): [i] for i in range(16)}], ids=repr)
def test_msgpack_subset_matches_msgspec(value):
    assert _msgpack.pack(value) == msgspec.msgpack.encode(value)
    assert _msgpack.unpack(msgspec.msgpack.encode(value)) == value


_GOOD = NetworkInfo().to_wire()


@pytest.mark.parametrize("tail", [
    _msgpack.pack({"ifname": "tap0"}),
    _msgpack.pack(_GOOD | {"netmask": "24"}),
    _msgpack.pack(_GOOD | {"dns": "10.0.2.3"}),
    _msgpack.pack(_GOOD | {"opaque": {"a": 1}}),
    _msgpack.pack(_GOOD | {"extra": ""}),
    _msgpack.pack(_GOOD) + b"\xc0",
    _msgpack.pack(_GOOD)[:-3],
    b"\x81\x01\x01",
], ids=["missing-fields", "netmask-str", "dns-str", "opaque-int", "unknown-field", "trailing",
        "truncated", "int-key"])
def test_malformed_network_payload_is_protocol_error(tail):
    with pytest.raises(ProtocolError):
        classify(CONSTANT_PAYLOADS["ParentInitNetworkDriverCompleted"][:-1] + tail)


def test_the_handshake_imports_no_msgspec():
    # What the parent and the child run on the way to the command, in a fresh interpreter.
    code = ("import os, sys; from rootless.wire.framing import Channel; "
            "from rootless.wire.netinfo import NetworkInfo; r, w = os.pipe(); c = Channel(r, w); "
            "c.send_network(NetworkInfo(ifname='tap0', dns=('10.0.2.3',))); "
            "c.send('ChildCommandStarted'); name, m = c.recv(1); assert m.network.dns; "
            "assert c.recv(1) == ('ChildCommandStarted', None); "
            "print('msgspec' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


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

