"""An event loop on epoll(7), without trio, for a thread of the parent: the builtin
driver's ports (TCP: accept, connect into the child, relay; UDP: flows) and the socket
factory's client run on one (`drivers/port/_engine.py`), the REST API on another
(`api/server.py`).

Why not trio: trio and what it imports weigh 12 MiB, and loading it was most of the
first client's wait (60-130 ms: docs/memory.md). A published port or the API needs
readiness, timers and calls from other threads, no more. trio still serves the port
drivers that talk to a helper (slirp4netns', pasta's), and loads only when they are
used.

Level-triggered epoll: a handler does a bounded amount of work and returns; an fd
that still has data is reported again in the next round, so one busy connection
cannot starve the others. A handler that raises fails alone (its watcher's failed()
ends what it serves); only a failure of the loop itself ends it, and the run with it.
Timers are a list, not a heap (heapq: 0.4 ms of a port's first client): a loop keeps
a few at most (a server with many deadlines sweeps them with one timer of its own).
"""
import os
import select
import time
# The C type itself: the collections package would load keyword, operator and reprlib
# with it (0.2 MiB and 1-2 ms of a port's first client).
from _collections import deque

from . import _log, _threads

IN, OUT = select.EPOLLIN, select.EPOLLOUT
HUP, ERR = select.EPOLLHUP, select.EPOLLERR  # reported whether asked for or not
_ROUND = 256  # events taken from the kernel at a time


class Watcher:
    """What an fd's readiness is reported to."""

    def ready(self, fd: int, events: int) -> None:
        raise NotImplementedError

    def failed(self, exc: Exception) -> None:
        """ready() raised: end what this watcher serves (it must not raise)."""


class Loop:
    def __init__(self, name: str = "ports"):
        self.name = name  # what it serves, in its log lines
        self._epoll = select.epoll()
        self._watched: dict[int, tuple[int, Watcher]] = {}
        # [when, function or None]: a few at most (see the module's docstring)
        self._timers: list[list] = []
        self._calls: deque = deque()   # from other threads (deque.append is atomic)
        wake = -1
        try:  # out of fds or memory, the caller tries again: nothing is left open
            wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._epoll.register(wake, IN)
        except BaseException:
            if wake >= 0:
                os.close(wake)
            self._epoll.close()
            raise
        self._wake = wake
        self._closing = _threads.Lock()
        self._running = True

    # -- fds ----------------------------------------------------------------------------

    def watch(self, fd: int, events: int, watcher: Watcher) -> None:
        """Report `fd`'s readiness for `events` to `watcher`; 0 stops watching it (which
        must happen before the fd is closed). OSError if epoll cannot take it (out of
        memory, or of max_user_watches): the caller's unit of work fails alone."""
        old = self._watched.get(fd)
        if not events:
            if old is not None:
                del self._watched[fd]
                self._epoll.unregister(fd)
            return
        if old is None:
            self._epoll.register(fd, events)
        elif old[0] != events:
            self._epoll.modify(fd, events)
        self._watched[fd] = (events, watcher)

    # -- time and other threads ---------------------------------------------------------

    def call_later(self, delay: float, function) -> list:
        """Run `function` in `delay` s; returns a handle for cancel()."""
        timer = [time.monotonic() + delay, function]
        self._timers.append(timer)
        return timer

    @staticmethod
    def cancel(timer: list) -> None:
        timer[1] = None

    def call_soon_threadsafe(self, function) -> None:
        """Run `function` on the loop's thread (from any thread). RuntimeError if the
        loop has ended."""
        with self._closing:  # see close()
            if self._wake < 0:
                raise RuntimeError("the loop has ended")
            self._calls.append(function)
            os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        """From any thread: run() returns after the current round."""
        try:
            self.call_soon_threadsafe(self._stop)
        except RuntimeError:
            pass

    def _stop(self) -> None:
        self._running = False

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        """Until stop(). Raises only for a failure of the loop itself."""
        while self._running:
            for fd, events in self._epoll.poll(self._timeout(), _ROUND):
                if fd == self._wake:
                    self._run_calls()
                    continue
                entry = self._watched.get(fd)
                if entry is not None:  # not unwatched by a handler earlier in the round
                    _dispatch(entry[1], fd, events)
            self._run_timers()

    def run_pending(self) -> None:
        """The calls other threads made that did not run (at the end: see close())."""
        self._run_calls()

    def close(self) -> None:
        self._running = False
        self._epoll.close()
        # Under the lock: another thread's call_soon_threadsafe must not write to the
        # number once it is closed (and maybe reused by an fd of someone else).
        with self._closing:
            wake, self._wake = self._wake, -1
            os.close(wake)

    def _timeout(self) -> float:
        if self._calls:
            return 0
        if not self._timers:
            return -1
        return max(0.0, min(when for when, _ in self._timers) - time.monotonic())

    def _run_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while self._calls:
            _contained(self._calls.popleft(), self.name)

    def _run_timers(self) -> None:
        if not self._timers:
            return
        now = time.monotonic()
        due = [timer for timer in self._timers if timer[0] <= now]
        if due:
            self._timers = [timer for timer in self._timers if timer[0] > now]
            for _, function in due:
                if function is not None:
                    _contained(function, self.name)


def _dispatch(watcher: Watcher, fd: int, events: int) -> None:
    try:
        watcher.ready(fd, events)
    except Exception as exc:  # this watcher's unit of work ends, nothing else
        watcher.failed(exc)


def _contained(function, name: str) -> None:
    try:
        function()
    except Exception as exc:  # a bug in one call or timer: it alone is lost
        _log.limited(f"{name}-loop", f"{name}: {type(exc).__name__}: {exc}")
