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
import signal
import socket
import struct

_REQUEST = struct.Struct("!ccBH")
_FAMILIES = {b"4": socket.AF_INET, b"6": socket.AF_INET6}
_TYPES = {b"s": socket.SOCK_STREAM, b"d": socket.SOCK_DGRAM}
_BATCH = 64  # sockets a request brings (SCM_RIGHTS passes at most 253)


# -- child side ---------------------------------------------------------------------------

def start(conn: socket.socket, netns: str | None, transparent: bool) -> None:
    """Serve `conn` (the child's end of the parent's socket pair) from a thread of the
    child, until the parent's end closes or the child exits. Called once the command
    runs: the command is forked from a process with one thread.

    A thread, not a process of its own: a third Python process cost 1.3 MiB of PSS
    and 12 MiB of RSS (docs/memory.md). Its death closes `conn`, which hangs the
    parent's end up, as the child's does."""
    import _thread

    # Every signal blocked: the kernel gives a process' signal to any thread that does
    # not block it, and only the main thread runs the handlers (forwarding, the kill
    # of the command's tree); taken here, one would wait until the main thread wakes.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        _thread.start_new_thread(_run, (conn, netns, transparent))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


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
    from . import _transparent

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
        socket.send_fds(conn, [b"s" * count], [s.fileno() for s in socks])
        for s in socks:
            s.close()
        return True
    if op in (b"R", b"r"):
        from . import _transparent

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


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# -- parent side (trio) -------------------------------------------------------------------

class FactoryGone(Exception):
    """The child's socket factory closed the connection: the child is gone."""

    def __init__(self, message: str = "the child's socket factory is gone"):
        super().__init__(message)


# Our end of the pair says the factory died (EOF aside): as it exited with data unread
# (a reset), or before we could send (EPIPE).
_GONE = (BrokenPipeError, ConnectionResetError)


class Factory:
    """The parent's connection to the factory. One request at a time; sockets come
    from pools refilled a batch at a time."""

    def __init__(self, sock: socket.socket):
        self._sock = sock  # the parent's end of the pair (see start())
        self._pools: dict[tuple[bytes, bytes], list[int]] = {}
        self.transparent = False

    async def connect(self) -> None:
        import trio

        self._lock = trio.Lock()
        # A plain socket (recv_fds wants one), non-blocking, driven by wait_readable.
        self._sock.setblocking(False)
        self._send(_REQUEST.pack(b"h", b"4", 0, 0))
        hello = await self._line()
        self.transparent = hello == "T"

    def close(self) -> None:
        self._sock.close()
        for pool in self._pools.values():
            for fd in pool:
                os.close(fd)
        self._pools.clear()

    async def socket(self, family: int, kind: int) -> socket.socket:
        """A new, unbound socket of the child's netns (a stdlib socket, blocking).
        OSError when none can be had now (out of fds, here or in the factory)."""
        key = (b"s" if kind == socket.SOCK_STREAM else b"d",
               b"4" if family == socket.AF_INET else b"6")
        pool = self._pools.setdefault(key, [])
        if not pool:
            async with self._lock:
                if not pool:
                    await self._refill(key, pool)
        return socket.socket(family, kind, fileno=pool.pop())

    async def _refill(self, key: tuple[bytes, bytes], pool: list[int]) -> None:
        import trio

        # Shielded: a request cancelled half-answered would leave its answer to be
        # read as the next one's. The factory answers at once, or is gone (EOF).
        with trio.CancelScope(shield=True):
            self._send(_REQUEST.pack(*key, _BATCH, 0))
            fds, truncated = await self._receive_fds(_BATCH)
        pool.extend(fds)
        if not fds:
            raise OSError(errno.EMFILE, "out of file descriptors" if truncated else
                          "the child's socket factory could not make sockets")

    async def udp_rule(self, add: bool, port: int) -> None:
        """Route the child's answers from UDP `port` back to transparent sockets.
        Raises OSError with the factory's reason."""
        import trio

        async with self._lock:
            with trio.CancelScope(shield=True):  # as in _refill
                self._send(_REQUEST.pack(b"R" if add else b"r", b"4", 0, port))
                answer = await self._line(first_only=True)
        if answer != "+":
            raise OSError(answer[1:])

    def _send(self, request: bytes) -> None:
        """A request is 5 bytes, in a socket buffer that is empty between requests:
        sent whole or not at all. The factory gone (EPIPE), it is FactoryGone."""
        try:
            self._sock.send(request)
        except _GONE:
            raise FactoryGone() from None

    async def _line(self, first_only: bool = False) -> str:
        """Read b"+" (first_only) or up to a newline."""
        import trio

        data = b""
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            try:
                chunk = self._sock.recv(1 if first_only and not data else 4096)
            except BlockingIOError:
                continue
            except _GONE:
                chunk = b""  # as EOF
            if not chunk:
                raise FactoryGone()
            data += chunk
            if (first_only and data == b"+") or data.endswith(b"\n"):
                return data.decode(errors="replace").rstrip("\n")

    async def _receive_fds(self, count: int) -> tuple[list[int], bool]:
        """The answer to a request for `count` sockets: its `count` bytes, and the fds
        that came with them (fewer if the factory could not make them all), and
        whether some were lost here: out of fds, the kernel drops those that do
        not fit and says so (MSG_CTRUNC). Never waits for fds: only for the bytes."""
        import trio

        fds: list[int] = []
        got, truncated = 0, False
        while got < count:
            await trio.lowlevel.wait_readable(self._sock)
            try:
                data, new, flags, _ = socket.recv_fds(self._sock, count - got, count)
            except BlockingIOError:
                continue
            except _GONE:
                data, new, flags = b"", [], 0  # as EOF
            fds.extend(new)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise FactoryGone()
            got += len(data)
            truncated |= bool(flags & socket.MSG_CTRUNC)
        return fds, truncated
