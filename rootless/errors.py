"""The errors rootless-run reports to its user.

Each is raised at the edge where the cause is known, with a message that names the
cause and, where there is one, the fix. The CLI prints the message on one line and
exits 1; nothing else reaches the user as a traceback.
"""
import errno

# An OSError with one of these says "no resources just now" (fds, memory): the work
# that needed them may succeed later (the API answers 503, a connection is closed).
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


class RootlessError(Exception):
    """Base of every error with a message meant for the user."""

    exit_code = 1


class UsageError(RootlessError):
    """Bad command line: unknown flag, bad value, conflicting flags."""


class PortSpecError(UsageError):
    """A port spec (-p, an API body, rootless-ctl add-ports) that cannot be used."""


class ApiError(RootlessError):
    """The REST API answered with an error (`status` is its HTTP status), or did not
    answer at all (`status` is None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ApiUnreachable(ApiError):
    """Nothing answers on the API socket: the instance is probably not running."""


class NotSupportedYet(UsageError):
    """A flag value the contract names but this version does not implement."""


class SubidError(RootlessError):
    """/etc/subuid, /etc/subgid or getsubids gave something we cannot use."""


class IdmapError(RootlessError):
    """newuidmap/newgidmap (or the single-id map) failed."""


class StateDirError(RootlessError):
    """The state dir cannot be created, locked or cleaned."""


class StateDirLocked(StateDirError):
    """Another instance holds the state dir's lock (`rootless-run --reuse` joins it)."""


class EnterError(RootlessError):
    """No instance to join (`rootless-ctl enter`, `--reuse`): none runs, it is stale,
    or it is not the user's; or the command cannot be run there (exit_code 127/126)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ProtocolError(RootlessError):
    """A malformed, oversized or unexpected frame on the parent/child pipes."""


class ChildSetupError(RootlessError):
    """The child reported a failure, or died, before the command started."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class DriverError(RootlessError):
    """A network or port driver cannot start or has failed."""


class StateDirMissing(StateDirError):
    """The state dir (or a dir on its way) does not exist, and was not to be created."""


class OutOfFds(RootlessError):
    """The process or the system ran out of file descriptors where the run cannot wait
    for them (setting up)."""

    @classmethod
    def check(cls, exc: OSError) -> "OutOfFds | None":
        """The error to report for `exc`, if fds ran out; else None."""
        if exc.errno == errno.EMFILE:
            return cls(f"out of file descriptors ({exc.strerror}): raise the limit of open "
                       f"files (ulimit -n; LimitNOFILE= in a systemd unit)")
        if exc.errno == errno.ENFILE:
            return cls(f"the system is out of file descriptors ({exc.strerror}): close some, "
                       f"or raise fs.file-max")
        return None


class OutOfProcesses(RootlessError):
    """No process or thread could be started: the user's limit of processes
    (RLIMIT_NPROC, which counts threads too) or its cgroup's (a systemd unit's
    TasksMax) is reached. Setting up, the run ends with it; once the run is up, what
    needed the thread waits for it (the services try again) or does without."""

    def __init__(self, what: str):
        super().__init__(
            f"cannot start {what}: the user's limit of processes and threads is reached "
            f"({_nproc_limit()}), or its cgroup's (TasksMax): raise it (ulimit -u; "
            f"LimitNPROC= or TasksMax= in a systemd unit), or end some of its processes")

    @classmethod
    def check(cls, exc: OSError, what: str) -> "OutOfProcesses | None":
        """The error to report for `exc`, raised by fork or posix_spawn, if the limit was
        what failed it (EAGAIN: ENOMEM is out of memory); else None."""
        return cls(what) if exc.errno == errno.EAGAIN else None


def _nproc_limit() -> str:
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    return f"ulimit -u: {'unlimited' if soft == resource.RLIM_INFINITY else soft}"
