"""systemd integration: socket activation passed through to the command, and readiness
(sd_notify) sent by the supervisor for commands that do not speak it themselves.

Socket activation (sd_listen_fds(3)): systemd hands us fds 3..3+LISTEN_FDS-1 with
LISTEN_PID = our pid. They are meant for the command, so the parent keeps them out of
the helpers it spawns (close-on-exec), and the command's process, forked from the
child, makes them inheritable again and sets LISTEN_PID to its own pid just before
exec, the one moment its pid is known and the environment still ours to write.

Readiness (sd_notify(3)): one datagram a state on the unix socket NOTIFY_SOCKET
names (a path, or "@name" for the abstract namespace).
"""
import os

from .. import _log

FIRST_ACTIVATION_FD = 3  # SD_LISTEN_FDS_START


def activation_fds(env: dict, supervisor_pid: int) -> int:
    """How many activation fds are ours to pass on: LISTEN_FDS when LISTEN_PID names
    the supervisor, else 0 (they were meant for another process, as sd_listen_fds
    would judge; the variables then pass through untouched)."""
    try:
        count = int(env.get("LISTEN_FDS", ""))
        ours = int(env.get("LISTEN_PID", "")) == supervisor_pid
    except ValueError:
        return 0
    return count if ours and count > 0 else 0


def hold_activation_fds() -> None:
    """Parent: keep the activation fds from the helpers it spawns (slirp4netns, pasta,
    newuidmap). The forked child still has them: fork keeps close-on-exec fds."""
    for fd in range(FIRST_ACTIVATION_FD, FIRST_ACTIVATION_FD + activation_fds(os.environ,
                                                                             os.getpid())):
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass  # not open: the command will find out, as it would under systemd


def pass_activation_fds(env: dict, count: int) -> None:
    """In the command's process, just before exec: the fds survive the exec and
    LISTEN_PID names the command (its pid as it sees it, in its pid namespace)."""
    for fd in range(FIRST_ACTIVATION_FD, FIRST_ACTIVATION_FD + count):
        try:
            os.set_inheritable(fd, True)
        except OSError:
            pass
    env["LISTEN_PID"] = str(os.getpid())


class Notifier:
    """--notify=ready: the supervisor tells systemd READY=1 (with MAINPID, itself) once
    the command runs with its network and ports, and STOPPING=1 when it ends.

    NOTIFY_SOCKET is taken out of the environment, so the command does not also
    report (with NotifyAccess=main systemd would reject and log each of its messages).
    """

    def __init__(self, address: str | None):
        self.address = address
        self._sent: set[str] = set()

    @classmethod
    def from_environment(cls) -> "Notifier":
        address = os.environ.pop("NOTIFY_SOCKET", None)
        if not address:
            _log.debug("--notify=ready: NOTIFY_SOCKET is not set (not run by systemd with "
                       "Type=notify): nothing to notify")
        return cls(address or None)

    def ready(self, status: str) -> None:
        self._send("READY=1", f"READY=1\nMAINPID={os.getpid()}\nSTATUS={status}")

    def stopping(self) -> None:
        if "READY=1" in self._sent:  # nothing to take back if we never said ready
            self._send("STOPPING=1", "STOPPING=1")

    def _send(self, key: str, message: str) -> None:
        if self.address is None or key in self._sent:
            return
        self._sent.add(key)
        import socket

        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(message.encode(), address)
        except OSError as exc:
            # Readiness is systemd's business: a lost message shows there as a start
            # time-out; the command itself is fine, so the run goes on.
            _log.warning(f"--notify: cannot send {key} to NOTIFY_SOCKET={self.address}: "
                         f"{exc.strerror or exc}")


def check_passthrough(config) -> None:
    """Without --notify=ready, NOTIFY_SOCKET reaches the command, which notifies by
    itself. An abstract socket ("@...") belongs to a network namespace: from a new
    one it cannot be reached, so say so now rather than let systemd time out."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@") and config.new_netns and not config.detach_netns:
        _log.warning(f"NOTIFY_SOCKET={address} is an abstract socket, which the command "
                     f"cannot reach from its network namespace: use --notify=ready, or a "
                     f"path socket")
