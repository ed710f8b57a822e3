"""Signal forwarding, waiting and the command's environment, shared by the parent, the
child, the pid-ns shim and `rootless-ctl enter`."""
import os
import select
import time
# The C module: the same functions and numbers as signal.py, without its enum wrappers
# (IntEnum for every signal and handler). Importing enum costs 1.5-2 ms, on the way to
# every command; the modules on that path import _signal under this name too.
import _signal as signal

# What a supervisor passes on to the process it runs. Not SIGCHLD (ours), SIGPIPE,
# nor the job-control stops, which the terminal sends to the whole process group.
FORWARDED_SIGNALS = (
    signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGALRM, signal.SIGTERM, signal.SIGWINCH, signal.SIGCONT, signal.SIGPWR,
)

# Python ignores these at start-up; anything we exec must get the defaults back (Debian
# 12's pasta even refuses to start when it inherits SIGPIPE ignored).
PYTHON_IGNORED_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)

# The supervisor to the child, when the command has had its grace: kill the command's
# whole tree, then exit (the child is the subreaper of all of it). Real-time: no one
# sends it by accident, and before the child handles it, it kills the child.
KILL_TREE = signal.SIGRTMIN + 1

# The supervisor to the child, on the channel once the handshake is done: the bytes
# before it are the signals the run was sent during the set-up; each byte after it, a
# signal sent since (parent.Child.forward_noted). No signal is numbered 0.
END_OF_SET_UP = 0

# close_range(2) takes any upper bound; fds never reach this.
_MAX_FD = 1 << 30


def exit_code(status: int) -> int:
    """The shell's convention: the exit status, or 128+N for death by signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def signal_name(signum: int) -> str:
    """What Go calls signal `signum` (rootlesskit's words, which scripts grep for):
    glibc's description, lower-cased ("user defined signal 1"); "signal 34" for the
    real-time ones, which Go does not name."""
    text = signal.strsignal(signum) if signum < 32 else None
    return text[0].lower() + text[1:] if text else f"signal {signum}"


def readable(fd: int, timeout: float | None) -> bool:
    """Whether `fd` becomes readable (or hung up) within `timeout` seconds (None: no
    limit). poll(2), not select(2): select cannot watch an fd above 1023, and a
    supervisor serving hundreds of connections has those."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else timeout * 1000))


def close_fds_except(*keep: int) -> None:
    """In a forked process that lives on (a helper, a watchdog, the pid-ns shim): close
    every fd it inherited but stdio and `keep`. Whatever the supervisor holds (sockets,
    pipes, the state dir's lock) must not outlive it in a process that has no use for
    it: a port would stay open, a pipe's reader would never see EOF."""
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, _MAX_FD)


def fork(what: str) -> int:
    """os.fork(), or errors.OutOfProcesses naming `what` when the user's limit of
    processes is what refused it."""
    try:
        return os.fork()
    except OSError as exc:
        from .errors import OutOfProcesses

        raise OutOfProcesses.check(exc, what) or exc from None


def forward_signals(pid: int, note=None) -> None:
    """Pass our FORWARDED_SIGNALS on to `pid`; `note(signum)` first, if given."""
    def forward(signum, _frame):
        if note is not None:
            note(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)


def restore_default_signals() -> None:
    """In a forked process about to exec: no Python handler nor ignore survives."""
    for sig in FORWARDED_SIGNALS + PYTHON_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def wait_for(pid: int, reap_all: bool = False) -> int:
    """Wait until `pid` ends and return its exit code; with `reap_all`, also reap
    every other child meanwhile (pid 1's duty). Signal handlers run during the wait."""
    return exit_code(wait_for_status(pid, reap_all))


def wait_for_status(pid: int, reap_all: bool = False) -> int:
    """wait_for(), but the raw wait status (exit code or signal). Not a blocking
    waitpid: a signal that landed just before it would be handled only once it returns
    (see signal_wakeup). A child's end wakes the poll through SIGCHLD's handler."""
    wakeup = signal_wakeup()
    signal.signal(signal.SIGCHLD, _on_child)
    while True:
        try:
            done, status = os.waitpid(-1 if reap_all else pid, os.WNOHANG)
        except ChildProcessError:
            return 1 << 8  # exit 1: already reaped elsewhere, cannot happen in our tree
        if done == pid:
            return status
        if done == 0:  # none ended: wait for a signal (SIGCHLD among them)
            readable(wakeup, None)
            drain(wakeup)


def _on_child(_signum, _frame) -> None:
    """SIGCHLD's handler: it does nothing, but with it the signal wakes signal_wakeup's
    pipe (the default disposition writes nothing)."""


# This process's wake-up pipe (read end) and the pid it was made in.
_wakeup = (-1, 0)


def signal_wakeup() -> int:
    """This process's wake-up pipe, to watch in every wait that has no end: Python's C
    handler writes a byte to it for each signal with a Python handler. Python runs
    handlers only between bytecodes, so a signal that lands after its last check and
    before a blocking poll(2) or wait4(2) is handled only when the call returns: for a
    wait without end, never (systemd's SIGTERM was lost this way, a stop in 50 to 100
    under load hung until TimeoutStopSec). With the pipe in the poll, it returns at
    once. Made in the main thread; a forked process makes its own (see _forget_wakeup)."""
    global _wakeup
    fd, pid = _wakeup
    if pid != os.getpid():
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        _wakeup = fd, pid = r, os.getpid()
    return fd


def drain(fd: int) -> None:
    """Empty a non-blocking pipe (signal_wakeup's)."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _forget_wakeup() -> None:
    """In a forked process: the wake-up pipe is its parent's (a signal of ours would
    wake the parent's wait, and the parent could drain our byte). Close our copies
    and let signal_wakeup make our own when we wait. Python's wakeup fd must not stay
    set either: once its number is reused, each signal writes a byte into that fd."""
    global _wakeup
    if _wakeup[1]:
        write_end = signal.set_wakeup_fd(-1)
        for fd in (_wakeup[0], write_end):
            try:
                os.close(fd)
            except OSError:
                pass
        _wakeup = (-1, 0)


os.register_at_fork(after_in_child=_forget_wakeup)


def kill_user_namespace(ns_fd: int) -> None:
    """SIGKILL every process in the user namespace open as `ns_fd` until none is left:
    what the child could not kill, dead before it could (the command's tree,
    reparented to init). As the namespace's owner we may signal them all, whatever
    ids they took in it. Held open, the namespace cannot be freed and its inode
    number given to another one meanwhile."""
    ns = os.fstat(ns_fd)
    for _ in range(100):  # each pass kills what the last one's victims forked
        found = [pid for pid in _live_pids() if _in_namespace(pid, ns)]
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)  # they die meanwhile


def _live_pids():
    """The pids of /proc that are not zombies (those are dead, waiting to be reaped)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if f.read().rpartition(b")")[2].split()[0] not in (b"Z", b"X"):
                        yield int(entry)
            except (OSError, IndexError):
                pass


def _in_namespace(pid: int, ns: os.stat_result) -> bool:
    try:
        st = os.stat(f"/proc/{pid}/ns/user")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (ns.st_dev, ns.st_ino)


def command_environment(state_dir: str, parent_ids: tuple[int, int]) -> dict[str, str]:
    """What the command sees, started by the instance or entered later."""
    env = dict(os.environ)
    env["ROOTLESSKIT_STATE_DIR"] = state_dir
    env["ROOTLESSKIT_PARENT_EUID"] = str(parent_ids[0])
    env["ROOTLESSKIT_PARENT_EGID"] = str(parent_ids[1])
    return env
