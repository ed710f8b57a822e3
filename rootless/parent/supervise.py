"""The parent's wait: for the child, and for the parts of the run it cannot live
without beside it (the network helpers, the socket factory, the API listener, the
services thread).

Plain poll(2) on pidfds and sockets: one child and a few parts need no event loop,
and keeping trio out of this loop keeps it off the path of short commands.
"""
import os
import select
import _signal as signal  # the C module: see _process.py

from .. import _log
from .._process import drain, readable, signal_wakeup

# How long the command gets to stop on SIGTERM after its network has gone.
STOP_GRACE = 10.0
# A part of the child ended: how long the child may take to be seen dead, if that is why.
_CHILD_EXITING = 0.1


def supervise(child, components: list) -> int:
    """Wait until the child ends and return its exit code. If a component ends first,
    the run cannot go on: say why in one line, stop the command (SIGTERM, then after
    STOP_GRACE its whole tree) and return 1. A child killed by a signal is said in one
    line too, and returns 1 (the command died with it; Child.kill ends the rest).

    The child closes its end of the handshake channel as its command ends, before it
    kills what the command left and before it exits (which ends the socket factory):
    so a component that goes with the run is never taken for one that failed."""
    pidfd = child.pidfd
    # Our own copies: the services thread may close its sockets while we poll them.
    fds = {os.dup(c.fd): c for c in components}
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(child.channel.rfd, select.POLLIN)
        for fd, component in fds.items():
            poller.register(fd, component.events)
        wakeup = signal_wakeup()  # a signal just before poll() would wait with it
        poller.register(wakeup, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}  # signal handlers run on its return
            if ready - {wakeup}:
                break
            drain(wakeup)
        if not ready & {pidfd, child.channel.rfd} and any(
                fds[fd].in_child for fd in ready if fd in fds) and readable(
                pidfd, _CHILD_EXITING):
            # The child died, and a part of it with it: the kernel closes a dying
            # process' fds (which hangs the part's socket up) before its pidfd says so.
            ready.add(pidfd)
        if ready & {pidfd, child.channel.rfd}:
            status = child.wait()
            if not child.signal:
                return status
            # Killed: the command's tree is left to init (the parent kills it).
            _log.error(f"the child {child.how()} while the command was running: "
                       f"stopping what the command left")
            return 1
        # In the order given: a helper's death first, the services' failure last (it
        # is then only a consequence).
        _log.error(next(c for fd, c in fds.items() if fd in ready).why())
        _stop(child, pidfd)
        return 1
    finally:
        for fd in fds:
            os.close(fd)


def _stop(child, pidfd: int) -> None:
    """SIGTERM (forwarded to the command), then, after the grace, the command's whole
    tree (through the child, which alone sees all of it)."""
    child.stopping()
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if not readable(pidfd, STOP_GRACE):
        child.kill_tree()
    child.wait()
