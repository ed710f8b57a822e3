"""Bulk directions of the TCP relay (`_relay`), copied by worker threads.

trio runs every task on one thread, so all connections of a port would share one
CPU. A direction that keeps its pipe full is handed to a worker thread for as long
as data keeps coming: the thread's loop is the same splice loop, blocking in poll(2)
instead of trio. splice and poll release the GIL, and the Python around them is a
few microseconds a megabyte, so bulk connections copy on several CPUs, as Go's
goroutines do for rootlesskit. Short exchanges never get here: they stay on
trio's thread, where a connection costs no thread hand-off.

A thread gives the direction back to trio once its source has been quiet, or its sink
full, for _IDLE_MS, so an idle or stalled connection holds no thread, and at once
when trio cancels the direction (the connection ends, or its port is removed):
cancellation writes an eventfd the thread polls along with its fds.
"""
import os
import select

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_IDLE_MS = 50

# How a thread's copy ended (what trio does next is `_relay`'s business).
IDLE, STALLED, EOF, READ_FAILED, WRITE_FAILED, CANCELLED = (
    "idle", "stalled", "eof", "read", "write", "cancelled")


class Copy:
    """One hand-off: what the thread did with the direction's pipe."""
    __slots__ = ("src", "dst", "pipe", "queued", "how", "error")

    def __init__(self, src: int, dst: int, pipe):
        self.src, self.dst, self.pipe = src, dst, pipe
        self.queued = 0          # bytes in the pipe not yet written out
        self.how = CANCELLED
        self.error: OSError | None = None


_threads = None


def _limiter():
    """A worker for each CPU but one (trio's thread copies too). More threads only
    fight over the GIL: with 4 bulk connections on 2 CPUs, one worker moved 59-60
    Gbit/s, two 56, four 55, and none 53."""
    global _threads
    if _threads is None:
        import trio

        _threads = trio.CapacityLimiter(max(1, (os.cpu_count() or 2) - 1))
    return _threads


def available() -> bool:
    """A thread is free now (a direction never waits for one: it copies on trio's)."""
    return _limiter().available_tokens > 0


async def copy_in_thread(copy: Copy) -> None:
    """Run `copy` on a worker thread until its source is quiet, it ends or trio
    cancels it; the thread is always done when this returns or raises. Out of fds
    or threads, nothing is done and `copy` says IDLE: the direction goes on on
    trio's thread."""
    import trio

    try:
        wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    except OSError:
        copy.how = IDLE
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_wake_on_cancel, wake)
            try:
                # Not abandoned on cancel: the thread uses fds that are closed after us.
                await trio.to_thread.run_sync(_copy, copy, wake, limiter=_limiter(),
                                             thread_name="rootless relay")
            except RuntimeError:  # "can't start new thread" (_copy raises no such thing)
                copy.how = IDLE
            nursery.cancel_scope.cancel()
    finally:
        os.close(wake)


async def _wake_on_cancel(wake: int) -> None:
    import trio

    try:
        await trio.sleep_forever()
    finally:
        os.eventfd_write(wake, 1)


def _copy(copy: Copy, wake: int) -> None:
    """The thread's loop: `_relay._copy`'s, blocking in poll instead of trio."""
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
                    copy.how = STALLED  # trio writes the rest when the sink takes it
                    return
                if any(fd == wake for fd, _ in events):
                    return  # CANCELLED, with data in the pipe
            except OSError as exc:
                copy.how, copy.error = WRITE_FAILED, exc
                return
