"""What a driver hands the parent to watch: a part of the run (a helper process, the
socket factory) whose end ends the run (rootless.parent.supervise)."""


class Component:
    """A part the run cannot live without, watched through `fd`: `events` (POLLIN for
    a pidfd or a pipe that says why; 0 for a socket whose hang-up is its end). `why()`
    says, in one line, what happened. `in_child`: it lives in the child's process (the
    socket factory, a thread of it), and so ends with it."""

    def __init__(self, fd: int, why, events: int = 0, in_child: bool = False):
        self.fd, self.why, self.events, self.in_child = fd, why, events, in_child
