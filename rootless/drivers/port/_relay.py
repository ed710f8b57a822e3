"""Copying a TCP connection both ways, for the builtin port driver (parent side, on
the ports' loop, `_loop`).

Bytes go through a pipe with splice(2): socket -> pipe -> socket, never through
Python. Every fd is non-blocking; on EAGAIN the direction waits for the loop to say
its fd is ready, and it moves at most two chunks each time it is called, so a busy
connection does not starve the others. A direction that keeps its pipe full moves to
a worker thread while the data flows (`_bulk`), so bulk connections use every CPU.

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
import time
import _socket

from ... import _log
from . import _bulk
from ..._loop import IN as _IN, OUT as _OUT

_SPLICE = _bulk.SPLICE_FLAGS
_PIPE_MAX = 1 << 20     # the size a new pipe asks for at most
_MIN_PIPE = 64 << 10    # smaller (a user over quota gets 8 KiB): copy through a buffer
_ROOM_PER_PIPE = 16     # a new pipe takes at most this fraction of our share's room
_DEFAULT_QUOTA = 16384  # pages: the kernel's default pipe-user-pages-soft
_KEEP_IDLE = 16         # pipes kept for reuse at most
_IDLE_FOR = 5.0         # s: idle pipes no connection needed this long are closed
_RETRY_AFTER = 1.0      # s: no new pipe is tried this long after one was refused
_BUFFER = 64 << 10      # the buffer of a direction that has no pipe
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
        self.loop = None      # the ports' loop (_loop.Loop), for the sweep's timer

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
        self._sweeping = False

    def _sweep_soon(self) -> None:
        self._sweeping = True
        self._least_idle = len(self._idle)
        self.loop.call_later(_IDLE_FOR, self._sweep)

    def _sweep(self) -> None:
        """Every _IDLE_FOR s, close the idle pipes that no connection took meanwhile:
        they count in the user's quota, and a burst long past must not keep them.
        Ends when none is idle."""
        unused = self._least_idle
        for pipe in self._idle[:unused]:
            self.drop(pipe)
        del self._idle[:unused]
        self._least_idle = len(self._idle)
        if self._idle:
            self.loop.call_later(_IDLE_FOR, self._sweep)
        else:
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


# What a direction is doing.
_READING, _WRITING, _BULK_COPY, _DONE = "reading", "writing", "bulk", "done"


class Relay:
    """Both directions of one connection, between the connected, non-blocking sockets
    `a` (the client's) and `b` (the child's), on the ports' loop. It closes both
    sockets when both directions have ended, or at once on a reset, and then calls
    `ended(self)`. A reset from either peer resets the other."""

    def __init__(self, loop, a, b, ended):
        self.loop, self.a, self.b, self._ended = loop, a, b, ended
        fa, fb = a.fileno(), b.fileno()
        self.up = _Direction(self, fa, fb, b)
        self.down = _Direction(self, fb, fa, a)
        self._masks = {fa: 0, fb: 0}
        self.closing = False

    def start(self) -> None:
        self.update()

    def ready(self, fd: int, events: int) -> None:
        """The loop's report for one of our sockets: hang-ups and errors wake whichever
        direction waits on it (its next splice says what happened)."""
        trouble = events & ~(_IN | _OUT)  # EPOLLERR, EPOLLHUP
        for direction in (self.up, self.down):
            if self.closing:
                return
            if direction.state == _READING and direction.src == fd and events & (_IN | trouble):
                direction.pump()
            elif (direction.state == _WRITING and direction.dst == fd
                  and events & (_OUT | trouble)):
                direction.flush()
        self.update()

    def failed(self, exc: Exception) -> None:
        _log.limited("port-connection", f"port relay: a connection failed: "
                                        f"{type(exc).__name__}: {exc}")
        self.close()

    def update(self) -> None:
        """Tell the loop what each socket waits for now."""
        if self.closing:
            return
        for fd in self._masks:
            mask = 0
            for direction in (self.up, self.down):
                if direction.state == _READING and direction.src == fd:
                    mask |= _IN
                elif direction.state == _WRITING and direction.dst == fd:
                    mask |= _OUT
            if mask != self._masks[fd]:
                self.loop.watch(fd, mask, self)
                self._masks[fd] = mask
        if self.up.state == _DONE and self.down.state == _DONE:
            self.close()

    def reset(self, sink) -> None:
        """A source failed: its peer is gone, and so is the connection. The other peer
        gets a reset too, rather than an EOF that could pass for the end of a complete
        exchange."""
        reset_on_close(sink)
        self.close()

    def close(self) -> None:
        """End both directions; the sockets close once no worker thread uses them."""
        if self.closing:
            return
        self.closing = True
        for fd, mask in self._masks.items():
            if mask:
                self.loop.watch(fd, 0, self)
        for direction in (self.up, self.down):
            direction.stop()
        self._close_when_free()

    def _close_when_free(self) -> None:
        if self.up.copy is None and self.down.copy is None:
            self.a.close()
            self.b.close()
            # No cycle left for the collector: 5,000 connections' worth of them, freed
            # only by a full collection, made a second burst take new memory.
            self.up.relay = self.down.relay = None
            ended, self._ended = self._ended, None
            if ended is not None:
                ended(self)

    def back_from_thread(self) -> None:
        if self.closing:
            self._close_when_free()
        else:
            self.update()


class _Direction:
    __slots__ = ("relay", "src", "dst", "sink", "state", "pipe", "queued", "burst",
                 "waited_at", "buffer", "pending", "copy")

    def __init__(self, relay: Relay, src: int, dst: int, sink):
        self.relay, self.src, self.dst, self.sink = relay, src, dst, sink
        self.state = _READING
        self.pipe: _Pipe | None = None
        self.queued = 0        # bytes read into the pipe, not yet written out
        # Bytes moved since the source was last quiet for _QUIET s: past _BULK, the
        # direction is a bulk transfer and goes to a worker thread.
        self.burst = 0
        self.waited_at: float | None = time.monotonic()  # since it is drained; None: busy
        self.buffer: bytearray | None = None  # without a pipe: copied through this
        self.pending: memoryview | None = None  # ... and what of it the sink has yet to take
        self.copy = None       # _bulk.Copy, while a worker thread has the direction

    def pump(self) -> None:
        """The source is readable: move at most two chunks (the loop reports it again if
        more is there: the other connections get their turn meanwhile)."""
        if self.waited_at is not None and time.monotonic() - self.waited_at > _QUIET:
            self.burst = 0
        for _ in range(2):
            if not self._chunk():
                return
        self._release_pipe()
        self.waited_at = None  # it yielded, busy: the wait for its turn is not quiet

    def flush(self) -> None:
        """The sink is writable: write what waits for it, then wait for the source."""
        if self.pending is not None:
            if self._write_buffer():
                self._wait_readable(drained=False)
            return
        if not self._write_out():
            return
        if self.burst >= _BULK and _bulk.available() and self._to_thread():
            return
        self._wait_readable(drained=False)

    def _chunk(self) -> bool:
        """Move one chunk; True if a full one moved and the source may have more."""
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = pipes.get()
            if pipe is None:
                return self._buffered_chunk()
        n = self._read(os.splice, self.src, pipe.w, pipe.size, None, None, _SPLICE)
        if not n:
            return False
        self.queued = n
        self.burst += n
        if not self._write_out():
            return False
        if n < pipe.size:  # the source is most likely drained: wait rather than EAGAIN
            self._wait_readable()
            return False
        if self.burst >= _BULK and _bulk.available() and self._to_thread():
            return False
        return True

    def _read(self, read, *args) -> int:
        """`read(*args)` from the source (a splice into the pipe, or a readv into the
        buffer): the bytes read, or 0 when there is nothing more to do now: the source
        is drained (the direction waits for it), at EOF (passed on) or failed (a reset:
        the connection ends)."""
        try:
            n = read(*args)
        except BlockingIOError:
            self._wait_readable()
            return 0
        except OSError as exc:
            _debug("reading", exc)
            self.relay.reset(self.sink)
            return 0
        if not n:
            self._eof()
        return n

    def _write_out(self) -> bool:
        """Write the pipe's queued bytes; False if the sink is full (the direction then
        waits for it) or failed (the direction has ended)."""
        while self.queued:
            try:
                self.queued -= os.splice(self.pipe.r, self.dst, self.queued, flags=_SPLICE)
            except BlockingIOError:
                self.state = _WRITING
                return False
            except OSError as exc:
                # The other direction then reads the same dead peer and ends as well.
                _debug("writing", exc)
                self._end()
                return False
        self.state = _READING
        return True

    def _buffered_chunk(self) -> bool:
        """For want of a pipe (the user's quota is used, or fds are out): one chunk
        through a buffer. The next chunk asks the pool again."""
        if self.buffer is None:
            self.buffer = bytearray(_BUFFER)
        n = self._read(os.readv, self.src, [self.buffer])
        if not n:
            return False
        self.pending = memoryview(self.buffer)[:n]
        return self._write_buffer() and n == len(self.buffer)

    def _write_buffer(self) -> bool:
        while self.pending:
            try:
                sent = os.write(self.dst, self.pending)
            except BlockingIOError:
                self.state = _WRITING
                return False
            except OSError as exc:
                _debug("writing", exc)
                self.pending = None
                self._end()
                return False
            self.pending = self.pending[sent:]
        self.pending = None
        self.state = _READING
        return True

    def _wait_readable(self, drained: bool = True) -> None:
        """Wait for the source; `drained`: it had nothing more (EAGAIN, a short read),
        so the wait counts towards _QUIET, which ends a burst. After the sink was full
        it does not: a source that waited for its sink, or the loop for its turn, under
        load, is not quiet (its bursts never reached _BULK, and no worker took them)."""
        self.state = _READING
        self._release_pipe()
        self.buffer = None  # 64 KiB a direction: returned while it waits
        self.waited_at = time.monotonic() if drained else None

    def _release_pipe(self) -> None:
        """Give the empty pipe back: others may use it while this direction waits."""
        if self.pipe is not None and not self.queued:
            pipes.put(self.pipe)
            self.pipe = None

    def _eof(self) -> None:
        """EOF from the source: passed on as a half-close; the other direction goes on."""
        _shutdown(self.sink)
        self._end()

    def _end(self) -> None:
        self.state = _DONE
        self.stop()

    def stop(self) -> None:
        """The direction ends: its pipe goes back (dropped if data of a dead connection
        is in it); a worker thread that has it is told to give it back."""
        if self.copy is not None:
            _bulk.cancel(self.copy)
            return  # the pipe is the thread's until it is back
        self.state = _DONE
        if self.pipe is not None:
            if self.queued:
                pipes.drop(self.pipe)
            else:
                pipes.put(self.pipe)
            self.pipe = None
        self.pending = self.buffer = None

    def _to_thread(self) -> bool:
        """Give the direction a CPU of its own; False if no thread can be had now."""
        copy = _bulk.Copy(self.src, self.dst, self.pipe)
        loop = self.relay.loop
        if not _bulk.start(copy, lambda: loop.call_soon_threadsafe(self._back)):
            return False
        self.copy, self.state = copy, _BULK_COPY
        return True

    def _back(self) -> None:
        """On the loop's thread: the worker gave the direction back."""
        copy, self.copy = self.copy, None
        _bulk.finished(copy)
        self.queued = copy.queued
        if self.relay.closing:
            self.stop()
        else:
            self.burst = 0
            how = copy.how
            if how == _bulk.STALLED:  # the sink is slow: wait for it on the loop
                self.state = _WRITING
            elif how in (_bulk.IDLE, _bulk.CANCELLED):
                self._wait_readable()  # quiet: wait for the source on the loop's thread
            elif how == _bulk.EOF:
                self._eof()
            elif how == _bulk.READ_FAILED:
                _debug("reading", copy.error)
                self.relay.reset(self.sink)
            else:  # WRITE_FAILED
                _debug("writing", copy.error)
                self._end()
        self.relay.back_from_thread()


def reset_on_close(sock) -> None:
    """Have close() reset the connection (a zero linger), not end it with an EOF."""
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, _LINGER_RESET)
    except OSError:  # the peer is gone already
        pass


def _shutdown(sink) -> None:
    try:
        sink.shutdown(_socket.SHUT_WR)
    except OSError:  # the peer went away meanwhile: nothing left to tell it
        pass


def _debug(doing: str, exc: OSError) -> None:
    if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
        _log.debug(f"port relay: {doing}: {exc.strerror or exc}")
