"""Published ports on a pasta network: the implicit port driver (pasta forwards by
itself), --port-driver=auto's choice, and builtin on pasta. Real pasta, real traffic.

Loopback only: the servers listen on the child's 127.0.0.1 and every client connects
to the host's 127.0.0.1. No command here sends anything to the gateway, so the runs
with pasta's --no-map-gw (rootless-run's default --disable-host-loopback) send nothing
out (see test_network's docstring).
"""
import json
import os
import socket
import time
from types import SimpleNamespace

import pytest

from test_network import assert_one_line_error
from conftest import free_port, wait_for_api
from test_ports import api, exchange, until

# Echo servers in the child, on its 127.0.0.1: TCP (half-closes after EOF) and UDP.
ECHO_PY = '''
import socket, sys, threading
tcp_port, udp_port = int(sys.argv[1]), int(sys.argv[2])

def tcp():
    listener = socket.create_server(("127.0.0.1", tcp_port))
    while True:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", udp_port))
    while True:
        data, peer = s.recvfrom(65536)
        s.sendto(b"echo:" + data, peer)

if tcp_port:
    threading.Thread(target=tcp, daemon=True).start()
if udp_port:
    threading.Thread(target=udp, daemon=True).start()
threading.Event().wait()
'''
CHILD_TCP = 9000


@pytest.fixture
def echo_py(user, user_tmp):
    path = os.path.join(user_tmp, "echo.py")
    with open(path, "w") as f:
        f.write(ECHO_PY)
    os.chown(path, user.uid, user.gid)
    return path


@pytest.fixture
def start(user, rootless_run, state_dir, spawned, user_tmp):
    """start(flags, command): rootless-run in the background, once its API answers.
    Ended with SIGTERM at teardown: pasta, a daemon in its own session, is stopped by
    rootless-run on its way out (a SIGKILL of rootless-run leaves it running)."""
    procs = []

    def start(flags, command):
        proc = user.popen([rootless_run, f"--state-dir={state_dir}", *flags, "--", *command],
                          env={"TMPDIR": user_tmp})
        spawned.append(proc)
        procs.append(proc)
        sock = wait_for_api(proc, state_dir)
        return SimpleNamespace(proc=proc, sock=sock, state_dir=state_dir)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()  # setpriv has exec'd: this is rootless-run
            proc.wait(timeout=10)


def udp_exchange(port: int, payload: bytes, timeout: float = 1.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, ("127.0.0.1", port))
        return s.recvfrom(65536)[0]


def info(user, inst) -> dict:
    status, body = api(user, inst.sock, "GET", "/v1/info")
    assert status == 200, body
    return json.loads(body)


def host_listeners(port: int) -> list[str]:
    """Local addresses listening on TCP `port` on the host (any process)."""
    out = []
    for path, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        with open(path) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hexport = local.partition(":")
                if state == "0A" and int(hexport, 16) == port:
                    out.append(f"v{family}:{address}")
    return out


# -- -p through pasta's own forwarding ---------------------------------------------------

def test_publish_tcp_and_udp(user, start, echo_py):
    tcp, udp = free_port(), free_port()  # UDP keeps its number: see the bad input below
    inst = start(["--net=pasta", "--port-driver=implicit",
                  "-p", f"127.0.0.1:{tcp}:{CHILD_TCP}/tcp",
                  "-p", f"127.0.0.1:{udp}:{udp}/udp"],
                 ["python3", echo_py, str(CHILD_TCP), str(udp)])
    payload = os.urandom(1 << 20)
    assert until("TCP echo through pasta", lambda: exchange(tcp, b"ping", timeout=2)) == b"ping"
    assert exchange(tcp, payload) == payload
    assert until("UDP echo through pasta", lambda: udp_exchange(udp, b"hi")) == b"echo:hi"
    for i in range(20):
        assert udp_exchange(udp, b"%d" % i, timeout=3) == b"echo:%d" % i
    # pasta listens exactly where -p said: the host's 127.0.0.1 only
    assert host_listeners(tcp) == ["v4:0100007F"]
    # the API lists the -p ports, as given
    status, body = api(user, inst.sock, "GET", "/v1/ports")
    assert status == 200
    assert json.loads(body) == [
        {"id": 1, "spec": {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": tcp,
                           "childPort": CHILD_TCP}},
        {"id": 2, "spec": {"proto": "udp", "parentIP": "127.0.0.1", "parentPort": udp,
                           "childPort": udp}}]
    assert info(user, inst)["portDriver"] == {"driver": "implicit",
                                              "protos": ["tcp", "tcp4", "udp", "udp4"]}
    # pasta's ports close with the run
    inst.proc.terminate()
    assert inst.proc.wait(timeout=10) in (0, 143)
    until("port closed after the run", lambda: not host_listeners(tcp))


def test_api_with_publish_rules(user, start, echo_py):
    tcp = free_port()
    inst = start(["--net=pasta", "--port-driver=implicit",
                  "-p", f"127.0.0.1:{tcp}:{CHILD_TCP}/tcp"],
                 ["python3", echo_py, str(CHILD_TCP), "0"])
    new = {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": free_port(),
           "childPort": CHILD_TCP}
    status, body = api(user, inst.sock, "POST", "/v1/ports", new)
    assert status == 400, body
    assert "--port-driver=builtin" in json.loads(body)["message"]
    # the same port as a -p one: a conflict
    status, body = api(user, inst.sock, "POST", "/v1/ports", {**new, "parentPort": tcp})
    assert status == 409, body
    status, body = api(user, inst.sock, "DELETE", "/v1/ports/1")
    assert status == 400, body
    assert "--port-driver=builtin" in json.loads(body)["message"]
    assert api(user, inst.sock, "DELETE", "/v1/ports/7")[0] == 404
    assert len(json.loads(api(user, inst.sock, "GET", "/v1/ports")[1])) == 1
    # and the -p port still works
    assert until("TCP echo", lambda: exchange(tcp, b"ping", timeout=2)) == b"ping"


# -- pasta's automatic forwarding (no -p) ------------------------------------------------

def test_automatic_forwarding_of_a_port_bound_later(user, start, echo_py, user_tmp):
    port = free_port()
    trigger = os.path.join(user_tmp, "go")
    inst = start(["--net=pasta", "--disable-host-loopback=false", "--pasta-auto-forward"],
                 ["sh", "-c", f"while [ ! -e {trigger} ]; do sleep 0.05; done; "
                              f"exec python3 {echo_py} {port} 0"])  # auto: implicit
    assert info(user, inst)["portDriver"]["driver"] == "implicit"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    open(trigger, "w").close()
    t0 = time.monotonic()
    assert until("pasta forwarding the new port", lambda: exchange(port, b"ping", timeout=2),
                 timeout=10) == b"ping"
    print(f"forwarded {time.monotonic() - t0:.2f} s after the trigger")

    # The API: bookkeeping of what pasta does by itself (docker's proxy adds each port)
    spec = {"proto": "tcp", "parentIP": "0.0.0.0", "parentPort": port, "childPort": port}
    status, body = api(user, inst.sock, "POST", "/v1/ports", spec)
    assert status == 201, body
    added = json.loads(body)
    assert added["spec"] == spec
    assert api(user, inst.sock, "POST", "/v1/ports", {**spec, "proto": "tcp4"})[0] == 409
    status, body = api(user, inst.sock, "POST", "/v1/ports",
                       {**spec, "parentPort": 0, "childPort": port + 1})
    assert status == 201, body  # 0: the same number as the child's
    assert json.loads(body)["spec"]["parentPort"] == port + 1
    for bad, needle in (({**spec, "parentPort": port + 2}, "differs"),
                        ({**spec, "parentIP": "127.0.0.1"}, "all host addresses"),
                        ({**spec, "proto": "sctp"}, "sctp")):
        status, body = api(user, inst.sock, "POST", "/v1/ports", bad)
        assert status == 400, (bad, body)
        assert needle in json.loads(body)["message"]
    assert api(user, inst.sock, "DELETE", f"/v1/ports/{added['id']}")[0] == 200
    assert [p["id"] for p in json.loads(api(user, inst.sock, "GET", "/v1/ports")[1])] == \
        [added["id"] + 1]
    # asked for, so not said unless asked (--debug: test_auto_forward_is_said_under_debug)
    assert stop(inst) == ""


def test_auto_forward_is_said_under_debug(user, rootless_run):
    """What --pasta-auto-forward publishes (everything, 127.0.0.1 services included) is
    said in one line under --debug; a run without it prints nothing of ours."""
    flags = ["--net=pasta", "--disable-host-loopback=false", "--pasta-auto-forward"]
    quiet = user.run([rootless_run, *flags, "--", "true"])
    assert (quiet.returncode, quiet.stderr) == (0, "")
    r = user.run([rootless_run, "--debug", *flags, "--", "true"])
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "pasta publishes every" in line]
    assert len(said) == 1 and ": debug: " in said[0], r.stderr
    assert "its 127.0.0.1 services included, on all host IPv4 addresses" in said[0]


def stop(inst) -> str:
    """Stop the instance; what it wrote on stderr."""
    inst.proc.terminate()
    inst.proc.wait(timeout=10)
    return inst.proc.stderr.read()


@pytest.mark.parametrize("port_driver", ["auto", "implicit"])
def test_no_automatic_forwarding_unless_asked(user, start, echo_py, port_driver):
    """--disable-host-loopback=false with no -p used to turn on pasta's automatic
    forwarding silently: every port the command listens on, its 127.0.0.1 services
    included, on all host addresses. rootlesskit never does that implicitly."""
    port = free_port()
    inst = start(["--net=pasta", "--disable-host-loopback=false",
                  f"--port-driver={port_driver}"], ["python3", echo_py, str(port), "0"])
    # pasta found a new listener within 0.7-1.7 s when it forwarded: give it 5
    with pytest.raises(AssertionError, match="not within"):
        until("pasta forwarding the command's port", lambda: host_listeners(port), timeout=5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    driver = info(user, inst)["portDriver"]["driver"]
    lines = stop(inst).splitlines()
    if port_driver == "auto":  # builtin: the API can still publish it
        assert driver == "builtin" and lines == []
    else:
        assert driver == "implicit" and len(lines) == 1 and "forwards no port" in lines[0]


def test_implicit_without_host_loopback_and_without_publish(user, start):
    """Explicitly asked for: it runs, forwards nothing, and the API says why."""
    inst = start(["--net=pasta", "--port-driver=implicit"], ["sleep", "60"])
    status, body = api(user, inst.sock, "POST", "/v1/ports",
                       {"proto": "tcp", "parentPort": 18000, "childPort": 18000})
    assert status == 400, body
    message = json.loads(body)["message"]
    assert "--pasta-auto-forward" in message and "--port-driver=builtin" in message
    assert stop(inst).splitlines() == [
        "rootless-run: warning: --port-driver=implicit: pasta forwards no port (no -p, and "
        "--pasta-auto-forward is off); publish with -p, or use --port-driver=builtin to "
        "publish through the API"]


# -- --port-driver=auto on pasta -----------------------------------------------------------

@pytest.mark.parametrize("flags,expected", [
    (["-p", "127.0.0.1:{port}:9000/tcp"], "implicit"),
    (["--disable-host-loopback=false", "--pasta-auto-forward"], "implicit"),
    (["--disable-host-loopback=false"], "builtin"),  # no automatic forwarding unasked
    ([], "builtin"),  # implicit would forward nothing: builtin serves the API
], ids=["publish", "auto-forward", "host-loopback", "default"])
def test_auto_port_driver_on_pasta(user, start, flags, expected):
    flags = [f.format(port=free_port()) for f in flags]
    inst = start(["--net=pasta", *flags], ["sleep", "60"])
    assert info(user, inst)["portDriver"]["driver"] == expected


# -- builtin on pasta keeps working ---------------------------------------------------------

def test_builtin_on_pasta(user, start, echo_py):
    port = free_port()
    inst = start(["--net=pasta", "--port-driver=builtin", "-p",
                  f"127.0.0.1:{port}:{CHILD_TCP}/tcp"],
                 ["python3", echo_py, str(CHILD_TCP), "0"])
    assert info(user, inst)["portDriver"]["driver"] == "builtin"
    assert until("TCP echo through builtin", lambda: exchange(port, b"ping", timeout=2)) == \
        b"ping"
    payload = os.urandom(1 << 20)
    assert exchange(port, payload) == payload


# -- bad input: one line, exit 1 -------------------------------------------------------------

BAD = [  # (flags, what the error line names)
    (["--net=slirp4netns", "--port-driver=implicit"], ["--port-driver=implicit", "--net=pasta",
                                                       "--port-driver=builtin"]),
    (["--net=pasta", "--port-driver=implicit", "-p", "0:80/tcp"], ["parent port",
                                                                   "--port-driver=builtin"]),
    (["--net=pasta", "-p", "18000:80/tcp", "-p", "127.0.0.1:18000:81/tcp"],
     ["18000", "once per protocol"]),
    (["--net=pasta", "-p", "[::1]:18000:80/tcp6"], ["tcp6", "--ipv6"]),
    (["--net=pasta", "-p", "127.0.0.1:18000:10.9.9.9:80/tcp"], ["10.9.9.9",
                                                                "--port-driver=builtin"]),
    (["--net=pasta", "-p", "127.0.0.1:18000:80/sctp"], ["sctp", "not supported"]),
    (["--net=pasta", "-p", "127.0.0.1:18000:53/udp"], ["UDP", "53:53/udp"]),
    (["--net=pasta", "--pasta-auto-forward"], ["--pasta-auto-forward",
                                               "--disable-host-loopback=false"]),
    (["--net=pasta", "--pasta-auto-forward", "--disable-host-loopback=false",
      "-p", "127.0.0.1:18000:80/tcp"], ["--pasta-auto-forward", "-p", "drop one"]),
    (["--net=pasta", "--pasta-auto-forward", "--disable-host-loopback=false",
      "--port-driver=builtin"], ["--pasta-auto-forward", "--port-driver=implicit"]),
    (["--net=slirp4netns", "--pasta-auto-forward"], ["--pasta-auto-forward", "--net=pasta"]),
]


@pytest.mark.parametrize("flags,needles", [pytest.param(f, n, id=" ".join(f)) for f, n in BAD])
def test_bad_input(user, rootless_run, user_tmp, flags, needles):
    r = user.run([rootless_run, *flags, "--", "echo", "ran"], env={"TMPDIR": user_tmp})
    assert_one_line_error(r, *needles)
    assert "ran" not in r.stdout


def test_auto_forward_flag_in_help(user, rootless_run):
    r = user.run([rootless_run, "--help"])
    text = r.stdout.split("--pasta-auto-forward", 1)[1].split("\n  -", 1)[0]
    assert "ours, not rootlesskit's" in text and "127.0.0.1" in text
