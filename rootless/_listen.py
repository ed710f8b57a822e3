"""Listening sockets that face clients (api.sock and published ports): their listen
backlog, the fd their accept loops keep in reserve for when fds run out, and the limit
of open files the services raise for them."""
import os


def backlog(path: str = "/proc/sys/net/core/somaxconn") -> int:
    """The system's listen backlog (net.core.somaxconn), as Go's net package takes for
    rootlesskit: a burst of clients waits in the queue, where a backlog of 128 made
    the 129th connect() fail with EAGAIN. (api.sock is bound on the way to the
    command: _socket, the C module, not socket.py and its enum.)"""
    try:
        with open(path, "rb") as f:
            return min(max(int(f.read()), 1), 2**31 - 1)  # listen() takes a C int
    except (OSError, ValueError):
        import _socket

        return _socket.SOMAXCONN


class SpareFd:
    """One fd held in reserve for an accept loop (the API's, the ports'). Out of fds,
    accept() cannot take a client, which would then wait in the backlog for as long as
    the pressure lasts: the spare is given up for a moment to take the client and
    answer or reset it (release), then taken back (restore). One a thread: two threads
    may not share one (one could take the fd the other just released)."""

    def __init__(self):
        self._fd: int | None = None
        self.restore()

    def restore(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # out of fds already: tried again at the next release

    def close(self) -> None:
        """Give the spare up for good."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> bool:
        """Free the spare fd; False if there was none to free (restore() is then tried,
        for next time: fds may have been freed meanwhile)."""
        if self._fd is None:
            self.restore()
            return False
        os.close(self._fd)
        self._fd = None
        return True


def grow_fd_table(fd: int, size: int = 1024) -> None:
    """Make this process's file table hold `size` fds now, while it has one thread
    (`fd`: any open one, copied once to number size-1 and closed).
    The kernel grows the table as fd numbers pass its size (64, 128, 256...), and in a
    process of several threads each growth waits for an RCU grace period: 8-10 ms,
    paid by whichever connection's socket crossed the line. The first client's
    answer waited for it, in the socket factory as it made its first batch. A table
    of 1024 is 8 KiB of the kernel's memory. Only past the soft limit does it not
    grow (dup2 then fails: nothing lost)."""
    import fcntl

    try:
        os.close(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, size - 1))
    except OSError:
        pass


def raise_fd_limit() -> None:
    """Raise the soft limit of open files to the hard one, as Go does at the start of
    every program (rootlesskit's included): each connection costs two sockets, and the
    default soft limit (1024) would cap a port at some 500 connections. The services
    do it as they load, which takes fds too (imports, trio's own): the limit may have
    been lowered since the start. (The child has its own, in ctypes: see
    linux.raise_fd_limit.)"""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass
