"""The parent's wait: for the child, and for the network helpers beside it.

Plain poll(2) on pidfds: one child and a helper or two need no event loop, and
keeping trio out of this loop keeps it off the path of short commands.
"""
import os
import select
import _signal as signal  # the C module: see _process.py

from . import _log
from ._process import exit_code, readable

# How long the command gets to stop on SIGTERM after its network has gone.
STOP_GRACE = 10.0


def supervise(child_pid: int, helpers: list, failed_fd: int | None = None) -> int:
    """Wait until the child ends and return its exit code. If a helper dies first, or
    `failed_fd` becomes readable (the services failed; it holds why), the run cannot go
    on: say why, stop the child (SIGTERM, then SIGKILL) and return 1."""
    fds = {os.pidfd_open(child_pid): None}
    for helper in helpers:
        fds[os.pidfd_open(helper.pid)] = helper
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    if failed_fd is not None:
        poller.register(failed_fd, select.POLLIN)
    try:
        ready = [fds.get(fd, "services") for fd, _ in poller.poll()]  # handlers run here
        # The child first: when it ends, its netns goes, and pasta quits with it.
        if None in ready:
            return exit_code(os.waitpid(child_pid, 0)[1])
        died = [h for h in ready if h != "services"]
        if died:  # first: a failure of the services is then only a consequence
            _log.error(died[0].death_message())
        else:
            _log.error(os.read(failed_fd, 4096).decode(errors="replace"))
        _stop_child(child_pid)
        return 1
    finally:
        for fd in fds:
            os.close(fd)


def _stop_child(pid: int) -> None:
    fd = os.pidfd_open(pid)
    try:
        for sig, grace in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, None)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if readable(fd, grace):
                break
        os.waitpid(pid, 0)
    finally:
        os.close(fd)
