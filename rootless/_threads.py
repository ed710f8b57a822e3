"""Threads, events and locks on `_thread`, the C module, not `threading`: threading
loads collections, functools, reprlib and more, 0.4-0.6 MiB of the parent's memory
from the start (the services' thread starts with the command), for the little the
parent needs (docs/memory.md). Every thread here is a daemon: none outlives the run."""
import _thread

Lock = _thread.allocate_lock


class Event:
    """threading.Event's set, clear, is_set and wait."""
    __slots__ = ("_flag", "_guard", "_set")

    def __init__(self):
        self._flag = _thread.allocate_lock()  # held while not set
        self._flag.acquire()
        self._guard = _thread.allocate_lock()
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._guard:
            if not self._set:
                self._set = True
                self._flag.release()

    def clear(self) -> None:
        with self._guard:
            if self._set:
                self._flag.acquire()  # a waiter holds it a moment at most
                self._set = False

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        if self._flag.acquire(True, -1 if timeout is None else max(timeout, 0)):
            self._flag.release()  # let the other waiters through too
            return True
        return self._set


class Thread:
    """A daemon thread that can be joined; `what` it is, for the error if it cannot
    start."""
    __slots__ = ("_target", "_args", "_done", "what")

    def __init__(self, target, args: tuple = (), what: str = "a thread"):
        self._target, self._args, self.what = target, args, what
        self._done = _thread.allocate_lock()

    def start(self) -> None:
        """errors.OutOfProcesses if no thread can be started now (the user's limit of
        processes, which counts threads, is reached; or memory for its stack ran out)."""
        self._done.acquire()
        try:
            start(self._run, (), self.what)
        except BaseException:
            self._done.release()
            raise

    def _run(self) -> None:
        try:
            self._target(*self._args)
        finally:
            self._done.release()

    def join(self, timeout: float | None = None) -> bool:
        """True once the thread has ended; False if `timeout` passed first."""
        if self._done.acquire(True, -1 if timeout is None else max(timeout, 0)):
            self._done.release()
            return True
        return False


def start(function, args: tuple, what: str) -> None:
    """_thread.start_new_thread, whose failure says only "can't start new thread"
    (RuntimeError, whatever the cause): errors.OutOfProcesses naming `what`."""
    try:
        _thread.start_new_thread(function, args)
    except RuntimeError:
        from .errors import OutOfProcesses

        raise OutOfProcesses(what) from None


def name(text: str) -> None:
    """The calling thread's name as ps, top and /proc show it (15 bytes at most)."""
    try:
        with open("/proc/thread-self/comm", "w") as f:
            f.write(text)
    except OSError:
        pass
