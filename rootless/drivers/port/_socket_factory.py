"""A thread of the child, in the child's network namespace, that makes unconnected
sockets for the parent and passes them over a unix socket (SCM_RIGHTS); and the
parent's client of it.

A socket belongs to the netns it was created in: the parent connects such a socket
itself, and the connection is made inside the child's namespace. The parent asks in
batches, so a connection through a published port costs no round trip to the child.
The factory also does, in the netns, what the client's source address needs there
(`_transparent`): the routing at the first connection, a rule per published UDP port.

Protocol, on a socket pair the parent makes before it forks the child (the parent
holds one end from before the command starts to the end of the run, and watches it:
the factory's death is the run's end). Requests of 5 bytes (op, family '4'/'6',
count, port: "!ccBH"):
  op b"h": hello -> whether the child can see clients' addresses: b"T\\n", or
           b"N" + why + b"\\n" (the parent's first request);
  op b"s"/b"d": `count` stream/datagram sockets -> count bytes + up to count fds
                (fewer when the factory is out of fds: the bytes say where the
                answer ends, whatever fds came);
  op b"R"/b"r": add/remove the UDP rule of `port`  -> b"+" or b"-" + why + b"\\n".
The factory ends when the parent's end closes.
"""
import errno
import os
import struct
# The C modules, not socket.py and signal.py: those load enum (1 MiB), which neither
# the child nor the parent's ports need.
import _signal
import _socket as socket

# Loaded with this module, before the fork: the factory may run with no fd to spare
# for an import (its RLIMIT_NOFILE lowered under it), and must still answer.
from . import _transparent

_REQUEST = struct.Struct("!ccBH")
_FAMILIES = {b"4": socket.AF_INET, b"6": socket.AF_INET6}
_TYPES = {b"s": socket.SOCK_STREAM, b"d": socket.SOCK_DGRAM}
_BATCH = 64  # sockets a request brings (SCM_RIGHTS passes at most 253)
# ... but the first of a kind: the first client waits for it, and 64 sockets made and
# passed took 0.3-1 ms of that wait.
_FIRST_BATCH = 8
_IN = 0x001  # EPOLLIN (select's constant is the same; select is not loaded in the child)


# -- child side ---------------------------------------------------------------------------

def start(conn: socket.socket, netns: str | None, transparent: bool) -> None:
    """Serve `conn` (the child's end of the parent's socket pair) from a thread of the
    child, until the parent's end closes or the child exits. Called once the command
    runs: the command is forked from a process with one thread.

    A thread, not a process of its own: a third Python process cost 1.3 MiB of PSS
    and 12 MiB of RSS (docs/memory.md). Its death closes `conn`, which hangs the
    parent's end up, as the child's does."""
    from ... import _threads
    from ..._listen import grow_fd_table

    grow_fd_table(conn.fileno())  # now, while the child has one thread (see there)
    # Every signal blocked: the kernel gives a process' signal to any thread that does
    # not block it, and only the main thread runs the handlers (forwarding, the kill
    # of the command's tree); taken here, one would wait until the main thread wakes.
    mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    try:
        _threads.start(_run, (conn, netns, transparent), "the socket factory's thread")
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)


def _run(conn: socket.socket, netns: str | None, transparent: bool) -> None:
    try:
        if netns:  # the detached netns: this thread's alone (CLONE_NEWNET is per thread)
            from ...linux import CLONE_NEWNET, setns

            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd, CLONE_NEWNET)
            finally:
                os.close(fd)
        _serve(conn, transparent)
    except BaseException as exc:  # noqa: B902 - the parent says the factory died
        from ... import _log

        _log.debug(f"socket factory: {type(exc).__name__}: {exc}")
    finally:
        conn.close()


def _hello(transparent: bool) -> bytes:
    """What the factory says on connect; sets up the routing for clients' addresses
    first, when asked to. Not before the parent's first connection, which comes with
    the first client of a port: a run that publishes nothing leaves the netns' routing
    as the command found it."""
    if not transparent:
        return b"Noff\n"
    why = _failure(_transparent.set_up_routing)
    if why:
        from ... import _log

        _log.warning(f"the child will see connections through published ports come from "
                     f"its own address, not the client's: {why}")
        return f"N{why}\n".encode()
    return b"T\n"


def _failure(function, *args) -> str:
    """Run `function` (a few netlink requests: see rootless.netlink); returns "" or why
    it failed. The factory cannot die of it: out of fds or memory, this request fails
    alone (its answer says why), and the factory serves the next one. Out of fds, it
    tries once more with the soft limit raised to the hard one (it may have been
    lowered under us)."""
    for attempt in (1, 2):
        try:
            function(*args)
            return ""
        except OSError as exc:
            if attempt == 1 and exc.errno == errno.EMFILE:
                from ...linux import raise_fd_limit

                raise_fd_limit()
                continue
            return exc.strerror or str(exc) or "failed"


def _serve(conn: socket.socket, transparent: bool) -> None:
    hello = None
    while True:
        request = _recv_exactly(conn, _REQUEST.size)
        if request is None:
            return  # the parent is gone
        op, family, count, port = _REQUEST.unpack(request)
        if op == b"h":
            if hello is None:
                hello = _hello(transparent)
            conn.sendall(hello)
        elif not _answer(conn, op, family, count, port):
            return


def _answer(conn: socket.socket, op: bytes, family: bytes, count: int, port: int) -> bool:
    if op in _TYPES and family in _FAMILIES and count:
        socks = _make_sockets(_FAMILIES[family], _TYPES[op], count)
        _send_fds(conn, b"s" * count, [s.fileno() for s in socks])
        for s in socks:
            s.close()
        return True
    if op in (b"R", b"r"):
        why = _failure(_transparent.udp_rule, "add" if op == b"R" else "del", port)
        conn.sendall(f"-{why}\n".encode() if why else b"+")
        return True
    return False


def _make_sockets(family: int, kind: int, count: int) -> list[socket.socket]:
    """Up to `count` sockets: as many as can be made now (out of fds or memory, the
    parent gets fewer, maybe none, and that client's connection fails alone)."""
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.socket(family, kind))
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            for s in socks:
                s.close()
            raise
    return socks


def _send_fds(conn: socket.socket, data: bytes, fds: list[int]) -> None:
    """socket.send_fds, on the C module's socket (and with struct, not array: array
    loads collections, 2 ms of the first client's wait in the child)."""
    conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           struct.pack(f"{len(fds)}i", *fds))] if fds else [])


def _recv_fds(conn: socket.socket, size: int, most: int) -> tuple[bytes, list[int], int]:
    """socket.recv_fds, on the C module's socket: (data, fds, flags)."""
    data, ancillary, flags, _ = conn.recvmsg(size, socket.CMSG_LEN(most * 4))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]))
    return data, fds, flags


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# -- parent side (on the ports' loop, `_loop`) ------------------------------------------

class FactoryGone(Exception):
    """The child's socket factory closed the connection: the child is gone."""

    def __init__(self, message: str = "the child's socket factory is gone"):
        super().__init__(message)


# Our end of the pair says the factory died (EOF aside): as it exited with data unread
# (a reset), or before we could send (EPIPE).
_GONE = (BrokenPipeError, ConnectionResetError)


class Factory:
    """The parent's connection to the factory, on the ports' loop. Requests go one at a
    time, in order; sockets come from pools refilled a batch at a time. Answers come
    through callbacks: `answer(result, error)`, exactly once each."""

    def __init__(self, loop, sock: socket.socket):
        self._loop, self._sock = loop, sock  # the parent's end of the pair (see start())
        self._pools: dict[tuple[bytes, bytes], list[int]] = {}
        self._refills: set[tuple[bytes, bytes]] = set()  # the kinds asked for once
        self._waiting: dict[tuple[bytes, bytes], list] = {}  # callbacks for a socket
        self._requests: list = []  # _Request: the first one is sent, and being answered
        self._after_hello: list | None = []  # None once the hello is answered
        self.transparent = False
        self.gone = False

    def watch(self) -> None:
        """Watch for the factory's answers (OSError if epoll cannot take the socket)."""
        self._sock.setblocking(False)
        self._loop.watch(self._sock.fileno(), _IN, self)

    def hello(self) -> None:
        """On the loop: say hello (the factory then sets up the routing for clients'
        addresses), the first request of all."""
        self._request(_Request(_REQUEST.pack(b"h", b"4", 0, 0), self._hello))

    def after_hello(self, function) -> None:
        """Call `function()` once `transparent` is known (at once if it is)."""
        if self._after_hello is None:
            function()
        else:
            self._after_hello.append(function)

    def _hello(self, line, error) -> None:
        from ... import _log

        self.transparent = line == "T"
        _log.debug(f"socket factory: connected (clients' addresses "
                   f"{'seen' if self.transparent else 'not seen'} in the child)")
        waiting, self._after_hello = self._after_hello, None
        for function in waiting:
            function()

    def socket(self, family: int, kind: int, answer) -> None:
        """A new, unbound socket of the child's netns (the C module's, blocking), or
        OSError when none can be had now (out of fds, here or in the factory), or
        FactoryGone."""
        key = (b"s" if kind == socket.SOCK_STREAM else b"d",
               b"4" if family == socket.AF_INET else b"6")
        pool = self._pools.setdefault(key, [])
        if pool:
            answer(socket.socket(family, kind, 0, pool.pop()), None)
            return
        if self.gone:
            answer(None, FactoryGone())
            return
        waiting = self._waiting.setdefault(key, [])
        waiting.append(answer)
        if len(waiting) == 1:  # else a refill is asked for already
            self._refill(key, _BATCH if key in self._refills else _FIRST_BATCH)

    def _refill(self, key, count: int) -> None:
        self._refills.add(key)
        self._request(_Request(_REQUEST.pack(*key, count, 0),
                               lambda fds, error: self._refilled(key, fds, error),
                               fds=count))

    def _refilled(self, key, fds, error) -> None:
        family = socket.AF_INET if key[1] == b"4" else socket.AF_INET6
        kind = socket.SOCK_STREAM if key[0] == b"s" else socket.SOCK_DGRAM
        pool, waiting = self._pools[key], self._waiting.pop(key, [])
        if fds:
            pool.extend(fds)
        while waiting and pool:
            waiting.pop(0)(socket.socket(family, kind, 0, pool.pop()), None)
        if waiting and fds:  # more clients came than a batch serves: another batch
            self._waiting[key] = waiting
            self._refill(key, _BATCH)
            return
        for answer in waiting:  # none came: these clients fail alone
            answer(None, error or OSError(errno.EMFILE, "out of file descriptors"))

    def udp_rule(self, add: bool, port: int, answer) -> None:
        """Route the child's answers from UDP `port` back to transparent sockets:
        answer(None, None), or an OSError with the factory's reason."""
        def done(line, error):
            if error is None and line != "+":
                error = OSError(line[1:])
            answer(None, error)
        self._request(_Request(_REQUEST.pack(b"R" if add else b"r", b"4", 0, port), done,
                               first_only=True))

    def close(self) -> None:
        """On the loop's thread, at its end: whoever waits gets FactoryGone."""
        if not self.gone:
            self._loop.watch(self._sock.fileno(), 0, self)
        self._fail_all()
        for pool in self._pools.values():
            for fd in pool:
                os.close(fd)
        self._pools.clear()

    # -- the loop's side --

    def _request(self, request) -> None:
        if self.gone:
            request.answer(None, FactoryGone())
            return
        self._requests.append(request)
        if len(self._requests) == 1:
            self._send()

    def _send(self) -> None:
        """A request is 5 bytes, in a socket buffer that is empty between requests:
        sent whole or not at all."""
        try:
            self._sock.send(self._requests[0].data)
        except _GONE:
            self._gone()

    def ready(self, fd: int, events: int) -> None:
        if not self._requests:  # nothing asked: only EOF may come, the factory's end
            chunk = self._recv()
            if not chunk:
                self._gone()
            return
        request = self._requests[0]
        if request.fds:
            if not self._receive_fds(request):
                return
        elif not self._receive_line(request):
            return
        self._requests.pop(0)
        if self._requests:
            self._send()
        request.done()

    def failed(self, exc: Exception) -> None:  # a bug: the run cannot go on without us
        raise exc

    def _recv(self, size: int = 4096) -> bytes | None:
        try:
            return self._sock.recv(size)
        except BlockingIOError:
            return None
        except _GONE:
            return b""

    def _receive_line(self, request) -> bool:
        """b"+" (first_only) or up to a newline; True once it is all there."""
        chunk = self._recv(1 if request.first_only and not request.data_in else 4096)
        if chunk is None:
            return False
        if not chunk:
            self._gone()
            return False
        request.data_in += chunk
        data = request.data_in
        if (request.first_only and data == b"+") or data.endswith(b"\n"):
            request.result = data.decode(errors="replace").rstrip("\n")
            return True
        return False

    def _receive_fds(self, request) -> bool:
        """The answer to a request for `count` sockets: its `count` bytes, and the fds
        that came with them (fewer if the factory could not make them all, or if the
        kernel dropped those that did not fit here: MSG_CTRUNC). Waits only for the
        bytes."""
        try:
            data, new, flags = _recv_fds(self._sock, request.fds - len(request.data_in),
                                         request.fds)
        except BlockingIOError:
            return False
        except _GONE:
            data, new, flags = b"", [], 0
        request.result.extend(new)
        if not data:
            self._gone()
            return False
        request.data_in += data
        request.truncated |= bool(flags & socket.MSG_CTRUNC)
        if len(request.data_in) < request.fds:
            return False
        if not request.result:
            request.error = OSError(errno.EMFILE, "out of file descriptors" if request.truncated
                                    else "the child's socket factory could not make sockets")
        return True

    def _gone(self) -> None:
        """The factory closed its end: the child is gone (the supervisor sees it too)."""
        if self.gone:
            return
        self.gone = True
        self._loop.watch(self._sock.fileno(), 0, self)
        self._fail_all()

    def _fail_all(self) -> None:
        self.gone = True
        requests, self._requests = self._requests, []
        for request in requests:
            if request.fds:
                for fd in request.result:
                    os.close(fd)
            request.result, request.error = None, FactoryGone()
            request.done()
        if self._after_hello:
            self._hello("", None)


class _Request:
    __slots__ = ("data", "answer", "fds", "first_only", "data_in", "result", "error",
                 "truncated")

    def __init__(self, data: bytes, answer, fds: int = 0, first_only: bool = False):
        self.data, self.answer, self.fds, self.first_only = data, answer, fds, first_only
        self.data_in = b""
        self.result = [] if fds else None
        self.error = None
        self.truncated = False

    def done(self) -> None:
        self.answer(self.result, self.error)
