"""Joining a running instance: `rootless-ctl enter` and `rootless-run --reuse`.

Once the command runs, the supervisor records in STATE/namespaces the identity
(device, inode) of each namespace the instance created. A joiner checks that an
instance holds STATE/lock, opens /proc/CHILD_PID/ns/* and compares what it opened
with that record before it joins anything, as snap-confine checks a preserved mount
namespace: a child_pid that is gone or now names another process is refused, never
joined. The opened fds are what it joins, so the check and the join see the same
namespaces even if the pid is reused in between.

setns into a user namespace is refused to a multi-threaded process: all of this runs
in the invoking process, which starts no thread, and imports nothing heavy (no trio,
msgspec, h11): it is on the path of every `rootless-ctl enter`.
"""
import errno
import os
import _signal as signal  # the C module: see _process.py
import time

from . import _log
from ._paths import which
from ._process import (FORWARDED_SIGNALS, PYTHON_IGNORED_SIGNALS, command_environment,
                       forward_signals, wait_for)
from .errors import EnterError, OutOfProcesses, StateDirError, StateDirLocked, UsageError
from .state.statedir import (NAMESPACE_KINDS, NAMESPACES, StateDirMissing, lock_held, open_existing,
                       parse_namespaces, read_small)

# How long `enter` waits for an instance that holds the lock but has not recorded its
# namespaces yet (it is starting); `--reuse` waits as long as a set-up may take.
ENTER_WAIT = 10.0
REUSE_WAIT = 60.0
_POLL = 0.005


# -- finding the instance ---------------------------------------------------------------

class _Stale(Exception):
    """The record and child_pid do not match: refused (or, for --reuse, waited out: a
    new instance may not have cleared what a killed one left yet)."""


def _open_dir(path: str) -> tuple[int, str]:
    """The fd and real path of the user's state dir at `path`, reached as the instance
    reached it (statedir: no symlink of another user, no dir others can change on the
    way): one line naming the problem otherwise."""
    try:
        return open_existing(path)
    except StateDirMissing:
        raise EnterError(f"state dir {path} does not exist: give the --state-dir of a "
                         f"running instance") from None
    except StateDirError as exc:
        raise EnterError(str(exc)) from None


def _read_record(dir_fd: int, path: str) -> dict[str, tuple[int, int]] | None:
    try:
        text = read_small(dir_fd, NAMESPACES)
    except OSError as exc:
        raise EnterError(f"cannot read {path}/{NAMESPACES}: {exc.strerror}") from None
    except ValueError:
        text = ""  # not ours: refused below
    if text is None:
        return None
    try:
        return parse_namespaces(text)
    except ValueError:
        raise EnterError(f"{path}/{NAMESPACES} is not a namespace record of rootless-run: "
                         f"restart the instance") from None


def _read_pid(dir_fd: int, path: str) -> int:
    try:
        text = read_small(dir_fd, "child_pid")
        pid = int(text) if text is not None and text.strip().isdigit() else 0
    except (OSError, ValueError):
        pid = 0
    if pid <= 0:
        raise _Stale(f"{path}/child_pid is missing or unreadable")
    return pid


def _open_namespaces(dir_fd: int, path: str, record: dict) -> list[tuple[str, int]]:
    """fds of the child's namespaces, in joining order, each checked against the
    record; namespaces we are in already (entering from inside) are left out."""
    pid = _read_pid(dir_fd, path)
    opened: list[tuple[str, int]] = []
    try:
        for kind in NAMESPACE_KINDS:
            if kind not in record:
                continue
            try:
                fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise _Stale(f"its child (pid {pid}, from {path}/child_pid) is gone") from None
            except PermissionError:
                raise _Stale(f"pid {pid} in {path}/child_pid is another user's process "
                             f"now") from None
            opened.append((kind, fd))
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != record[kind]:
                raise _Stale(f"pid {pid} in {path}/child_pid is not the instance's child "
                             f"any more (its {kind} namespace is not the one recorded at "
                             f"start)")
        to_join = []
        for kind, fd in opened:
            mine = os.stat(f"/proc/self/ns/{kind}")
            if (mine.st_dev, mine.st_ino) == record[kind]:
                os.close(fd)  # setns into our own user namespace would fail (EINVAL)
            else:
                to_join.append((kind, fd))
        return to_join
    except BaseException:
        for _, fd in opened:
            try:
                os.close(fd)
            except OSError:
                pass
        raise


def _find(dir_fd: int, path: str, timeout: float,
          patient: bool) -> list[tuple[str, int]] | None:
    """The namespaces of the instance running on `path`, checked; None if none runs.
    Waits up to `timeout` for one that is starting; with `patient`, also while the
    record does not match (a new instance clearing a killed one's files)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not lock_held(path, dir_fd):
                return None
        except OSError as exc:
            raise EnterError(f"cannot check {path}/lock: {exc.strerror}") from None
        record = _read_record(dir_fd, path)
        if record is not None:
            try:
                return _open_namespaces(dir_fd, path, record)
            except _Stale as exc:
                if not patient:
                    raise EnterError(f"the instance on {path} is stale: {exc}; not joining "
                                     f"(restart the instance)") from None
                why = f"its namespaces do not match its child_pid ({exc})"
        else:
            why = f"it has not recorded its namespaces ({path}/{NAMESPACES})"
        if time.monotonic() > deadline:
            raise EnterError(f"the instance on {path} holds the lock but {why} after "
                             f"{timeout:.0f} s: it is still starting, or it was not started "
                             f"by rootless-run (rootlesskit: use nsenter -t $(cat "
                             f"{path}/child_pid))")
        time.sleep(_POLL)


# -- joining and running ------------------------------------------------------------------

def _join(namespaces: list[tuple[str, int]]) -> None:
    from .linux import ns_owner_uid, setns

    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    for kind, fd in namespaces:
        if kind == "user" and ns_owner_uid(fd) != os.geteuid():
            raise EnterError(f"the instance's user namespace belongs to uid "
                             f"{ns_owner_uid(fd)}, not to you: you can enter only your own "
                             f"instances")
        try:
            setns(fd)
        except OSError as exc:
            raise EnterError(f"cannot join the instance's {kind} namespace: "
                             f"{os.strerror(exc.errno)}") from None
        os.close(fd)
    # setns(mnt) put us at the root of the instance's tree: back to the same path there.
    try:
        os.chdir(cwd)
    except OSError:
        _log.debug(f"{cwd} does not exist inside: working directory /")


def _run(command: list[str], env: dict[str, str]) -> int:
    """Spawn (so a joined pid namespace applies to it) and wait: the exit status, 128+N
    for death by signal N. posix_spawn (vfork and exec) rather than fork: it copies no
    page tables, the cost of fork that shows on this path. As with nsenter, a SIGKILL
    of ours leaves the command running (it has no parent-death signal)."""
    exe = command[0] if "/" in command[0] else which(command[0], env.get("PATH", os.defpath))
    # Held until the forwarder is in place; the command gets the mask we started with.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    try:
        if exe is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command[0])
        pid = os.posix_spawn(exe, command, env, setsigmask=mask,
                             setsigdef=FORWARDED_SIGNALS + PYTHON_IGNORED_SIGNALS)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        limit = OutOfProcesses.check(exc, repr(command[0]))
        if limit:  # nsenter's status for a command it cannot run
            raise EnterError(str(limit), exit_code=126) from None
        missing = exc.errno == errno.ENOENT
        raise EnterError(f"cannot run {command[0]!r}: "
                         f"{'command not found' if missing else os.strerror(exc.errno)}",
                         exit_code=127 if missing else 126) from None
    forward_signals(pid)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return wait_for(pid)


def _join_and_run(path: str, namespaces, command: list[str]) -> int:
    # The ids before joining: the instance's parent's, as its command sees them.
    env = command_environment(path, (os.geteuid(), os.getegid()))
    _join(namespaces)
    return _run(command, env)


def default_command() -> list[str]:
    return [os.environ.get("SHELL") or "/bin/sh"]


def enter(state_dir: str, command: list[str], wait: float = ENTER_WAIT) -> int:
    """`rootless-ctl enter`: run `command` in the instance running on `state_dir`."""
    dir_fd, path = _open_dir(os.path.abspath(state_dir))
    try:
        namespaces = _find(dir_fd, path, wait, patient=False)
    finally:
        os.close(dir_fd)
    if namespaces is None:
        raise EnterError(f"no instance is running on {path} (nobody holds {path}/lock): "
                         f"start one with rootless-run --state-dir {path} (or --reuse)")
    _log.debug(f"joining {', '.join(kind for kind, _ in namespaces)}")
    return _join_and_run(path, namespaces, command or default_command())


def reuse(config) -> int:
    """`rootless-run --reuse`: join the instance running on the state dir, else start
    one. The lock decides who starts; the others wait until its namespaces are
    recorded, then join."""
    from .parent.run import run

    path = os.path.abspath(config.state_dir)
    if config.name:  # the instance of that name, wherever its state dir is
        from .state.instances import find
        path = find(config.name) or path
    while True:
        try:
            dir_fd, real = open_existing(path)
        except StateDirMissing:
            dir_fd = -1  # none yet: run() makes it
        except StateDirError as exc:
            raise EnterError(str(exc)) from None
        if dir_fd >= 0:
            try:
                namespaces = _find(dir_fd, real, REUSE_WAIT, patient=True)
            finally:
                os.close(dir_fd)
            if namespaces is not None:
                _log.debug(f"--reuse: joining the instance on {real}")
                return _join_and_run(real, namespaces, list(config.command))
        try:
            return run(config)
        except StateDirLocked:
            _log.debug(f"--reuse: another instance took {path} first; joining it")


# -- rootless-ctl enter ---------------------------------------------------------------------

def main(argv: list[str], socket: str | None = None, name: str | None = None,
         state_dir: str | None = None) -> int:
    """`rootless-ctl [--socket PATH|--name NAME|--state-dir DIR] enter [--state-dir DIR |
    --name NAME] [--] [CMD ARGS...]`, parsed by hand: argparse alone costs more than the
    whole join. enter's own --state-dir or --name wins over the global options."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg in ("-h", "--help"):
            return -1  # the caller prints the help
        flag, eq, value = arg.partition("=")
        if flag in ("--state-dir", "--name"):
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{flag} needs a value ({flag[2:].upper().replace('-', '_')})")
                value, i = argv[i + 1], i + 1
            i += 1
            socket = None
            name, state_dir = (value, None) if flag == "--name" else (None, value)
        elif arg.startswith("-") and arg != "-":
            raise UsageError(f"unknown flag {arg} for enter (see rootless-ctl enter --help)")
        else:
            break
    from .state.instances import check_name, state_dir_for
    if name is not None:
        check_name(name)
    return enter(state_dir_for(name, state_dir, socket), argv[i:])
