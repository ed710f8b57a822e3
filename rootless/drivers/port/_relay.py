"""Copying a TCP connection both ways, for the builtin port driver (parent side, trio).

Bytes go through a pipe with splice(2): socket -> pipe -> socket, never through
Python. Every fd is non-blocking (trio's sockets, and the pipe); on EAGAIN the task
waits for the fd with trio, and each loop has a checkpoint, so a busy connection can
be cancelled and does not starve the others. A direction that keeps its pipe full
moves to a worker thread while the data flows (`_bulk`), so bulk connections use
every CPU.

Pipes come from a pool and are held only while data is in flight: a direction takes a
pipe when its source has data, and gives it back, empty, before it waits for more.
Idle connections hold none, and a few pipes serve many connections.

Big pipes copy faster (1 MiB moves about 1.5x what the default 64 KiB does), but an
unprivileged user has a quota of pipe memory (/proc/sys/fs/pipe-user-pages-soft,
64 MiB by default, for all the user's processes): past it, F_SETPIPE_SZ fails with
EPERM and every new pipe of the user, ours or not, gets 8 KiB. A connection whose
sink stalls keeps its pipe full, and so held: 64 stalled clients with 1 MiB each
would take the whole quota. So this process keeps to half of it, and a new pipe
takes at most a sixteenth of what is left of that half: 1 MiB while plenty is left,
smaller as it fills. Idle pipes are kept for reuse only while less than half of our
share is held, and those no connection needed for _IDLE_FOR s are closed. When no
pipe of the default size can be had (our share is used, or the process is out of
fds), the direction copies through a buffer (readv/write) until pipes come back.

Ends: EOF from a source is passed on as a half-close (shutdown SHUT_WR) once everything
read has been written; the other direction goes on. A reset (or any error reading a
source) ends both directions and resets the other peer too. An error writing to a sink
ends that direction: the other one then reads the same dead peer and ends as well.
"""
import errno
import fcntl
import os
import socket
import time

from ... import _log
from . import _bulk

_SPLICE = _bulk.SPLICE_FLAGS
_PIPE_MAX = 1 << 20     # the size a new pipe asks for at most
_MIN_PIPE = 64 << 10    # smaller (a user over quota gets 8 KiB): copy through a buffer
_ROOM_PER_PIPE = 16     # a new pipe takes at most this fraction of our share's room
_DEFAULT_QUOTA = 16384  # pages: the kernel's default pipe-user-pages-soft
_KEEP_IDLE = 16         # pipes kept for reuse at most
_IDLE_FOR = 5.0         # s: idle pipes no connection needed this long are closed
_RETRY_AFTER = 1.0      # s: no new pipe is tried this long after one was refused
_BUFFER = 64 << 10      # the buffer of a direction that has no pipe
_BUFFER_RUN = 16        # chunks copied through it before a pipe is asked for again
_BULK = 4 << 20         # bytes in a burst that make a direction a bulk transfer
_QUIET = 0.01           # s: a source quiet this long ends a burst
_LINGER_RESET = b"\1\0\0\0\0\0\0\0"  # struct linger {on, 0 s}: close() sends a reset


class _Pipe:
    __slots__ = ("r", "w", "size")

    def __init__(self, r: int, w: int, size: int):
        self.r, self.w, self.size = r, w, size

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """Empty pipes for splice, within this process's share of the user's pipe quota."""

    def __init__(self):
        self._idle: list[_Pipe] = []  # a stack: the bottom ones are the longest unused
        self._retry_at = 0.0
        self._share = 0     # bytes of pipe this process may hold; read at the first pipe
        self.held = 0       # bytes of the pipes open now, idle or in use
        self._least_idle = 0  # the fewest pipes idle at once since the last sweep
        self._sweeping = False

    def get(self) -> _Pipe | None:
        """An empty pipe, or None when no decent one can be had now."""
        idle = self._idle
        if idle:
            pipe = idle.pop()
            if len(idle) < self._least_idle:
                self._least_idle = len(idle)
            return pipe
        if time.monotonic() < self._retry_at:
            return None
        pipe = self._new()
        if pipe is None:
            self._retry_at = time.monotonic() + _RETRY_AFTER
        return pipe

    def _new(self) -> _Pipe | None:
        if not self._share:
            self._share = _pipe_share()
        room = (self._share - self.held) // _ROOM_PER_PIPE
        if room < _MIN_PIPE:
            return None
        try:
            pipe = _new_pipe(min(_PIPE_MAX, 1 << (room.bit_length() - 1)))
        except OSError as exc:  # out of fds (EMFILE, ENFILE) or of kernel memory
            _log.limited("relay-pipe", f"port relay: cannot make a pipe: {exc.strerror}; "
                                       f"connections copy through a buffer meanwhile")
            return None
        if pipe is not None:
            self.held += pipe.size
        return pipe

    def put(self, pipe: _Pipe) -> None:
        """Give back an empty pipe (one with data in it must be dropped instead)."""
        if len(self._idle) < _KEEP_IDLE and self.held <= self._share // 2:
            self._idle.append(pipe)
            if not self._sweeping:
                self._sweep_soon()
        else:
            self.drop(pipe)

    def drop(self, pipe: _Pipe) -> None:
        pipe.close()
        self.held -= pipe.size
        self._retry_at = 0.0  # its quota is free again

    def close(self) -> None:
        while self._idle:
            self.drop(self._idle.pop())

    def _sweep_soon(self) -> None:
        import trio

        self._sweeping = True
        self._least_idle = len(self._idle)
        # A task of the run, not of a port: the pool serves them all.
        trio.lowlevel.spawn_system_task(self._sweep, name="rootless idle pipes")

    async def _sweep(self) -> None:
        """Every _IDLE_FOR s, close the idle pipes that no connection took meanwhile:
        they count in the user's quota, and a burst long past must not keep them.
        Ends when none is idle. A system task: it must not raise."""
        import trio

        try:
            while self._idle:
                await trio.sleep(_IDLE_FOR)
                unused = self._least_idle
                for pipe in self._idle[:unused]:
                    self.drop(pipe)
                del self._idle[:unused]
                self._least_idle = len(self._idle)
        except Exception as exc:  # a bug: the pipes stay, the run goes on
            _log.limited("relay-sweep", f"port relay: closing idle pipes: "
                                        f"{type(exc).__name__}: {exc}")
        finally:
            self._sweeping = False


def _pipe_share(sysctls: str = "/proc/sys/fs") -> int:
    """Bytes of pipe this process may hold: half of the user's quota, which all the
    user's processes share (dockerd's and the containers' pipes count in it too)."""
    limits = []
    for name in ("pipe-user-pages-soft", "pipe-user-pages-hard"):
        try:
            with open(f"{sysctls}/{name}") as f:
                limits.append(int(f.read()))
        except (OSError, ValueError):
            pass
    pages = min((n for n in limits if n > 0), default=_DEFAULT_QUOTA)  # 0: no limit
    return pages * os.sysconf("SC_PAGE_SIZE") // 2


def _new_pipe(want: int) -> _Pipe | None:
    """A pipe of `want` bytes (a power of two), or of the most below it the user's
    quota allows; None if that is under _MIN_PIPE. OSError if no pipe can be made."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        while want > size:
            try:
                size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, want)
                break
            except PermissionError:  # over the user's quota, or above pipe-max-size
                want //= 2
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    if size < _MIN_PIPE:
        os.close(r)
        os.close(w)
        return None
    return _Pipe(r, w, size)


# One pool for the process: the quota it works within is the user's anyway.
pipes = PipePool()


class _Reset(Exception):
    """A source failed (reset, timed out...): both directions end."""


async def relay(a, b) -> None:
    """Copy between the connected, non-blocking sockets `a` and `b` (trio's or the
    standard library's) both ways until both directions have
    ended; the caller closes them. A reset from either peer resets the other."""
    import trio

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_direction, b, a, nursery.cancel_scope)
        await _direction(a, b, nursery.cancel_scope)  # one task less per connection


async def _direction(source, sink, both) -> None:
    try:
        await _copy(source, sink)
    except _Reset:
        # The source peer is gone: so is this connection. The other peer gets a reset
        # too, rather than an EOF that could pass for the end of a complete exchange.
        reset_on_close(sink)
        both.cancel()


def reset_on_close(sock) -> None:
    """Have close() reset the connection (a zero linger), not end it with an EOF."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:  # the peer is gone already
        pass


async def _copy(source, sink) -> None:
    import trio

    src, dst = source.fileno(), sink.fileno()
    wait_readable = trio.lowlevel.wait_readable
    checkpoint = trio.lowlevel.checkpoint
    pipe, queued = None, 0  # bytes read into the pipe, not yet written out
    # Chunks moved since the last wait (a wait is a checkpoint): the second one in a
    # row checkpoints, so a busy direction yields to the others and heeds cancellation,
    # and a short exchange (a chunk, then a wait) costs no extra trip to the scheduler.
    streak = 0
    # After a read that did not fill the pipe, the source is most likely drained:
    # wait for it rather than spend a read on EAGAIN (half the syscalls of a short
    # exchange).
    drained = False
    # Bytes moved since the source was last quiet for _QUIET s: past _BULK, the
    # direction is a bulk transfer and goes to a worker thread.
    burst = 0
    try:
        while True:
            if drained:
                if pipe is not None:
                    pipes.put(pipe)  # empty: others may use it while this one waits
                    pipe = None
                since = time.monotonic()
                await wait_readable(src)
                if time.monotonic() - since > _QUIET:
                    burst = 0
                drained, streak = False, 0
            if pipe is None:
                pipe = pipes.get()
                if pipe is None:
                    drained = await _copy_buffered(src, dst, sink)
                    if drained is None:
                        return
                    continue
            try:
                queued = os.splice(src, pipe.w, pipe.size, flags=_SPLICE)
            except BlockingIOError:
                drained = True
                continue
            except OSError as exc:
                _debug("reading", exc)
                raise _Reset from None
            if not queued:
                _shutdown(sink)
                return
            drained = queued < pipe.size
            burst += queued
            queued, waited = await _write_out(pipe, queued, dst)
            if queued:
                return  # the sink failed
            if waited:
                streak = 0
            if burst >= _BULK and _bulk.available():  # give it a CPU of its own
                copy = _bulk.Copy(src, dst, pipe)
                try:
                    await _bulk.copy_in_thread(copy)
                finally:
                    queued = copy.queued  # not 0 if cancelled while writing
                if copy.how == _bulk.STALLED:  # the sink is slow: wait for it here
                    queued, _ = await _write_out(pipe, queued, dst)
                    if queued:
                        return
                elif copy.how != _bulk.IDLE:
                    _thread_ended(copy, sink)
                    return
                drained, burst = True, 0  # quiet: wait for the source on trio's thread
                continue
            streak += 1
            if streak > 1:
                await checkpoint()
                streak = 0
    finally:
        if pipe is not None:
            if queued:
                pipes.drop(pipe)  # data of a dead connection in it
            else:
                pipes.put(pipe)


async def _write_out(pipe: _Pipe, queued: int, dst: int) -> tuple[int, bool]:
    """Write the pipe's `queued` bytes to `dst`: (what is left, only if the sink
    failed; whether it had to wait for the sink)."""
    import trio

    waited = False
    while queued:
        try:
            queued -= os.splice(pipe.r, dst, queued, flags=_SPLICE)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(dst)
            waited = True
        except OSError as exc:
            _debug("writing", exc)
            break
    return queued, waited


def _thread_ended(copy, sink) -> None:
    """The direction ended on a worker thread: end it here as `_copy` would."""
    if copy.how == _bulk.EOF:
        _shutdown(sink)
    elif copy.how == _bulk.READ_FAILED:
        _debug("reading", copy.error)
        raise _Reset
    elif copy.how == _bulk.WRITE_FAILED:
        _debug("writing", copy.error)


async def _copy_buffered(src: int, dst: int, sink) -> bool | None:
    """Copy through a buffer, for want of a pipe, until the source is drained (True)
    or for _BUFFER_RUN chunks (False: a pipe may be had by then); None at EOF or when
    the sink failed. A chunk that did not wait is followed by a checkpoint, as in the
    pipe path: a source that never runs dry must not keep trio's thread."""
    import trio

    buffer = bytearray(_BUFFER)
    into, view = [buffer], memoryview(buffer)
    for _ in range(_BUFFER_RUN):
        try:
            n = os.readv(src, into)
        except BlockingIOError:
            return True
        except OSError as exc:
            _debug("reading", exc)
            raise _Reset from None
        if not n:
            _shutdown(sink)
            return None
        sent, waited = 0, False
        while sent < n:
            try:
                sent += os.write(dst, view[sent:n])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(dst)
                waited = True
            except OSError as exc:
                _debug("writing", exc)
                return None
        if not waited:
            await trio.lowlevel.checkpoint()
    return False


def _shutdown(sink) -> None:
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:  # the peer went away meanwhile: nothing left to tell it
        pass


def _debug(doing: str, exc: OSError) -> None:
    if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
        _log.debug(f"port relay: {doing}: {exc.strerror or exc}")
