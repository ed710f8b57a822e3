"""systemd integration, against the real pieces: socket activation by systemd's own
systemd-socket-activate, readiness to a unix datagram socket that plays systemd's side
(as sd_notify's receiver), and the units of contrib/systemd checked by systemd-analyze."""
import json
import os
import shutil
import signal
import socket
import time

import pytest

from conftest import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = os.path.join(HERE, "..", "contrib", "systemd")

needs_activate = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                    reason="systemd-socket-activate (package systemd) missing")


def connect(port: int, timeout: float = 10) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# The activated command: answers on fd 3 with what it was given, then waits for the
# client to hang up (so the test can look at the processes meanwhile).
SERVER = r"""
import json, os, socket
first = socket.socket(fileno=3)
second = socket.socket(fileno=4)
conn, _ = first.accept()
conn.sendall(json.dumps({
    "pid": os.getpid(),
    "env": {k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID")},
    "second": second.getsockname()[1],
}).encode() + b"\n")
conn.recv(1)
"""


@needs_activate
@pytest.mark.parametrize("flags", [[], ["--pidns"], ["--net=host"]],
                         ids=["default", "pidns", "net-host"])
def test_socket_activation(user, rootless_run, spawned, flags):
    first, second = free_port(), free_port()
    proc = user.popen(["systemd-socket-activate", "-l", f"127.0.0.1:{first}",
                       "-l", f"127.0.0.1:{second}", "--fdname=web:admin",
                       rootless_run, *flags, "--", "python3", "-c", SERVER])
    spawned.append(proc)
    with connect(first) as conn:
        conn.settimeout(20)
        reply = json.loads(conn.makefile().readline())
        # LISTEN_PID is the command's pid, as the command itself sees it.
        assert reply["env"] == {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:admin",
                                "LISTEN_PID": str(reply["pid"])}
        assert reply["second"] == second  # fd 4 is the second socket, in order
        if "--pidns" in flags:
            assert reply["pid"] != proc.pid
        # The activation sockets are for the command alone: no helper holds them.
        inode = os.readlink(f"/proc/{proc.pid}/fd/3")
        for pid, _, cmd in user.processes():
            if "slirp4netns" in cmd or "pasta" in cmd:
                fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                assert inode not in fds, f"{cmd} holds the activation socket"
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err


@needs_activate
def test_socket_activation_for_another_process_is_left_alone(user, rootless_run, user_tmp):
    """LISTEN_PID naming some other process: the fds are not ours to hand on, and the
    variables pass through untouched (sd_listen_fds in the command ignores them)."""
    r = user.run([rootless_run, "--net=none", "--", "sh", "-c",
                  'echo "$LISTEN_FDS $LISTEN_PID"; ls /proc/self/fd'],
                 env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[:2] == ["1", "1"]


class NotifyListener:
    """systemd's side of sd_notify: a unix datagram socket, with the senders'
    credentials (as systemd checks them for NotifyAccess)."""

    def __init__(self, directory: str, uid: int, gid: int):
        self.path = os.path.join(directory, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        os.chown(self.path, uid, gid)

    def receive(self, timeout: float = 20) -> tuple[dict, int]:
        """(the message's fields, the sender's pid)."""
        self.sock.settimeout(timeout)
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(payload[:4], "little")
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        return fields, pid

    def close(self):
        self.sock.close()


@pytest.fixture
def listener(user, user_tmp):
    lst = NotifyListener(user_tmp, user.uid, user.gid)
    yield lst
    lst.close()


def test_notify_ready_then_stopping(user, rootless_run, spawned, listener, user_tmp):
    port = free_port()
    marker = os.path.join(user_tmp, "env")
    proc = user.popen([rootless_run, "--notify=ready", "-p", f"127.0.0.1:{port}:80/tcp", "--",
                       "sh", "-c", f'echo "NOTIFY_SOCKET=$NOTIFY_SOCKET" > {marker}; '
                       f'exec sleep 31.5'], env={"NOTIFY_SOCKET": listener.path})
    spawned.append(proc)
    fields, sender = listener.receive()
    assert fields["READY"] == "1"
    assert fields["MAINPID"] == str(proc.pid) == str(sender)  # the supervisor, not the command
    # READY=1 means: the command has started and the published port listens.
    assert any(cmd == "sleep 31.5" for _, _, cmd in user.processes())
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with open(marker) as f:
        assert f.read() == "NOTIFY_SOCKET=\n"  # only the supervisor reports
    proc.send_signal(signal.SIGTERM)  # what systemctl stop sends
    fields, _ = listener.receive()
    assert fields == {"STOPPING": "1"}
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == ""


def test_notify_ready_without_systemd_is_quiet(user, rootless_run):
    r = user.run([rootless_run, "--notify=ready", "--net=none", "--", "true"])
    assert r.returncode == 0
    assert r.stderr == ""


def test_notify_ready_not_sent_when_setup_fails(user, rootless_run, listener):
    """A port that cannot be bound ends the run: no READY=1 before the error."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = user.run([rootless_run, "--notify=ready", "-p", f"127.0.0.1:{port}:80/tcp", "--",
                      "sleep", "10"], env={"NOTIFY_SOCKET": listener.path})
    assert r.returncode == 1
    listener.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        listener.sock.recv(4096)


def test_command_notifies_itself_from_its_netns(user, rootless_run, listener):
    """Without --notify, NOTIFY_SOCKET reaches the command: a daemon that speaks
    sd_notify (dockerd) reports through the namespaces (what NotifyAccess=all allows)."""
    r = user.run([rootless_run, "--", "sh", "-c",
                  'printf "READY=1\\nSTATUS=inside" | socat - "UNIX-SENDTO:$NOTIFY_SOCKET"'],
                 env={"NOTIFY_SOCKET": listener.path})
    assert r.returncode == 0, r.stderr
    fields, sender = listener.receive(timeout=5)
    assert fields == {"READY": "1", "STATUS": "inside"}
    assert sender > 0


def test_abstract_notify_socket_from_netns_is_warned(user, rootless_run):
    r = user.run([rootless_run, "--net=none", "--", "true"],
                 env={"NOTIFY_SOCKET": "@rootless-test-notify"})
    assert r.returncode == 0
    assert "abstract socket" in r.stderr and "--notify=ready" in r.stderr


# -- units ----------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("unit", ["docker-rootless.service", "rootless@.service"])
def test_units_verify(user, user_tmp, unit):
    """systemd-analyze parses the units as the user manager would: an unknown key or
    value, or a missing ExecStart binary, is reported on stderr."""
    name = unit.replace("@.", "@web.")  # a template is verified through an instance
    target = os.path.join(user_tmp, name)
    shutil.copy(os.path.join(UNITS, unit), target)
    os.chmod(user_tmp, 0o755)
    # systemd-analyze leaves a systemd/ dir in XDG_RUNTIME_DIR: give it one that goes
    # with the test's own dir, not the user's /run/user/UID.
    runtime = os.path.join(user_tmp, "runtime")
    os.mkdir(runtime, 0o700)
    os.chown(runtime, user.uid, user.gid)
    env = {"XDG_RUNTIME_DIR": runtime}
    r = user.run(["systemd-analyze", "--user", "verify", target], env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # The check can fail: a misspelt value is reported.
    with open(target) as f:
        text = f.read()
    with open(target, "w") as f:
        f.write(text.replace("KillMode=mixed", "KillMode=mixd"))
    r = user.run(["systemd-analyze", "--user", "verify", target], env=env)
    assert "KillMode" in r.stderr or "kill mode" in r.stderr
