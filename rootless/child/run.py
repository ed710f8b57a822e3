"""The child: runs in the forked process, creates the namespaces, completes the
handshake, prepares mounts and network, then runs and supervises the command.

No trio, ever: unshare(CLONE_NEWUSER) is refused in a multi-threaded process.
"""
import errno
import os
import time
import _signal as signal  # the C module: see _process.py

from .. import _log
from .._paths import which
from .._process import (END_OF_SET_UP, KILL_TREE, close_fds_except, command_environment, exit_code,
                       fork, forward_signals, readable, restore_default_signals, signal_name,
                       wait_for, wait_for_status)
from ..config import Config
from ..drivers import network
from ..errors import ChildSetupError, OutOfFds, ProtocolError, RootlessError
from ..linux import (CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID,
                    CLONE_NEWUSER, CLONE_NEWUTS, raise_fd_limit, set_child_subreaper,
                    set_parent_death_signal, setns, unshare)
from ..wire.framing import Channel
from . import mounts

# The parent answers in milliseconds; this only bounds a wedged parent.
_PARENT_TIMEOUT = 60.0
# How long a command dead of a signal waits for the parent's word on the set-up's signals
# (written as soon as the command starts; this only bounds a wedged parent).
_SET_UP_WORD_TIMEOUT = 2.0
# How long a command dead of a signal we were sent too waits for the parent's word on
# it: sent to the whole process group or cgroup (`kill -TERM -PGID`, systemd's stop of
# a unit), the parent was sent it as well, and says so within milliseconds.
_GROUP_WORD_TIMEOUT = 0.25

# Without --pidns, the parent's death reaches us as this catchable signal rather than
# SIGKILL: we must live long enough to kill the command's whole tree.
_PARENT_DIED = signal.SIGRTMIN

# A command's death by these is not said, as a shell does not: a Ctrl-C (which the
# terminal sends us too, so we may forward it before the parent can say the run was
# sent it) or a reader gone.
_NO_NEWS = {signal.SIGINT, signal.SIGPIPE}


def namespace_flags(config: Config) -> int:
    flags = CLONE_NEWUSER | CLONE_NEWNS
    for enabled, flag in ((config.child_netns, CLONE_NEWNET), (config.pidns, CLONE_NEWPID),
                          (config.cgroupns, CLONE_NEWCGROUP), (config.utsns, CLONE_NEWUTS),
                          (config.ipcns, CLONE_NEWIPC)):
        if enabled:
            flags |= flag
    return flags


def main(config: Config, state_dir: str, channel: Channel, parent_pid: int, ports,
         mask: set) -> None:
    """Entry point after fork; never returns. `ports`: the parent's port driver, as the
    fork left it; `mask`: the signal mask the command gets. The command's signals are
    blocked until then (see parent.Child.spawn)."""
    _log.set_role("child")
    code = 1
    try:
        code = _run(config, state_dir, channel, parent_pid, ports, mask)
    except RootlessError as exc:
        code = exc.exit_code
        _report(channel, str(exc), code)
    except BaseException as exc:  # the parent must hear of it, never a silent hang
        error = OutOfFds.check(exc) if isinstance(exc, OSError) else None
        _report(channel, str(error) if error else
                f"internal error in the child: {type(exc).__name__}: {exc}", 1)
    finally:
        os._exit(code)


def _report(channel: Channel, message: str, code: int) -> None:
    # A path from the command line may hold bytes that are not UTF-8 (as surrogates):
    # escaped, or msgspec could not send the message, and the cause would be lost.
    message = message.encode(errors="backslashreplace").decode()
    # Saying it takes fds (the message's import): the soft limit may be what ran out.
    raise_fd_limit()
    try:
        from ..wire.messages import ChildFailed
        channel.send(ChildFailed(message=message, exit_code=code))
    except OSError:
        _log.error(message)  # the parent is gone; stderr is all that is left


def _arm_parent_death_signal(parent_pid: int | None) -> None:
    set_parent_death_signal(signal.SIGKILL)
    # The parent may have died before the prctl: then nobody will signal us.
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _expect(channel: Channel, kind: str):
    """The next message, which must be of type `kind` (None if it carried no data)."""
    received = channel.recv(timeout=_PARENT_TIMEOUT)
    if received is None:
        os._exit(1)  # the parent closed the pipe: it has given up, and will reap us
    name, message = received
    if name != kind:
        raise ProtocolError(f"expected {kind} from the parent, got {name}")
    return message


def _run(config: Config, state_dir: str, channel: Channel, parent_pid: int, ports,
         mask: set) -> int:
    _arm_parent_death_signal(parent_pid)
    env = command_environment(state_dir, (os.geteuid(), os.getegid()))  # ids before unshare
    activation = 0
    if "LISTEN_FDS" in env:
        from ..integrations.systemd import activation_fds
        activation = activation_fds(env, parent_pid)
    try:
        unshare(namespace_flags(config))
    except OSError as exc:
        raise ChildSetupError(diagnose_unshare(exc)) from None
    watcher = parent_pid
    hello = "ChildHello"
    if config.pidns:
        from ..wire.messages import ChildHello
        # returns only in pid 1 of the new pidns, which anchors the namespaces
        hello = ChildHello(pid=_split_pid_namespace(mask))
        watcher = None  # our parent (the shim) is outside the pidns: getppid() says 0

    _expect(channel, "ParentHello")
    channel.send(hello)
    _expect(channel, "ParentInitIdmapCompleted")
    # newuidmap is setuid: after it ran on us, our parent-death signal is gone.
    _arm_parent_death_signal(watcher)

    mounts.set_up(config.propagation, config.child_netns, config.copy_up, state_dir)
    if "/run" in config.copy_up and os.path.basename(config.command[0]) == "dockerd":
        from ..integrations.docker import forget_host_runtime_dirs
        forget_host_runtime_dirs()
    netns = os.path.join(state_dir, "netns")
    if config.detach_netns:
        _in_subprocess(mounts.create_detached_netns, netns)
    channel.send("ChildInitUserNSCompleted")

    driver = network.get(config.net)
    completed = _expect(channel, "ParentInitNetworkDriverCompleted")
    info = completed.network if completed else None
    configure = driver.configure_child
    if config.detach_netns:
        # The detached netns is ours to configure, but not to live in: setns back to
        # the host's netns would be refused. A subprocess enters it instead.
        _in_subprocess(_configure_in, netns, configure, info)
    else:
        _configure(configure, info, config.net)
        if info is not None and info.dns:
            mounts.install_resolver_files(state_dir, info.dns)
    _expect(channel, "ParentInitPortDriverCompleted")
    if config.pidns:
        mounts.mount_proc()

    if not config.pidns:
        # Armed before the command exists: it may fork as soon as it starts.
        _kill_all_on_parent_death(parent_pid)
    pid = _start_command(config, env, mask, activation)
    # The signals held since the fork (or sent as the command started) go to it now.
    received: set[int] = set()
    forward_signals(pid, received.add)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    # After the command's fork (a thread, for the builtin driver), before the parent
    # can ask for anything: its services start once it hears ChildCommandStarted.
    ports.start_child(config, state_dir, netns if config.detach_netns else None)
    channel.send("ChildCommandStarted")
    status = wait_for_status(pid, reap_all=config.reap or not config.pidns)
    died_of = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    expected = _signals_sent_to_the_run(channel, bool(died_of),
                                        died_of if died_of in received else 0)
    # Ours closes before anything the command leaves dies, and before our exit hangs
    # up the socket factory's connection: the parent then knows that the run ends, and
    # not by a failure.
    channel.close()
    if not config.pidns:
        # As when a pid namespace's pid 1 exits: what the command left running dies with
        # the namespaces (their network is going now), instead of lingering outside.
        _kill_descendants()
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) not in expected | _NO_NEWS:
        # As rootlesskit says it (its tests grep for it): the signal's name, Go's way.
        _log.error(f"command [{' '.join(config.command)}] exited: signal: "
                   f"{signal_name(os.WTERMSIG(status))}")
    return exit_code(status)


def _signals_sent_to_the_run(channel: Channel, signaled: bool, also_got: int = 0
                             ) -> set[int]:
    """What the parent told us while the command ran (parent.Child.forward_noted): the
    signals the run was sent, one byte each; all of them when it closed its end, as
    it does when it stops the command itself. When the command died of a signal, the
    parent's word on the set-up's signals (up to END_OF_SET_UP) is waited for: one the
    run was sent during the set-up reached the command as it started, maybe before
    the parent could say so. `also_got`: the signal the command died of, when we were
    sent it too (and forwarded it): the parent's word on it is waited for a moment."""
    sent: set[int] = set()
    start = time.monotonic()
    deadline, group_deadline = start + _SET_UP_WORD_TIMEOUT, start + _GROUP_WORD_TIMEOUT
    while True:
        if signaled:
            wait = max(0.0, deadline - time.monotonic())
        elif also_got and also_got not in sent:
            wait = max(0.0, group_deadline - time.monotonic())
        else:
            wait = 0.0
        if not readable(channel.rfd, wait):
            return sent - {END_OF_SET_UP}
        data = os.read(channel.rfd, 64)
        if not data:
            return set(range(1, 65))
        sent.update(data)
        signaled = signaled and END_OF_SET_UP not in sent


def _configure(configure, info, driver: str) -> None:
    try:
        configure(info)
    except OSError as exc:
        raise ChildSetupError(f"cannot configure the {driver} network in the child: "
                              f"{exc}") from None


def _configure_in(netns: str, configure, info) -> None:
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    setns(fd, CLONE_NEWNET)
    os.close(fd)
    _configure(configure, info, "detached")


def _in_subprocess(function, *args) -> None:
    """Run function(*args) in a forked process; its RootlessError or OSError is ours."""
    rfd, wfd = os.pipe()
    pid = fork("a process of the child")
    if pid == 0:
        os.close(rfd)
        code = 0
        try:
            function(*args)
        except BaseException as exc:  # reported to our parent, which raises it
            os.write(wfd, str(exc).encode(errors="replace")[:4000])
            code = 1
        finally:
            os._exit(code)
    os.close(wfd)
    message = b""
    while chunk := os.read(rfd, 4096):
        message += chunk
    os.close(rfd)
    os.waitpid(pid, 0)
    if message:
        raise ChildSetupError(message.decode(errors="replace"))


def _kill_all_on_parent_death(parent_pid: int) -> None:
    """Without a pid namespace, whose end would kill them all, the command's children
    outlive it. So we adopt the command's orphans (its whole tree stays below us) and,
    when the parent dies, or tells us to (KILL_TREE, when the command did not stop on
    SIGTERM), kill every process below us, then exit."""
    set_child_subreaper()

    def on_parent_death(_signum=None, _frame=None):
        if os.getppid() != parent_pid:  # else a stray signal from the user: ignore it
            _kill_descendants()
            os._exit(1)

    def on_kill_tree(_signum, _frame):
        _kill_descendants()
        os._exit(128 + signal.SIGKILL)

    signal.signal(KILL_TREE, on_kill_tree)
    signal.signal(_PARENT_DIED, on_parent_death)
    set_parent_death_signal(_PARENT_DIED)
    on_parent_death()  # the parent may have died before the prctl


def _kill_descendants() -> None:
    """SIGKILL our children until none is left. As a subreaper we inherit the orphans
    of each process we kill before we can reap it, so every level is reached."""
    raise_fd_limit()  # reading /proc takes fds: the soft limit may be what ran out
    me = str(os.getpid())
    while True:
        for pid in _children(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _children(ppid: str) -> list[int]:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses.
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        if _parent_in_stat(text) == ppid:
            found.append(int(entry))
    return found


def _parent_in_stat(text: str) -> str | None:
    """The parent pid in the text of /proc/PID/stat."""
    fields = text.rpartition(")")[2].split()  # comm may hold ")": after the last one
    return fields[1] if len(fields) > 1 else None


def _split_pid_namespace(mask: set) -> int:
    """After unshare(CLONE_NEWPID) only our children enter the new pid namespace: fork
    its pid 1, which goes on with the set-up. We stay outside as a shim that forwards
    signals to it and exits with its status. Returns (in pid 1) its pid on the host.

    pid 1 of a pid namespace drops signals it has no handler for: it holds them
    blocked (as we do since the fork) until the command runs and it forwards them."""
    rfd, wfd = os.pipe()
    init = fork("the pid namespace's first process")
    if init:
        os.write(wfd, str(init).encode())
        close_fds_except()  # the channel, the activation fds: pid 1's, not the shim's
        forward_signals(init)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os._exit(wait_for(init))
    os.close(wfd)
    host_pid = int(os.read(rfd, 32))
    os.close(rfd)
    set_parent_death_signal(signal.SIGKILL)  # when the shim dies, the whole pidns goes
    return host_pid


def _start_command(config: Config, env: dict[str, str], mask: set, activation: int = 0) -> int:
    """fork + exec, with exec failures reported back over a close-on-exec pipe.
    `activation`: how many systemd socket-activation fds (3..) the command gets."""
    argv = list(config.command)
    rfd, wfd = os.pipe()
    me = os.getpid()
    pid = fork("the command")
    if pid == 0:
        try:
            os.close(rfd)
            restore_default_signals()
            signal.signal(_PARENT_DIED, signal.SIG_DFL)  # that handler is ours, not the command's
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # the mask we were started with
            set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != me:
                os._exit(1)
            exe = argv[0] if "/" in argv[0] else which(argv[0], env.get("PATH", os.defpath))
            if exe is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
            if activation:
                from ..integrations.systemd import pass_activation_fds
                pass_activation_fds(env, activation)
            os.execve(exe, argv, env)
        except OSError as exc:
            os.write(wfd, str(exc.errno).encode())
        finally:
            os._exit(127)
    os.close(wfd)
    data = os.read(rfd, 32)
    os.close(rfd)
    if data:
        os.waitpid(pid, 0)
        err = int(data)
        what = "command not found" if err == errno.ENOENT else os.strerror(err)
        raise ChildSetupError(f"cannot run {argv[0]!r}: {what}",
                              exit_code=127 if err == errno.ENOENT else 126)
    return pid


def diagnose_unshare(exc: OSError, sysctls: str = "/proc/sys") -> str:
    """Why unshare failed, and what to do about it, from the knobs that cause it."""
    checks = (
        ("kernel/unprivileged_userns_clone", b"0",
         "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0): "
         "as root, run: sysctl -w kernel.unprivileged_userns_clone=1"),
        ("user/max_user_namespaces", b"0",
         "user namespaces are disabled (user.max_user_namespaces=0): as root, run: "
         "sysctl -w user.max_user_namespaces=28633"),
        ("kernel/apparmor_restrict_unprivileged_userns", b"1",
         "AppArmor restricts unprivileged user namespaces "
         "(kernel.apparmor_restrict_unprivileged_userns=1): add an AppArmor profile for "
         "rootless-run that allows userns, or as root, run: sysctl -w "
         "kernel.apparmor_restrict_unprivileged_userns=0"),
    )
    for name, bad, message in checks:
        try:
            with open(f"{sysctls}/{name}", "rb") as f:
                if f.read().strip() == bad:
                    return message
        except OSError:
            pass
    if exc.errno == errno.ENOSPC:
        return ("cannot create a namespace: a namespace limit is reached "
                "(/proc/sys/user/max_*_namespaces)")
    if exc.errno == errno.EINVAL:
        return ("cannot create a user namespace: the process is multi-threaded or the kernel "
                "lacks CONFIG_USER_NS")
    return f"cannot create namespaces: {exc.strerror}"
