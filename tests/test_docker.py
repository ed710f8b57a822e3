"""Rootless Docker through rootless-run, end to end, as a user runs it: Debian's
unchanged dockerd-rootless.sh through our docker-rootlesskit, and `rootless-run --
dockerd`. The image is a busybox rootfs made into an image with `docker import`:
nothing is pulled. Each test gets its own HOME and XDG_RUNTIME_DIR (dockerd's data and
sockets), removed afterwards; the harness kills whatever the test user left running.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

from conftest import VENV_BIN
from contrib.bench.docker_first_port import busybox_rootfs_tar
from conftest import free_port, thread_names
from test_ports import until
from test_ports_hardening import netns  # noqa: F401
from test_ports_udp import udp_ask
from test_subid import _assert_free
from test_systemd import NotifyListener

DOCKERD_ROOTLESS = "/usr/share/docker.io/contrib/dockerd-rootless.sh"
DOCKER = "/usr/bin/docker"  # Debian's client, of the daemon's version

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (shutil.which("dockerd", path="/usr/sbin:/usr/bin")
                            and os.path.exists(DOCKER) and os.path.exists(DOCKERD_ROOTLESS)),
                       reason="docker.io is not installed (contrib/setup.sh installs it)"),
]

PAGE = "hello from a rootless container\n"


@pytest.fixture(scope="module")
def image_tar():
    """A busybox rootfs (busybox, its libraries, a web page; socat and its libraries,
    for a UDP server) as a tar for docker import."""
    root = tempfile.mkdtemp(prefix="rlt-bbroot-")
    os.chmod(root, 0o755)
    tar = os.path.join(root, "busybox.tar")
    busybox_rootfs_tar(tar, PAGE, tuple(filter(None, [shutil.which("socat")])))
    yield tar
    shutil.rmtree(root)


@pytest.fixture
def docker_home(user):
    """HOME and XDG_RUNTIME_DIR of the test user for one dockerd: the data root
    (~/.local/share/docker) and docker.sock, gone after the test, whatever happened."""
    base = tempfile.mkdtemp(prefix="rlt-docker-")
    os.chmod(base, 0o755)
    home, runtime = os.path.join(base, "home"), os.path.join(base, "run")
    for path in (home, runtime):
        os.mkdir(path, 0o700)
        os.chown(path, user.uid, user.gid)
    yield {"HOME": home, "XDG_RUNTIME_DIR": runtime,
           "DOCKER_HOST": f"unix://{runtime}/docker.sock",
           "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(["rm", "-rf", base], check=False)


class Dockerd:
    def __init__(self, user, env, proc, log):
        self.user, self.env, self.proc, self.log = user, env, proc, log

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def docker(self, *args, input=None, timeout=60) -> subprocess.CompletedProcess:
        return self.user.run([DOCKER, *args], env=self.env, input=input, timeout=timeout)

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds until `docker info` answers."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"dockerd ended with {self.proc.returncode}: {self.output()[-3000:]}")
            if self.docker("info", "--format", "{{.ID}}", timeout=10).returncode == 0:
                return time.monotonic() - start
            time.sleep(0.1)
        pytest.fail(f"docker info did not answer within {timeout} s: {self.output()[-3000:]}")

    def stop(self, timeout: float = 30) -> tuple[int, str]:
        """SIGTERM to the supervisor, as systemctl stop: dockerd must shut down cleanly."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.output()


@pytest.fixture
def spawned(spawned):
    """conftest's, plus a graceful stop first: SIGTERM lets dockerd take its containers
    and shims down (they live in sessions of their own, out of reach of killpg)."""
    yield spawned
    for proc in spawned:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def start(user, env, spawned, argv, outer=()) -> Dockerd:
    # dockerd logs a lot: to a file, not a pipe nobody reads until the end
    log = os.path.join(os.path.dirname(env["HOME"]), f"dockerd-{len(spawned)}.log")
    with open(log, "w") as f:
        proc = user.popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, outer=outer)
    spawned.append(proc)
    return Dockerd(user, env, proc, log)


def serve_from_container(d: Dockerd, image_tar: str) -> int:
    """Import the image, run busybox httpd published on the host's 127.0.0.1, fetch the
    page from the host. Returns the host port."""
    r = d.user.run(["sh", "-c", f"{DOCKER} import - rlt-busybox < {image_tar}"], env=d.env)
    assert r.returncode == 0, r.stderr
    info = d.docker("info", "--format", "{{json .SecurityOptions}}")
    assert "rootless" in info.stdout, info.stdout
    port = free_port()
    r = d.docker("run", "-d", "--name", "web", "--stop-timeout", "1",
                 "-p", f"127.0.0.1:{port}:80", "rlt-busybox", "httpd", "-f", "-p", "80", "-h", "/www")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
                assert resp.read().decode() == PAGE
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    # curl too, as the user does
    r = subprocess.run(["curl", "-sS", "-m", "10", f"http://127.0.0.1:{port}/"],
                       capture_output=True, text=True)
    assert r.stdout == PAGE, r.stderr
    routes = d.docker("run", "--rm", "rlt-busybox", "ip", "route")
    assert routes.returncode == 0 and routes.stdout.startswith("default via"), routes
    return port


def test_dockerd_rootless_sh_through_docker_rootlesskit(user, docker_home, spawned, image_tar):
    """Debian's unchanged script finds our docker-rootlesskit first in PATH."""
    d = start(user, docker_home, spawned, [DOCKERD_ROOTLESS])
    d.wait_ready()
    supervisors = [cmd for _, _, cmd in user.processes()
                   if f"{VENV_BIN}/docker-rootlesskit" in cmd]
    assert supervisors, "dockerd-rootless.sh did not run through our docker-rootlesskit"
    serve_from_container(d, image_tar)
    code, err = d.stop()
    assert code == 0, err[-3000:]
    assert "Daemon shutdown complete" in err
    assert not os.path.exists(os.path.join(docker_home["XDG_RUNTIME_DIR"], "docker.sock"))


def test_rootless_run_dockerd(user, docker_home, spawned, image_tar, state_dir, user_tmp):
    """No flags: our defaults are what Docker needs. dockerd's own sd_notify READY=1
    reaches "systemd" through the namespaces; a second start reuses the state dir."""
    listener = NotifyListener(user_tmp, user.uid, user.gid)
    env = {**docker_home, "NOTIFY_SOCKET": listener.path}
    try:
        d = start(user, env, spawned, ["rootless-run", f"--state-dir={state_dir}", "--", "dockerd"])
        d.wait_ready()
        fields, _ = listener.receive(timeout=30)
        assert fields.get("READY") == "1", fields
    finally:
        listener.close()
    assert os.path.exists(os.path.join(docker_home["XDG_RUNTIME_DIR"], "docker.sock"))
    port = serve_from_container(d, image_tar)
    # dockerd's rootlesskit-docker-proxy published the port through our API.
    ports = user.run([f"{VENV_BIN}/rootless-ctl", "--socket", f"{state_dir}/api.sock",
                      "list-ports", "--json"])
    specs = [json.loads(line)["spec"] for line in ports.stdout.splitlines()]
    assert [(s["parentIP"], s["parentPort"]) for s in specs] == [("127.0.0.1", port)], specs
    code, err = d.stop()
    assert code == 0, err[-3000:]
    assert "Daemon shutdown complete" in err
    assert [l for l in err.splitlines() if l.startswith("rootless-run")] == []

    again = start(user, docker_home, spawned, ["rootless-run", f"--state-dir={state_dir}",
                                               "--", "dockerd"])
    again.wait_ready()
    r = again.docker("ps", "-a", "--format", "{{.Names}}")
    assert r.stdout.split() == ["web"]  # the same data, a fresh supervisor
    code, err = again.stop()
    assert code == 0, err[-3000:]


def test_udp_port_through_dockers_proxy(user, docker_home, spawned, image_tar, state_dir):
    """`docker run -p 127.0.0.1:P:5353/udp`: dockerd's rootlesskit-docker-proxy adds the
    UDP port through our API, and datagrams from the host reach the container and
    come back. The supervisor loads no trio for it (12 MiB: a UDP port did, until its
    flows moved to the ports' loop)."""
    if not shutil.which("socat"):
        pytest.skip("socat is not installed (contrib/setup.sh installs it): the image "
                    "has no UDP server without it")
    d = start(user, docker_home, spawned,
              ["rootless-run", f"--state-dir={state_dir}", "--", "dockerd"])
    d.wait_ready()
    r = d.user.run(["sh", "-c", f"{DOCKER} import - rlt-busybox < {image_tar}"], env=d.env)
    assert r.returncode == 0, r.stderr
    port = free_port(kind=socket.SOCK_DGRAM)
    r = d.docker("run", "-d", "--name", "echo", "--stop-timeout", "1",
                 "-p", f"127.0.0.1:{port}:5353/udp", "rlt-busybox",
                 "socat", "UDP4-RECVFROM:5353,fork", "PIPE")
    assert r.returncode == 0, r.stderr
    try:
        until("the UDP echo", lambda: udp_ask(port, b"ping", timeout=1) == b"ping", 20)
    except AssertionError:
        pytest.fail(f"no UDP echo through docker's proxy: {d.output()[-3000:]}")
    ports = user.run([f"{VENV_BIN}/rootless-ctl", "--socket", f"{state_dir}/api.sock",
                      "list-ports", "--json"])
    specs = [json.loads(line)["spec"] for line in ports.stdout.splitlines()]
    assert [(s["proto"], s["parentIP"], s["parentPort"]) for s in specs] == [
        ("udp4", "127.0.0.1", port)], specs  # the proxy asks for udp4 on an IPv4 address
    names = thread_names(d.proc.pid)  # setpriv execs: the Popen's pid is the parent's
    assert "rootless ports" in names and "rootless trio" not in names, names
    code, err = d.stop()
    assert code == 0, err[-3000:]
    assert [l for l in err.splitlines() if l.startswith("rootless-run")] == []


def test_port_published_on_ipv6_too(user, docker_home, spawned, image_tar, state_dir, netns):
    """`docker run -p P:80` publishes P on 0.0.0.0 and on [::]: a client of [::1]:P
    once ended the run (socket.SOL_IPV6 is not in Python 3.11), dockerd with it. In a
    netns of the test's own: nothing listens on the machine's network."""
    d = start(user, docker_home, spawned,
              ["rootless-run", f"--state-dir={state_dir}", "--", "dockerd"],
              outer=("nsenter", f"--net=/run/netns/{netns}"))
    d.wait_ready()
    r = d.user.run(["sh", "-c", f"{DOCKER} import - rlt-busybox < {image_tar}"], env=d.env)
    assert r.returncode == 0, r.stderr
    r = d.docker("run", "-d", "--name", "web", "--stop-timeout", "1", "-p", "18400:80",
                 "rlt-busybox", "httpd", "-f", "-p", "80", "-h", "/www")
    assert r.returncode == 0, r.stderr

    def page(host: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", netns, "curl", "-g", "-sS", "-m", "5",
                            f"http://{host}:18400/"], capture_output=True, text=True)
        return r.stdout
    deadline = time.monotonic() + 20
    while page("127.0.0.1") != PAGE:
        assert time.monotonic() < deadline, "the container's page never came"
        time.sleep(0.2)
    assert page("[::1]") == PAGE
    assert page("127.0.0.1") == PAGE
    assert d.proc.poll() is None, d.output()[-3000:]
    r = d.docker("ps", "--format", "{{.Names}} {{.Status}}")
    assert r.stdout.startswith("web Up"), r.stdout
    code, err = d.stop()
    assert code == 0, err[-3000:]
    assert [l for l in err.splitlines() if l.startswith("rootless-run")] == []


# -- preflight: what is missing is said before anything starts ------------------------

def _preflight(user, env, *args) -> str:
    r = user.run(["rootless-run", *args], env=env, timeout=20)
    assert r.returncode == 1, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("rootless-run: error: dockerd cannot run rootless here")
    return lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--net=host", "--", "dockerd"], "drop --net=host"),
    (["--copy-up=/etc", "--", "dockerd"], "add --copy-up=/run"),
])
def test_dockerd_preflight(user, docker_home, args, needle):
    assert needle in _preflight(user, docker_home, *args)


def sentences(line: str) -> list[str]:
    """The sentences after "dockerd cannot run rootless here. " (none of ours has a
    full stop followed by a space inside it)."""
    head = "rootless-run: error: dockerd cannot run rootless here. "
    assert line.startswith(head) and line.endswith("."), line
    return [s + "." for s in line[len(head):-1].split(". ")]


def test_dockerd_preflight_path_without_sbin(user, docker_home):
    env = {**docker_home, "PATH": f"{VENV_BIN}:/usr/bin:/bin"}
    line = _preflight(user, env, "--", "/usr/sbin/dockerd")
    assert sentences(line) == [
        "iptables, which dockerd needs for its NAT and port rules, is in /usr/sbin, a "
        "directory not in PATH: run `export PATH=$PATH:/usr/sbin:/sbin`."]


def test_dockerd_preflight_one_sentence_per_missing_thing(user, docker_home):
    """Everything missing at once: each is its own sentence, with what dockerd needs it
    for and the fix."""
    env = {**docker_home, "PATH": f"{VENV_BIN}:/usr/bin:/bin", "XDG_RUNTIME_DIR": "",
           "HOME": "/nonexistent"}
    line = _preflight(user, env, "--net=host", "--copy-up=/etc", "--", "/usr/sbin/dockerd")
    assert sentences(line) == [
        "--net=host leaves dockerd no network namespace to make its bridge and iptables "
        "rules in: drop --net=host (rootless-run then picks slirp4netns or pasta).",
        "/run is not writable in the namespace, and dockerd creates /run/docker there: add "
        "--copy-up=/run.",
        "iptables, which dockerd needs for its NAT and port rules, is in /usr/sbin, a "
        "directory not in PATH: run `export PATH=$PATH:/usr/sbin:/sbin`.",
        "XDG_RUNTIME_DIR is not set, and dockerd puts docker.sock there: log in through a "
        "session that sets it, or export XDG_RUNTIME_DIR to a private dir of yours.",
        "HOME=/nonexistent does not exist, and dockerd keeps its data in "
        "~/.local/share/docker: export HOME to your home directory."]


def test_dockerd_preflight_tool_not_found(user, docker_home):
    """A tool in no directory of PATH, nor in the sbin dirs: install it, or add its dir."""
    fakebin = tempfile.mkdtemp(prefix="rlt-fakebin-")
    try:
        os.chmod(fakebin, 0o755)
        for tool in ("setpriv", "newuidmap", "newgidmap", "getsubids", "slirp4netns"):
            os.symlink(shutil.which(tool), os.path.join(fakebin, tool))
        env = {**docker_home, "PATH": f"{VENV_BIN}:{fakebin}:/usr/sbin"}
        line = _preflight(user, env, "--", "/usr/sbin/dockerd")
    finally:
        shutil.rmtree(fakebin)
    assert sentences(line) == [
        "rootlesskit-docker-proxy, which publishes the containers' ports through our API, "
        "is not in PATH: as root, run `apt-get install rootlesskit`, or add its directory "
        "to PATH."]


def test_dockerd_preflight_without_subids(nosub_user, docker_home):
    line = _preflight(nosub_user, {"PATH": docker_home["PATH"]}, "--", "dockerd")
    [sentence] = sentences(line)
    found = re.fullmatch(r"(\S+) has no subordinate uids and gids, which the images' files "
                         r"need \(they have many owners\): as root, run: `usermod "
                         r"--add-subuids (\d+)-(\d+) --add-subgids \2-\3 (\S+)`\.", sentence)
    assert found and found[1] == found[4] == nosub_user.name, line
    _assert_free(int(found[2]), int(found[3]))  # not a range another user has
