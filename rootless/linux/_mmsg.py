"""recvmmsg(2) and sendmmsg(2), which Python lacks: many datagrams a system call.

A `Datagrams` holds `count` slots, each a buffer for one datagram and room for its
sender's address (and, optionally, for the address it was sent to: the PKTINFO the
socket is asked for). recv() fills the first n slots from one socket; send() passes
a run of them on to a connected socket, as they came. The kernel structures are built
once: a batch costs two ctypes calls and a few slices, not a Python call per datagram.
"""
import ctypes
import mmap
import struct
import sys
# The C modules, not socket.py and array: those load enum and collections (1.2 MiB
# for the parent, where the UDP ports run without them).
import _socket as socket

from ._libc import _check, _libc


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _msghdr), ("msg_len", ctypes.c_uint)]


_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                      ctypes.c_void_p]
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]

# Where msg_len and iov_len sit, counted in the words memoryviews read them as.
_HDR_WORDS = ctypes.sizeof(_mmsghdr) // 4
_LEN_WORD = _mmsghdr.msg_len.offset // 4
_IOV_WORDS = ctypes.sizeof(_iovec) // 8
_IOV_LEN_WORD = _iovec.iov_len.offset // 8

_NAME_SIZE = {socket.AF_INET: 16, socket.AF_INET6: 28}  # sockaddr_in, sockaddr_in6
_CONTROL = 64     # room for one cmsg of in_pktinfo or in6_pktinfo, and to spare
_CMSG_LEVEL = ctypes.sizeof(ctypes.c_size_t)  # struct cmsghdr {size_t len; int level, type}
_CMSG_DATA = _CMSG_LEVEL + 8
# (level, type) of the PKTINFO a socket of the family receives, and where in it the
# packet's destination address is: in_pktinfo.ipi_addr, in6_pktinfo.ipi6_addr.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # linux/in.h; Python 3.11 lacks it
PKTINFO = {socket.AF_INET: (socket.IPPROTO_IP, IP_PKTINFO, 8, 4),
           socket.AF_INET6: (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, 0, 16)}


class Datagrams:
    def __init__(self, count: int, size: int, family: int, pktinfo: bool = False):
        self.count, self.namelen = count, _NAME_SIZE[family]
        self.family = family
        # Anonymous memory, so that only the pages datagrams have used are resident
        # (64 KiB slots for datagrams of 1.4 KB: 4 KiB each, not 64).
        self._data = mmap.mmap(-1, count * size)
        self._names = ctypes.create_string_buffer(count * self.namelen)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._data))
        names = ctypes.addressof(self._names)
        control = _CONTROL if pktinfo else 0
        self._control = ctypes.create_string_buffer(count * control or 1)
        controls = ctypes.addressof(self._control)
        # Receiving: every slot its whole buffer, its name and its control buffer.
        self._riov = (_iovec * count)(*[_iovec(base + i * size, size) for i in range(count)])
        self._rhdr = (_mmsghdr * count)(*[
            _mmsghdr(_msghdr(names + i * self.namelen, self.namelen,
                             ctypes.addressof(self._riov[i]), 1,
                             controls + i * control if control else None, control, 0), 0)
            for i in range(count)])
        # recvmmsg overwrites msg_namelen and msg_len: restored from this before each call.
        self._pristine = bytes(self._rhdr)
        # Sending: the same buffers, as long as what was received; no name (connected).
        self._siov = (_iovec * count)(*[_iovec(base + i * size, 0) for i in range(count)])
        self._shdr = (_mmsghdr * count)(*[
            _mmsghdr(_msghdr(None, 0, ctypes.addressof(self._siov[i]), 1, None, 0, 0), 0)
            for i in range(count)])
        self._lens = memoryview(self._rhdr).cast("B").cast("I")
        self._send_lens = memoryview(self._siov).cast("B").cast("Q")
        self._name_view = memoryview(self._names).cast("B")

    def recv(self, fd: int) -> int:
        """Read what is queued on `fd`, up to `count` datagrams, without waiting
        (BlockingIOError when nothing is); they are then ready to send()."""
        ctypes.memmove(self._rhdr, self._pristine, len(self._pristine))
        n = _recvmmsg(fd, self._rhdr, self.count, socket.MSG_DONTWAIT, None)
        _check(n, "recvmmsg")
        lens = self._lens[_LEN_WORD:_LEN_WORD + n * _HDR_WORDS:_HDR_WORDS]
        self._send_lens[_IOV_LEN_WORD:_IOV_LEN_WORD + n * _IOV_WORDS:_IOV_WORDS] = \
            memoryview(struct.pack(f"{n}Q", *lens)).cast("Q")
        return n

    def sender(self, i: int) -> bytes:
        """Slot i's sender, as the kernel's sockaddr (a dict key; see address())."""
        return self._name_view[i * self.namelen:(i + 1) * self.namelen].tobytes()

    def destination(self, i: int) -> bytes | None:
        """The address slot i was sent to (4 or 16 bytes, as in the packet), when the
        socket gives PKTINFO (Datagrams(pktinfo=True), and the socket option set)."""
        hdr = self._rhdr[i].msg_hdr
        if hdr.msg_controllen < _CMSG_DATA:
            return None
        level, kind, offset, length = PKTINFO[self.family]
        at = i * _CONTROL
        if struct.unpack_from("=ii", self._control, at + _CMSG_LEVEL) != (level, kind):
            return None
        start = at + _CMSG_DATA + offset
        return self._control[start:start + length]

    def send(self, fd: int, start: int, end: int) -> int:
        """Send slots start..end-1 on the connected socket `fd`, without waiting:
        how many went (at least one), or OSError for the first."""
        sent = _sendmmsg(fd, ctypes.addressof(self._shdr) + start * ctypes.sizeof(_mmsghdr),
                         end - start, socket.MSG_DONTWAIT)
        _check(sent, "sendmmsg")
        return sent


def address(sockaddr: bytes) -> tuple:
    """A sockaddr as Python's socket module gives addresses: (host, port[, flow, scope])."""
    port = int.from_bytes(sockaddr[2:4], "big")
    if len(sockaddr) == _NAME_SIZE[socket.AF_INET]:
        return socket.inet_ntop(socket.AF_INET, sockaddr[4:8]), port
    return (socket.inet_ntop(socket.AF_INET6, sockaddr[8:24]), port,
            int.from_bytes(sockaddr[4:8], "big"), int.from_bytes(sockaddr[24:28], sys.byteorder))

