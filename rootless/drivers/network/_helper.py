"""Running a network helper (slirp4netns, pasta): its binary checks, its log file,
and the one-line report when it fails."""
import os
import select
import _signal as signal  # the C module: see _process.py

from ..._paths import which
from ..._process import PYTHON_IGNORED_SIGNALS, close_fds_except, fork
from ...errors import DriverError, OutOfProcesses, UsageError
from ...state.statedir import removed_at_exit


def find_binary(flag: str, name: str, package: str) -> str:
    path = which(name)
    if path is None:
        raise UsageError(f"{name} not found: install it (as root: apt-get install {package}) "
                         f"or point {flag} at it")
    return path


def check_tun() -> None:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR)
    except OSError as exc:
        raise UsageError(f"cannot open /dev/net/tun ({exc.strerror}): the network helpers "
                         f"need it read-write; as root, run: chmod 666 /dev/net/tun "
                         f"(or load the tun module)") from None
    os.close(fd)


_TAIL_BYTES = 8192  # of a log read for its last lines: enough for them, whatever its size
_TAIL_LINE = 300    # characters of one quoted line at most


def log_tail(path: str, lines: int = 5) -> str:
    """The last `lines` non-empty lines of the log at `path`, on one line: what a
    helper said last, usually why it failed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, _TAIL_BYTES, max(0, size - _TAIL_BYTES))
        finally:
            os.close(fd)
    except OSError:
        return ""
    text = data.decode(errors="replace").splitlines()
    if size > _TAIL_BYTES:
        text = text[1:]  # the first line read may be the end of a longer one
    text = [line.strip()[:_TAIL_LINE] for line in text if line.strip()]
    return "; ".join(text[-lines:])


def _log_named(log: str) -> str:
    """Where the whole log is, unless it goes with a temp state dir at exit: the user
    would read the path of a file that is gone (the quoted lines must do then)."""
    return "" if removed_at_exit(log) else f" (log: {log})"


def ended(status: int) -> str:
    """How a process ended, from its wait status, in words."""
    code = os.waitstatus_to_exitcode(status)
    return f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"


def helper_failed(name: str, how: str, log: str, lines: int = 5) -> DriverError:
    tail = log_tail(log, lines)
    return DriverError(f"{name} {how}" + (f": {tail}" if tail else "") + _log_named(log))


def capture_output(argv: list[str], timeout: float = 5.0) -> str:
    """stdout+stderr of a short command (a helper's --help, to probe its flags)."""
    import subprocess

    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.decode(errors="replace")


class Helper:
    """A helper process the parent supervises: if it dies, the run ends (it is a
    drivers._component.Component: its pidfd, readable when it exits).

    Known and signalled by a pidfd, opened as soon as the pid is known: a pid read
    from a file (pasta's), or that of a child already reaped, may name another
    process by the time it is signalled."""

    events = select.POLLIN
    in_child = False

    def __init__(self, name: str, pid: int, log: str, reapable: bool = True,
                 tail_lines: int = 5):
        self.name, self.pid, self.log = name, pid, log
        self.reapable = reapable  # False for a daemon that is not our child (pasta)
        self.tail_lines = tail_lines  # of its log, quoted when it dies
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise helper_failed(name, "exited as it started", log) from None

    def signal(self, sig: int) -> None:
        """Signal the helper, if it still runs."""
        try:
            signal.pidfd_send_signal(self.fd, sig)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def why(self) -> str:
        return self.death_message()

    def how(self) -> str:
        """Once it has ended: how, reaping it (when it is ours: else only that it did)."""
        return ended(os.waitpid(self.pid, 0)[1]) if self.reapable else "exited"

    def death_message(self) -> str:
        """Reap the helper (when it is ours) and say what happened, for the user."""
        how = self.how()
        tail = log_tail(self.log, self.tail_lines)
        return (f"{self.name} {how} while the command was running: the namespace has lost "
                f"its network; stopping the command" + (f" ({tail})" if tail else "") +
                _log_named(self.log))


def spawn(argv: list[str], log: str, keep_fds: tuple[int, ...] = (),
          helper: str | None = None) -> int:
    """Start a helper in its own process group (a Ctrl-C on the terminal is for the
    command, which may need the network while it shuts down), output to `log`.
    `helper`: its name in an error, when argv[0] only starts it (setpriv)."""
    try:
        logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                        os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DriverError(f"cannot create {log}: {exc.strerror}") from None
    try:
        for fd in keep_fds:
            os.set_inheritable(fd, True)
        return os.posix_spawn(argv[0], argv, os.environ, setpgroup=0,
                              setsigdef=PYTHON_IGNORED_SIGNALS, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, logfd, 1),
            (os.POSIX_SPAWN_DUP2, logfd, 2),
        ])
    except OSError as exc:
        raise OutOfProcesses.check(exc, helper or argv[0]) or DriverError(
            f"cannot start {argv[0]}: {exc.strerror}") from None
    finally:
        os.close(logfd)
        for fd in keep_fds:
            os.set_inheritable(fd, False)


class Watchdog:
    """A forked process that SIGKILLs a helper when we die, even by SIGKILL: for a
    helper that daemonizes (pasta), no child of ours, which would otherwise live on and
    keep the namespace alive. It waits for EOF on a pipe only we hold the write end of,
    and holds nothing else of ours (a port, the state dir's lock) but the helper's
    pidfd."""

    def __init__(self, pidfd: int):
        read_end, self._write_end = os.pipe()
        try:
            self.pid = fork("the helper's watchdog process")
        except BaseException:
            os.close(read_end)
            os.close(self._write_end)
            raise
        if self.pid == 0:  # the watchdog: no Python clean-up, no inherited handlers
            try:
                close_fds_except(read_end, pidfd)
                # Its own process group: a kill of the run's group (SIGKILL included)
                # must leave it to do its job.
                os.setpgid(0, 0)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                    signal.signal(sig, signal.SIG_IGN)  # a Ctrl-C is ours to handle
                os.read(read_end, 1)
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            finally:
                os._exit(0)
        os.close(read_end)

    def cancel(self) -> None:
        """We stop the helper ourselves: the watchdog goes without killing anything
        (our child, unreaped: its pid is still its own)."""
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self._write_end)
