"""Bulk directions of the TCP relay (`_relay`), copied by worker threads.

The ports' loop (`_loop`) runs every connection on one thread, so all of them would
share one CPU. A direction that keeps its pipe full is handed to a worker thread for
as long as data keeps coming: the thread's loop is the same splice loop, blocking in
poll(2) instead of epoll. splice and poll release the GIL, and the Python around them
is a few microseconds a megabyte, so bulk connections copy on several CPUs, as Go's
goroutines do for rootlesskit. Short exchanges never get here: they stay on the
loop's thread, where a connection costs no thread hand-off.

A thread gives the direction back to the loop once its source has been quiet, or its
sink full, for _IDLE_MS, so an idle or stalled connection holds no thread, and at
once when the loop cancels it (the connection ends, or its port is removed):
cancellation writes an eventfd the thread polls along with its fds.
"""
import os
import select

from ... import _threads
from ...errors import OutOfProcesses

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_IDLE_MS = 50

# How a thread's copy ended (what the loop does next is `_relay`'s business).
IDLE, STALLED, EOF, READ_FAILED, WRITE_FAILED, CANCELLED = (
    "idle", "stalled", "eof", "read", "write", "cancelled")


class Copy:
    """One hand-off: what the thread did with the direction's pipe."""
    __slots__ = ("src", "dst", "pipe", "queued", "how", "error", "wake", "thread")

    def __init__(self, src: int, dst: int, pipe):
        self.src, self.dst, self.pipe = src, dst, pipe
        self.wake, self.thread = -1, None
        self.queued = 0          # bytes in the pipe not yet written out
        self.how = CANCELLED
        self.error: OSError | None = None


_IDLE_WORKER = 10.0  # s: a worker with nothing to copy this long ends (as trio's did)
_busy: set = set()   # the copies on a worker now (the loop's thread adds, removes)
_idle: list = []     # the workers waiting for a copy
_ending: set = set()  # copies whose worker has not yet handed them back
_lock = None         # guards _idle and _ending


def _workers() -> int:
    """A worker for each CPU but one (the loop's thread copies too). More threads only
    fight over the GIL: with 4 bulk connections on 2 CPUs, one worker moved 59-60
    Gbit/s, two 56, four 55, and none 53."""
    return max(1, (os.cpu_count() or 2) - 1)


def available() -> bool:
    """A worker may take a copy now (a direction never waits for one: it copies on
    the loop's thread meanwhile)."""
    return len(_busy) < _workers()


def start(copy: Copy, done) -> bool:
    """Run `copy` on a worker thread until its source is quiet, it ends or cancel()
    is called; then the worker calls `done()` (from its thread). False, and nothing
    started, when no eventfd or thread can be had now (out of fds or threads)."""
    global _lock
    if _lock is None:
        _lock = _threads.Lock()
    try:
        copy.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    except OSError:
        return False
    with _lock:
        worker = _idle.pop() if _idle else None
        _ending.add(copy)
    if worker is None:
        worker = _Worker()
        worker.job = (copy, done)
        try:
            _threads.Thread(worker.run).start()
        except OutOfProcesses:
            with _lock:
                _ending.discard(copy)
            os.close(copy.wake)
            copy.wake = -1
            return False
    else:
        worker.job = (copy, done)
        worker.wake.set()
    _busy.add(copy)
    return True


def cancel(copy: Copy) -> None:
    """Make the worker give the direction back at once (it then calls done())."""
    os.eventfd_write(copy.wake, 1)


def finished(copy: Copy) -> None:
    """On the loop's thread, once done() came: free what the copy had."""
    _busy.discard(copy)
    os.close(copy.wake)
    copy.wake = -1


def join_all(timeout: float = 2.0) -> None:
    """At the end of the loop: wait until every copy (each cancelled) is handed back."""
    import time

    deadline = time.monotonic() + timeout
    while _ending and time.monotonic() < deadline:
        time.sleep(0.001)


class _Worker:
    """A thread that copies one direction at a time, kept for _IDLE_WORKER s between
    copies: a bulk burst costs no thread start. Named "rootless relay" while it copies,
    "rootless worker" while it waits (top, and the tests, tell them apart)."""

    def __init__(self):
        self.wake = _threads.Event()
        self.job = None

    def run(self) -> None:
        while True:
            copy, done = self.job
            self.job = None
            _threads.name("rootless relay")
            try:
                _copy(copy, copy.wake)
            except BaseException as exc:  # noqa: B902 - a bug: said as a failed read
                copy.how, copy.error = READ_FAILED, OSError(str(exc))
            finally:
                _threads.name("rootless worker")
                with _lock:
                    _idle.append(self)
                    _ending.discard(copy)
                try:
                    done()
                except RuntimeError:  # the loop has ended: nobody waits for it
                    pass
            if not self.wake.wait(_IDLE_WORKER):
                with _lock:
                    if self in _idle:  # nobody is handing it a copy: it ends
                        _idle.remove(self)
                        return
                self.wake.wait()  # taken just now: the copy is coming
            self.wake.clear()


def _copy(copy: Copy, wake: int) -> None:
    """The thread's loop: `_relay`'s, blocking in poll instead of the ports' loop."""
    src, dst, pipe = copy.src, copy.dst, copy.pipe
    readable, writable = select.poll(), select.poll()
    readable.register(src, select.POLLIN)
    readable.register(wake, select.POLLIN)
    writable.register(dst, select.POLLOUT)
    writable.register(wake, select.POLLIN)
    while True:
        try:
            copy.queued = os.splice(src, pipe.w, pipe.size, flags=SPLICE_FLAGS)
        except BlockingIOError:
            events = readable.poll(_IDLE_MS)
            if not events:
                copy.how = IDLE
                return
            if any(fd == wake for fd, _ in events):
                return  # CANCELLED
            continue
        except OSError as exc:
            copy.how, copy.error = READ_FAILED, exc
            return
        if not copy.queued:
            copy.how = EOF
            return
        while copy.queued:
            try:
                copy.queued -= os.splice(pipe.r, dst, copy.queued, flags=SPLICE_FLAGS)
            except BlockingIOError:
                events = writable.poll(_IDLE_MS)
                if not events:
                    copy.how = STALLED  # the loop writes the rest when the sink takes it
                    return
                if any(fd == wake for fd, _ in events):
                    return  # CANCELLED, with data in the pipe
            except OSError as exc:
                copy.how, copy.error = WRITE_FAILED, exc
                return
