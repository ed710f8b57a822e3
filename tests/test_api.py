"""The REST API on STATE/api.sock, through a real instance, as the test user: curl and
socat as clients, and Debian's rootlessctl."""
import json
import os
import socket
import time

import pytest

from conftest import rss_kib, thread_names


@pytest.fixture
def instance(user, rootless_run, state_dir, spawned):
    """A running instance (slirp4netns, builtin port driver) and its api.sock path."""
    def start(*flags):
        proc = user.popen([rootless_run, "--net=slirp4netns", f"--state-dir={state_dir}",
                           *flags, "--", "sleep", "60"])
        spawned.append(proc)
        sock = os.path.join(state_dir, "api.sock")
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "api.sock did not appear"
            time.sleep(0.02)
        return sock
    return start


def curl(user, sock, method, path, body=None):
    """(status, body) of one request; the host part of the URL is ignored by the server."""
    args = ["curl", "-s", "-w", "\n%{http_code}", "-X", method,
            "--unix-socket", sock, f"http://anyhost{path}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary", body]
    r = user.run(args)
    text, _, status = r.stdout.rpartition("\n")
    return int(status), text


def test_info(user, instance, state_dir):
    sock = instance("--port-driver=none")
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    status, body = curl(user, sock, "GET", "/v1/info")
    assert status == 200
    info = json.loads(body)
    assert info["apiVersion"] == "1.1.1" and info["stateDir"] == state_dir
    with open(os.path.join(state_dir, "child_pid")) as f:
        assert info["childPID"] == int(f.read())
    assert info["networkDriver"] == {"driver": "slirp4netns", "dns": ["10.0.2.3"],
                                     "childIP": "10.0.2.100"}
    assert "portDriver" not in info


def test_info_port_driver(user, instance):
    sock = instance()  # rootless-run's default: --port-driver=auto, builtin with a netns
    info = json.loads(curl(user, sock, "GET", "/v1/info")[1])
    assert info["portDriver"] == {"driver": "builtin",
                                  "protos": ["tcp", "tcp4", "tcp6", "udp", "udp4", "udp6"]}


def test_ports_without_port_driver(user, instance):
    sock = instance("--port-driver=none")
    assert curl(user, sock, "GET", "/v1/ports") == (200, "[]")
    status, body = curl(user, sock, "POST", "/v1/ports",
                        '{"proto":"tcp","parentIP":"127.0.0.1","parentPort":18999,"childPort":80}')
    assert status == 400 and "--port-driver=builtin" in json.loads(body)["message"]


@pytest.mark.parametrize("method,path,body,status", [
    ("POST", "/v1/ports", "garbage", 400),
    ("POST", "/v1/ports", '{"proto":"tcp"}', 400),
    ("DELETE", "/v1/ports/99", None, 404),
    ("DELETE", "/v1/ports/abc", None, 400),
    ("GET", "/v1/nothing", None, 404),
    ("PUT", "/v1/info", None, 405),
])
def test_bad_requests_get_error_bodies(user, instance, method, path, body, status):
    sock = instance()
    got, text = curl(user, sock, method, path, body)
    assert got == status
    assert json.loads(text)["message"]
    assert curl(user, sock, "GET", "/v1/ports")[0] == 200  # the server lives on


def test_malformed_http_gets_400_and_server_survives(user, instance):
    sock = instance()
    r = user.run(["sh", "-c", f"printf 'BLAH\\r\\n\\r\\n' | socat -t 2 - UNIX-CONNECT:{sock}"])
    assert r.stdout.startswith("HTTP/1.1 400"), r.stdout
    r = user.run(["sh", "-c", f"head -c 3000000 /dev/zero | socat -t 2 - UNIX-CONNECT:{sock}"])
    assert curl(user, sock, "GET", "/v1/info")[0] == 200


def test_client_gone_in_mid_request_does_not_end_the_server(user, instance):
    """A client that closes after part of a request (rootlesskit-docker-proxy does when
    its docker-proxy cannot start) gets no answer, and the run goes on."""
    sock = instance()
    for _ in range(3):
        r = user.run(["python3", "-c", f"""
import socket
s = socket.socket(socket.AF_UNIX)
s.connect({sock!r})
s.sendall(b"GET /v1/info HTTP/1.1\\r\\nHost: x\\r\\n")
s.close()
"""])
        assert r.returncode == 0, r.stderr
    time.sleep(0.2)
    assert curl(user, sock, "GET", "/v1/info")[0] == 200


def test_debian_rootlessctl_info(user, instance, state_dir):
    sock = instance()
    r = user.run(["rootlessctl", "--socket", sock, "info", "--json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stateDir"] == state_dir


def test_the_api_loads_at_its_first_client_and_without_trio(user, instance, spawned):
    """Without -p ports the parent loads nothing until a client connects: loading takes
    a CPU for a moment, and taken as the command started it stalled a command that
    kept every CPU busy. The client that wakes it is served (it waited in the socket's
    backlog), and the load shows in the parent's memory. The API, and the ports it
    adds (rootless Docker publishes every port so), TCP and UDP, run without trio,
    which weighs 12 MiB and made Docker's first `docker run -p` wait 60-130 ms for it:
    no thread of trio's, and less than its weight."""
    sock = instance()
    parent = spawned[-1].pid  # setpriv execs: the Popen's pid is rootless-run's parent
    time.sleep(0.5)  # well past the moment the services used to load
    idle = rss_kib(parent)
    assert "rootless router" not in thread_names(parent)
    assert curl(user, sock, "GET", "/v1/info")[0] == 200
    loaded = rss_kib(parent)
    assert loaded - idle > 1024, f"RSS {idle} KiB idle, {loaded} KiB after a request"
    assert "rootless router" in thread_names(parent)
    status, body = curl(user, sock, "POST", "/v1/ports", json.dumps(
        {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": 0, "childPort": 9}))
    assert status == 201, body
    port = json.loads(body)["spec"]["parentPort"]
    # its first client (nothing listens in the child: the relay closes it)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        assert client.recv(1) == b""
    names = thread_names(parent)
    assert "rootless ports" in names and "rootless trio" not in names, names
    served = rss_kib(parent)
    assert served - idle < 8 * 1024, f"RSS {idle} KiB idle, {served} KiB: trio loaded?"
    status, body = curl(user, sock, "POST", "/v1/ports", json.dumps(
        {"proto": "udp", "parentIP": "127.0.0.1", "parentPort": 0, "childPort": 9}))
    assert status == 201, body
    udp = json.loads(body)["spec"]["parentPort"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:  # its first client
        client.sendto(b"ping", ("127.0.0.1", udp))
    time.sleep(0.2)
    assert "rootless trio" not in thread_names(parent)
    assert rss_kib(parent) - idle < 8 * 1024, "trio (12 MiB) loaded for UDP?"
    status, body = curl(user, sock, "GET", "/v1/ports")
    assert status == 200 and [p["spec"]["proto"] for p in json.loads(body)] == ["tcp", "udp"]
