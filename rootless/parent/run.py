"""The parent: prepares, forks the child, drives the handshake and the drivers, and
supervises the child until the command ends.

The path to the user's command stays free of heavy imports: network helpers are
started and waited for with plain system calls, the API socket and the -p ports are
bound with the standard library before the command starts, and the parent then polls
the child and the parts the run cannot live without (see supervise.py).
"""
import os
import _signal as signal  # the C module: see _process.py

from .. import _log
from ..state import instances
from .._process import (END_OF_SET_UP, FORWARDED_SIGNALS, KILL_TREE, exit_code, fork,
                       forward_signals, kill_user_namespace, readable, wait_for_status)
from ..drivers._component import Component
from .supervise import supervise
from ..config import Config
from ..drivers import network, port
from ..errors import ChildSetupError, ProtocolError, RootlessError, StateDirError
from .idmap import write_maps
from ..wire.framing import Channel
from ..state.statedir import NAMESPACES, StateDir, record_namespaces
from ..subid import current_user, lookup

# Set-up in the child takes milliseconds (pyroute2's import is the slowest part);
# this only turns a wedged child into an error instead of a hang.
_CHILD_TIMEOUT = 60.0
# How long the child may take to kill the command's tree before it is killed itself.
_KILL_TREE_TIMEOUT = 5.0
# A step done on the child from outside failed (newuidmap, the network helper): how
# long a child that is dying may take to be gone, if its death is why.
_DYING = 0.1


class Child:
    """The forked child and our ends of its two pipes. The channel stays open while the
    command runs: the child closes its end as the command ends, and we close ours to
    tell it that we are stopping the command (see supervise.py). Its pidfd is opened
    at once and kept: what watches and stops it needs no new fd, even when the run
    is out of them."""

    def __init__(self, pid: int, channel: Channel, pidns: bool):
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)  # ours, unreaped: the pid is still its own
        self.channel = channel
        self.pidns = pidns
        self.status: int | None = None
        self.signal = 0  # the signal that killed it, once waited for
        self.userns = -1  # its user namespace, where the command's tree lives
        # Signals the run was sent (see forward_noted): told to the child once each,
        # those of the set-up once the handshake is done (the channel carries frames
        # until then).
        self._noted: set[int] = set()
        self._told: set[int] = set()
        self._telling = False

    def hold_userns(self, anchor: int) -> None:
        """Keep the namespaces' user namespace (that of `anchor`): if the child dies
        by a signal, what the command left is found there (see kill)."""
        self.userns = os.open(f"/proc/{anchor}/ns/user", os.O_RDONLY | os.O_CLOEXEC)

    @classmethod
    def spawn(cls, config: Config, state: StateDir, ports) -> "Child":
        to_child_r, to_child_w = os.pipe()
        to_parent_r, to_parent_w = os.pipe()
        parent_pid = os.getpid()
        ports.link_child()
        # A signal for the command may come at any time, before it exists: the child
        # holds it (blocked from its first instant) until the command runs. We forward
        # to the child from the moment it exists.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        try:
            pid = fork("the child process")
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (to_child_r, to_child_w, to_parent_r, to_parent_w):
                os.close(fd)
            raise
        if pid == 0:
            from ..child import run as child
            os.close(to_child_w)
            os.close(to_parent_r)
            state.close_lock_in_child()
            ports.forked(in_child=True)
            child.main(config, state.path, Channel(to_child_r, to_parent_w), parent_pid,
                       ports, mask)
        try:
            os.close(to_child_r)
            os.close(to_parent_w)
            ports.forked(in_child=False)
            child = cls(pid, Channel(to_parent_r, to_child_w), config.pidns)
            forward_signals(pid, child._note)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return child

    def send(self, message, doing: str) -> None:
        """Send the child `message` (see wire.framing.Channel.send) as the set-up goes on
        (`doing`, for the error if the child is gone)."""
        try:
            self.channel.send(message)
        except BrokenPipeError:
            raise self._gone(doing) from None

    def send_network(self, info, doing: str) -> None:
        try:
            self.channel.send_network(info)
        except BrokenPipeError:
            raise self._gone(doing) from None

    def expect(self, kind: str, waiting_for: str):
        """The child's next message, of type `kind` (None if it carried no data)."""
        try:
            received = self.channel.recv(timeout=_CHILD_TIMEOUT)
        except TimeoutError:
            raise ChildSetupError(f"the child did not answer within {_CHILD_TIMEOUT:.0f} s "
                                  f"({waiting_for})") from None
        if received is None:
            raise self._gone(waiting_for)
        name, message = received
        if name == "ChildFailed":
            self.wait()
            raise ChildSetupError(message.message, message.exit_code)
        if name != kind:
            raise ProtocolError(f"expected {kind} from the child, got {name}")
        return message

    def raise_if_gone(self, doing: str) -> None:
        """A step done on the child from outside failed: if the child died, that is
        the cause to report, not what failed on its pid."""
        if readable(self.pidfd, _DYING):
            raise self._gone(doing)

    def _gone(self, doing: str) -> ChildSetupError:
        """The child died during the set-up (killed, or out of memory): say how. Exit 1
        when it was killed, as when it is killed later (see supervise.py)."""
        code = self.wait()
        return ChildSetupError(f"the child {self.how()} during set-up ({doing})",
                               exit_code=1 if self.signal else code or 1)

    def wait(self) -> int:
        if self.status is None:
            status = wait_for_status(self.pid)
            self.status = exit_code(status)
            self.signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        return self.status

    def how(self) -> str:
        """How the child ended, in words (once waited for)."""
        if self.signal:
            return f"was killed by signal {self.signal}"
        return f"exited with status {self.status}"

    def stopping(self) -> None:
        """Tell the child that we stop its command: the command's death by our SIGTERM
        is then no news to report."""
        self.channel.close_write()

    def forward_noted(self) -> None:
        """Once the child has read its last frame (it said ChildCommandStarted): tell it
        (a byte on the channel, once per signal) which signals the run was sent, those
        held during the set-up first and then END_OF_SET_UP, then each as it comes,
        before it is forwarded. The command's death by one of those is what was asked
        for, no news to report; by another (sent to the command or the child alone, or
        the command's own) it is. END_OF_SET_UP lets the child wait for the first ones:
        its command may have died of them before we could tell it."""
        self._telling = True
        for signum in sorted(self._noted):
            self._tell(signum)
        try:
            os.write(self.channel.wfd, bytes([END_OF_SET_UP]))
        except OSError:
            pass  # the child is gone

    def _note(self, signum: int) -> None:
        """Before forwarding `signum` (a signal handler: main thread only)."""
        self._noted.add(signum)
        if self._telling:
            self._tell(signum)

    def _tell(self, signum: int) -> None:
        if signum in self._told or self.channel.wfd < 0:  # once: the pipe never fills
            return
        self._told.add(signum)
        try:
            os.write(self.channel.wfd, bytes([signum]))
        except OSError:
            pass  # the child is gone

    def kill_tree(self) -> None:
        """End the command's whole tree, then the child. Without a pid namespace only
        the child can: it is the subreaper of everything the command started, and
        SIGKILLed it would leave them to init. With one, the kernel does it when the
        namespace's pid 1 dies with the shim (its parent-death signal)."""
        try:
            if self.pidns:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                return
            signal.pidfd_send_signal(self.pidfd, KILL_TREE)
            if not readable(self.pidfd, _KILL_TREE_TIMEOUT):  # wedged: the last resort
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Make sure the child and the command's tree are gone (on errors); idempotent.
        A child killed by a signal (by someone, or as a last resort by kill_tree) did
        not kill the command's tree: its orphans went to init, out of our sight but
        in the user namespace."""
        if self.status is None:
            self.kill_tree()
            self.wait()
        if self.signal and self.userns >= 0:
            kill_user_namespace(self.userns)
        self.channel.close()
        for fd in (self.pidfd, self.userns):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.userns = -1


def run(config: Config) -> int:
    net_was_auto = config.net == "auto"
    if net_was_auto:
        name, why = network.choose_auto(config)
        _log.debug(f"--net=auto: using {name} ({why}; choose with --net=...)")
        config = config.replace(net=name)
    if config.port_driver == "auto":
        config = config.replace(port_driver=_auto_port_driver(config))
    uid, gid = os.getuid(), os.getgid()
    user = current_user()
    net = network.get(config.net)(config)
    ports = port.get(config.port_driver)(config)
    net.preflight()
    ports.preflight()
    subids = lookup(user, uid, config.subid_source)
    if _runs_dockerd(config):
        from ..integrations.docker import preflight
        preflight(config, subids, net_was_auto=net_was_auto)
    notifier = _systemd_setup(config)
    if config.evacuate_cgroup2:
        from ..integrations.cgroup import evacuate
        evacuate(config.evacuate_cgroup2)

    state = instances.open_state(config)
    status = 1  # the run's, for `rootless-ctl stop`: 1 unless the command's is known
    registration = None
    try:
        child = Child.spawn(config, state, ports)
        listeners = Listeners(ports)
        try:
            try:
                anchor, info = _handshake(config, state, child, net, ports, listeners, uid,
                                          gid, user, subids)
            except RootlessError:
                state.raise_if_removed()
                raise
            from .services import Services  # threading: not before the command runs

            services = Services(config, state, anchor, info, ports, listeners)
            services.start()
            registration = instances.register(config, state)  # for ps and stop
            try:
                if notifier:
                    services.started.wait(_CHILD_TIMEOUT)  # ports listen before READY=1
                    if not readable(services.failed_r, 0):
                        notifier.ready(f"running {config.command[0]}")
                child.status = supervise(child, [*net.helpers(), *ports.components(),
                                                 listeners.component(), services.component()])
            finally:
                if notifier:
                    notifier.stopping()
                services.stop()
            _log.debug(f"child exited with {child.status}")
            status = child.status
            return status
        finally:
            child.kill()
            listeners.close()
            net.stop()  # after the child: the command keeps its network to the end
    finally:
        if registration is not None:
            registration.close(status)  # before the lock goes: a new run may register
        state.close()
        _log.debug("state dir cleaned up")


class Listeners:
    """What listens before the command starts: the API socket and the port driver's -p
    ports, bound with the standard library (no trio, no h11 on the way to the
    command). A port that cannot be had is then an error before anything runs, and
    clients wait in the backlogs until the services load (services.py)."""

    def __init__(self, ports):
        self.ports = ports
        self.api = None
        self.path = ""
        self.early: list[int] | None = []

    def bind(self, state: StateDir) -> None:
        from ..api import listen

        self.early = self.ports.listen_early()
        self.path = state.file("api.sock")  # last: once it answers, the ports listen
        try:
            self.api = listen(self.path)
        except OSError as exc:
            raise StateDirError(f"cannot listen on {self.path}: {exc.strerror or exc}"
                                ) from None

    def component(self) -> Component:
        """The API listener: shut down (its socket hung up), the API is gone for good."""
        return Component(self.api.fileno(), lambda: (
            f"the API listener on {self.path} was shut down while the command was "
            f"running; stopping the command"))

    def close(self) -> None:
        self.ports.close_early()
        if self.api is not None:
            self.api.close()


def _runs_dockerd(config: Config) -> bool:
    return os.path.basename(config.command[0]) == "dockerd"


def _systemd_setup(config: Config):
    """Socket activation and readiness (see _systemd); imported only when in use."""
    env = os.environ
    if "LISTEN_FDS" in env or "NOTIFY_SOCKET" in env or config.notify != "none":
        from ..integrations import systemd as _systemd
        _systemd.hold_activation_fds()
        if config.notify == "ready":
            return _systemd.Notifier.from_environment()
        _systemd.check_passthrough(config)
    return None


def _auto_port_driver(config: Config) -> str:
    """--port-driver=auto: pasta's own forwarding (implicit) when it can forward
    something here, else builtin, which serves any netns; none without a netns."""
    if config.net == "host":
        return "none"
    if config.net == "pasta":
        from ..drivers.port.implicit import can_forward
        if can_forward(config):
            return "implicit"
    return "builtin"


def _handshake(config, state, child, net, ports, listeners, uid, gid, user, subids):
    """Drive the child to its command; returns (its anchor pid, the NetworkInfo)."""
    _log.debug(f"child {child.pid} forked")
    child.send("ParentHello", "creating namespaces")
    hello = child.expect("ChildHello", "creating namespaces")
    anchor = hello.pid if hello and hello.pid else child.pid
    state.write("child_pid", str(anchor))
    child.hold_userns(anchor)
    state.hold_userns(anchor)  # to remove what the command leaves owned by subids
    try:
        write_maps(anchor, uid, gid, subids, user)
    except RootlessError:
        child.raise_if_gone("writing the id maps")
        raise
    _log.debug("uid/gid maps written")
    child.send("ParentInitIdmapCompleted", "setting up mounts")
    child.expect("ChildInitUserNSCompleted", "setting up mounts")
    _log.debug("child mounts done")
    netns = None
    if config.detach_netns:
        # The netns is bind-mounted in the child's mount namespace, not in ours.
        netns = f"/proc/{anchor}/root{state.file('netns')}"
    try:
        info = net.start(anchor, state.path, netns)
    except RootlessError:
        child.raise_if_gone("starting the network")
        raise
    _log.debug(f"network {config.net} ready")
    listeners.bind(state)  # last: a client of api.sock finds the network up
    doing = "configuring the network"
    if info is None:
        child.send("ParentInitNetworkDriverCompleted", doing)
    else:
        child.send_network(info, doing)
    opaque = ports.opaque()
    if opaque:
        from ..wire.messages import ParentInitPortDriverCompleted
        child.send(ParentInitPortDriverCompleted(opaque=opaque), doing)
    else:
        child.send("ParentInitPortDriverCompleted", doing)
    child.expect("ChildCommandStarted", "starting the command")
    child.forward_noted()
    _record_namespaces(state, anchor)
    _log.debug(f"command started; child pid {anchor}")
    return anchor, info


def _record_namespaces(state: StateDir, anchor: int) -> None:
    """Written last: `enter` and `--reuse` join once it exists. The command runs by
    now and the state dir is also its own (it may remove it at once): a failure to
    write is a warning that the instance cannot be joined, never the end of the run."""
    namespaces = record_namespaces(anchor)
    if namespaces is None:
        return
    try:
        state.write(NAMESPACES, namespaces)
    except StateDirError as exc:
        if state.removed():  # by the command, most likely: its business, not a fault
            _log.debug(f"state dir {state.path} was removed: no namespaces record")
        else:
            _log.warning(f"{exc}: `rootless-ctl enter` and --reuse cannot join this run")


__all__ = ["run", "Child", "exit_code"]
