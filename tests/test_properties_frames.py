"""Properties of the handshake's frames (rootless.wire: framing, msgpack, messages,
netinfo): the hand-written msgpack and msgspec agree byte for byte, both ways, on
generated messages; truncated, oversized and garbage frames, read through a real
pipe by the real Channel, give ProtocolError: never a hang (a timeout turns one
into a failure), never another exception."""
import os
import struct
import threading

import msgspec
from hypothesis import example, given, strategies as st

from conftest import examples
from hostile import any_text, garbage_bytes
from rootless.wire import msgpack as _msgpack, messages
from rootless.wire.framing import (CONSTANT_PAYLOADS, MAX_FRAME, Channel, classify, frame,
                               network_payload)
from rootless.errors import ProtocolError
from rootless.wire.netinfo import NetworkInfo

# -- strategies -------------------------------------------------------------------------

# Every width of msgpack's ints, and beyond (which neither encoder may take).
_ints = st.one_of(st.integers(-40, 300), st.integers(-2**63, 2**64 - 1),
                  st.sampled_from([2**7, 2**8, 2**15, 2**16, 2**31, 2**32, 2**63, 2**64 - 1,
                                   -2**5 - 1, -2**7 - 1, -2**15 - 1, -2**31 - 1, -2**63]))
_text = st.one_of(any_text(surrogates=False), st.text(max_size=70000).filter(bool),
                  st.sampled_from(["x" * 31, "x" * 32, "x" * 255, "x" * 256, "é" * 16]))
_values = st.recursive(
    st.one_of(st.none(), st.booleans(), _ints, _text),
    lambda inner: st.one_of(st.lists(inner, max_size=20),
                            st.dictionaries(_text, inner, max_size=20)),
    max_leaves=40)

_strs = any_text(surrogates=False, max_size=40)
network_infos = st.builds(
    NetworkInfo, ifname=_strs, ip=_strs, netmask=_ints, gateway=_strs,
    dns=st.lists(_strs, max_size=20).map(tuple), mtu=_ints,
    opaque=st.dictionaries(_strs, _strs, max_size=20))

# The messages that travel as msgspec's encoding (those with data).
_wire_ints = st.integers(-2**63, 2**64 - 1)
data_messages = st.one_of(
    st.builds(messages.ChildFailed, message=_strs, exit_code=_wire_ints),
    st.builds(messages.ChildHello, pid=_wire_ints, version=_wire_ints),
    st.builds(messages.ParentHello, version=_wire_ints),
    st.builds(messages.ParentInitPortDriverCompleted,
              opaque=st.dictionaries(_strs, _strs, max_size=5)))

_NETWORK_PREFIX = CONSTANT_PAYLOADS["ParentInitNetworkDriverCompleted"][:-1]
_good_frames = st.one_of(st.sampled_from(list(CONSTANT_PAYLOADS.values())),
                         network_infos.map(network_payload),
                         data_messages.map(messages.encode)).map(frame)


@st.composite
def _hostile_payload(draw):
    """What a broken or hostile peer may put in a frame: msgspec's bytes cut or
    changed, the network message's prefix before garbage, nesting deeper than any
    message, lengths that promise more than there is, or anything at all."""
    kind = draw(st.sampled_from(["garbage", "cut", "flip", "network", "deep", "promise"]))
    if kind == "garbage":
        return draw(garbage_bytes())
    good = draw(_good_frames)[4:]
    if kind == "cut":
        return good[:draw(st.integers(0, max(0, len(good) - 1)))]
    if kind == "flip":
        at = draw(st.integers(0, len(good) - 1)) if good else 0
        return good[:at] + bytes([draw(st.integers(0, 255))]) + good[at + 1:]
    if kind == "network":
        return _NETWORK_PREFIX + draw(st.one_of(garbage_bytes(), _values.map(_msgpack.pack)))
    if kind == "deep":
        depth = draw(st.integers(1, 100_000))
        return _NETWORK_PREFIX + draw(st.sampled_from([b"\x91", b"\x81\xa1k"])) * depth + b"\xc0"
    code = draw(st.sampled_from([0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF]))
    width = {0xD9: 1, 0xDA: 2, 0xDC: 2, 0xDE: 2}.get(code, 4)
    return _NETWORK_PREFIX + bytes([code]) + b"\xff" * width + draw(garbage_bytes(20))


_hostile_frames = st.one_of(
    _hostile_payload().map(frame),
    _good_frames.flatmap(lambda f: st.integers(1, len(f) - 1).map(lambda n: f[:n])),
    st.integers(MAX_FRAME + 1, 2**32 - 1).map(lambda n: struct.pack(">I", n)),
    garbage_bytes())
streams = st.lists(st.one_of(_good_frames, _hostile_frames), min_size=1, max_size=6).map(
    b"".join)


# -- encoding: the hand-written msgpack and msgspec ---------------------------------------

def same(a, b) -> bool:
    """Equal, and of the same types all the way down (True is not 1 here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def encoded(encode, value):
    """The bytes, or None when the encoder refuses the value."""
    try:
        return encode(value)
    except (ValueError, TypeError, OverflowError, UnicodeEncodeError):
        return None


@examples(500)
@given(st.one_of(_values, any_text(), st.integers(-2**70, 2**70)))
@example("\udcff")
@example(2**64)
@example(-2**63 - 1)
def test_msgpack_subset_is_msgspecs_encoding_both_ways(value):
    ours = encoded(_msgpack.pack, value)
    theirs = encoded(msgspec.msgpack.encode, value)
    assert ours == theirs  # the same bytes, or both refuse (out of range, surrogates)
    if ours is not None:
        assert same(_msgpack.unpack(theirs), value)
        assert same(msgspec.msgpack.decode(ours), value)


@examples(500)
@given(network_infos)
def test_network_message_is_msgspecs_both_ways(info):
    ours = encoded(network_payload, info)
    struct = encoded(lambda i: messages.NetworkInfoStruct(**i.to_wire()), info)
    theirs = struct and encoded(messages.encode,
                                messages.ParentInitNetworkDriverCompleted(network=struct))
    assert ours == theirs
    if ours is None:
        return
    name, decoded = classify(theirs)
    assert name == "ParentInitNetworkDriverCompleted" and decoded.network == info
    decoded = messages.decode(ours).network
    assert NetworkInfo(**msgspec.structs.asdict(decoded)) == info


@examples(300)
@given(st.lists(st.one_of(data_messages, network_infos), max_size=5))
def test_channel_carries_generated_messages(sent):
    """Through a real pipe, each message arrives as sent."""
    r, w = os.pipe()
    sender, receiver = Channel(-1, w), Channel(r, -1)
    try:
        got = []

        def send():
            for message in sent:
                if isinstance(message, NetworkInfo):
                    sender.send_network(message)
                else:
                    sender.send(message)
            sender.close_write()
        writer = threading.Thread(target=send)
        writer.start()
        while (received := receiver.recv(timeout=10)) is not None:
            got.append(received)
        writer.join()
    finally:
        sender.close()
        receiver.close()
    assert [arrived(received) for received in got] == [expected(m) for m in sent]


def expected(message):
    """What a Channel returns for a message sent: None for the default instance of a
    payload-free type (it travels as the constant frame)."""
    if isinstance(message, NetworkInfo):
        return message
    return None if messages.encode(message) in CONSTANT_PAYLOADS.values() else message


def arrived(received):
    name, message = received
    return message.network if name == "ParentInitNetworkDriverCompleted" else message


# -- decoding what a broken peer sends ----------------------------------------------------

def read_all(data: bytes, timeout: float = 10) -> list:
    """Send `data` down a real pipe and close it; read with a Channel until EOF:
    the messages, then None or the exception that ended the reading. A read that
    does not end within `timeout` fails (TimeoutError is not caught)."""
    r, w = os.pipe()
    channel = Channel(r, -1)

    def write():
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        except BrokenPipeError:
            pass  # the reader gave up first
        finally:
            os.close(w)
    writer = threading.Thread(target=write)
    writer.start()
    out = []
    try:
        while True:
            try:
                received = channel.recv(timeout=timeout)
            except ProtocolError as exc:
                out.append(exc)
                return out
            out.append(received)
            if received is None:
                return out
    finally:
        channel.close()  # a writer still writing then gets EPIPE
        writer.join()


@examples(500)
@given(streams)
@example(frame(_NETWORK_PREFIX + b"\x91" * 100_000 + b"\xc0"))
@example(frame(_NETWORK_PREFIX + b"\x81\xa1k" * 5000 + b"\xc0"))
def test_garbage_frames_are_protocol_errors_never_a_hang(data):
    got = read_all(data)
    for received in got[:-1]:
        name, _ = received
        assert name in CONSTANT_PAYLOADS or name == "ChildFailed", name
    end = got[-1]
    assert end is None or isinstance(end, ProtocolError)
    if isinstance(end, ProtocolError):
        assert "\n" not in str(end)
