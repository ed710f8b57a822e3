"""The REST API against hostile and careless clients (issue 16): no request, no client
and no shortage may end the run or hang the API. Each case is a real instance as the
test user (slirp4netns, builtin port driver) and real traffic on its api.sock; Debian's
rootlesskit is the reference for what a request should get."""
import json
import os
import socket
import subprocess
import time

import pytest

from conftest import free_port, wait_for_api
from test_ports import api

HOST = b"Host: x\r\n"
CLOSE = b"Connection: close\r\n"


@pytest.fixture
def start(user, rootless_run, state_dir, spawned):
    """start(program=rootless_run): an instance that sleeps; returns (proc, api.sock),
    once the socket exists (no client has connected yet: the services are not loaded)."""
    def start(program=rootless_run, env=None):
        proc = user.popen([program, "--net=slirp4netns", "--port-driver=builtin",
                           f"--state-dir={state_dir}", "--", "sleep", "600"], env=env)
        spawned.append(proc)
        sock = os.path.join(state_dir, "api.sock")
        deadline = time.monotonic() + 20
        while not listening(sock):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "api.sock did not listen"
            time.sleep(0.02)
        return proc, sock
    return start


def listening(path: str) -> bool:
    """Whether a socket listens at `path`, seen without connecting to it."""
    with open("/proc/net/unix") as f:
        return any(len(fields) > 7 and fields[7] == path and fields[3] == "00010000"
                   for fields in map(str.split, f))


def send(sock: str, data: bytes, timeout: float = 5) -> bytes:
    """Send `data` on a new connection and read until the server closes it; a hang
    (no close within `timeout`) fails the test."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed: its answer is still there
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break  # closed with our unread bytes: after its answer
            except TimeoutError:
                raise AssertionError(f"no end of the answer within {timeout} s; got "
                                     f"{received[:200]!r}") from None
            if not chunk:
                break
            received += chunk
        return received


def responses(data: bytes, methods: list[str]) -> list[tuple[int, bytes]]:
    """(status, body) of each answer in `data`, to requests of `methods` in order
    (an answer to HEAD has no body); fails on anything that is not well-formed."""
    out = []
    pending = list(methods)
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"an answer without the end of its head: {head[:200]!r}"
        status_line, *lines = head.split(b"\r\n")
        version, status, _ = status_line.split(b" ", 2)
        assert version == b"HTTP/1.1", status_line
        headers = {name.lower(): value for name, _, value in
                   (line.partition(b": ") for line in lines)}
        status = int(status)
        if status < 200:  # 100 Continue: the final answer follows
            out.append((status, b""))
            continue
        length = 0 if pending.pop(0) == "HEAD" else int(headers[b"content-length"])
        body, data = data[:length], data[length:]
        assert len(body) == length, (status_line, body)
        out.append((status, body))
    return out


def served(sock: str) -> bool:
    r = send(sock, b"GET /v1/info HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n")
    return responses(r, ["GET"])[0][0] == 200


def request(method: str, target: str, body: bytes = b"", headers: bytes = b"") -> bytes:
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return (f"{method} {target} HTTP/1.1\r\n".encode() + HOST + CLOSE + length + headers
            + b"\r\n" + body)


def port_body(**spec) -> bytes:
    return json.dumps({"proto": "tcp", "parentIP": "127.0.0.1", "childPort": 80,
                       **spec}).encode()


# -- item 2: HEAD (and any method) never ends the run ---------------------------------

@pytest.mark.parametrize("path,status", [("/v1/info", 405), ("/v1/ports", 405),
                                         ("/v1/ports/1", 405), ("/nothing", 404)])
def test_head_is_answered_and_the_run_goes_on(user, start, path, status):
    """curl -I, as in the issue: rootlesskit answers 405 (404 off its routes), with no
    body; it used to end our run (h11 refused the body of the answer)."""
    proc, sock = start()
    r = user.run(["curl", "-sS", "-m", "5", "-I", "--unix-socket", sock, f"http://x{path}"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"HTTP/1.1 {status} "), r.stdout
    assert served(sock) and proc.poll() is None
    # HEAD then GET on one connection: two answers, the first without a body
    data = send(sock, b"HEAD /v1/info HTTP/1.1\r\n" + HOST + b"\r\n"
                + b"GET /v1/info HTTP/1.1\r\n" + HOST + CLOSE + b"\r\n")
    assert [s for s, _ in responses(data, ["HEAD", "GET"])] == [405, 200]
    assert proc.poll() is None
    assert proc_stderr(proc) == ""


def proc_stderr(proc) -> str:
    """What the instance wrote on stderr so far, once it is stopped."""
    proc.terminate()
    proc.wait(timeout=10)
    return proc.stderr.read()


# -- item 3: routing on the whole path --------------------------------------------------

# (target, status): none of these may remove a port. Port ids 1 and 2 exist.
NOT_A_REMOVAL = [
    ("/v1/ports/1/2", 404),          # the case: it removed port 2
    ("/v1/ports/2/", 404),
    ("/v1/ports/2/x", 404),
    ("/v1/ports//2", 404),
    ("//v1/ports/2", 404),
    ("/v1/ports/1%2F2", 404),        # %2F decodes to a separator, as in rootlesskit
    ("/v1/ports/+2", 400),
    ("/v1/ports/-2", 400),
    ("/v1/ports/%202", 400),
    ("/v1/ports/%D9%A2", 400),       # '٢': str.isdigit() and int() take it as 2
    ("/v1/ports/0", 404),
    ("/v1/ports/99999999999999999999", 400),  # beyond a Go int, as rootlesskit says
    ("/v1/ports/" + "9" * 5000, 400),         # int() refuses it: a 500 before
    ("/v1/ports/2x", 400),
    ("/v1/ports/2#x", 400),
    ("http://x/v1/ports/1/2", 404),
]


def test_delete_routes_on_the_whole_path(user, start):
    proc, sock = start()
    for _ in range(2):
        status, body = api(user, sock, "POST", "/v1/ports",
                           port_body(parentPort=free_port()).decode())
        assert status == 201, body
    for target, status in NOT_A_REMOVAL:
        answers = responses(send(sock, request("DELETE", target)), ["DELETE"])
        assert [s for s, _ in answers] == [status], (target, answers)
        assert json.loads(answers[0][1])["message"]
        listed = [p["id"] for p in json.loads(api(user, sock, "GET", "/v1/ports")[1])]
        assert listed == [1, 2], f"DELETE {target[:60]} removed a port"
    # the query is ignored and the path percent-decoded, as rootlesskit does
    for target, gone in (("/v1/ports/%32?id=1", 2), ("/v1/ports/1?x", 1)):
        answers = responses(send(sock, request("DELETE", target)), ["DELETE"])
        assert answers == [(200, b"")], (target, answers)
    assert api(user, sock, "GET", "/v1/ports")[1] == "[]"
    assert proc.poll() is None


@pytest.mark.parametrize("method,target,status", [
    ("GET", "/v1/info/", 404), ("GET", "/v1/info/x", 404), ("GET", "/v1/ports/", 404),
    ("GET", "/v1/info?x=1", 200), ("GET", "/v1/ports?x", 200), ("GET", "/v1/%69nfo", 200),
    ("GET", "/v1/ports/1", 405), ("POST", "/v1/info", 405), ("DELETE", "/v1/ports", 405),
    ("PUT", "/v1/ports/1", 405), ("HEAD", "/v1/info", 405), ("DELETE", "/v1/ports/x/1", 404),
])
def test_routes_as_rootlesskit(user, start, method, target, status):
    """The status Debian's rootlesskit 1.1 answers (checked against it by hand: the
    same requests, its api.sock)."""
    proc, sock = start()
    answers = responses(send(sock, request(method, target)), [method])
    assert [s for s, _ in answers] == [status], answers
    assert proc.poll() is None


# -- hostile clients: one well-formed answer each, 4xx for bad input -----------------

HOSTILE = [  # (what, request bytes, methods of the requests, statuses)
    ("huge header", b"GET /v1/info HTTP/1.1\r\n" + HOST + b"X: " + b"a" * 200000 + b"\r\n\r\n",
     ["GET"], [431]),
    ("20000 headers", b"GET /v1/info HTTP/1.1\r\n" + HOST
     + b"".join(b"X%d: y\r\n" % i for i in range(20000)) + b"\r\n", ["GET"], [431]),
    ("pipelined", request("GET", "/v1/info").replace(CLOSE, b"") * 2
     + request("GET", "/v1/ports"), ["GET"] * 3, [200, 200, 200]),
    ("chunked body", b"POST /v1/ports HTTP/1.1\r\n" + HOST + CLOSE
     + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n0\r\n\r\n", ["POST"], [400]),
    ("bad chunk", b"POST /v1/ports HTTP/1.1\r\n" + HOST + CLOSE
     + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", ["POST"], [400]),
    ("Content-Length beyond int64", request("POST", "/v1/ports").replace(
        CLOSE, CLOSE + b"Content-Length: 99999999999999999999\r\n"), ["POST"], [413]),
    ("Content-Length of 2 MiB, not sent", request("POST", "/v1/ports").replace(
        CLOSE, CLOSE + b"Content-Length: 2097152\r\n"), ["POST"], [413]),
    ("Content-Length of 5000 digits", request("POST", "/v1/ports").replace(
        CLOSE, CLOSE + b"Content-Length: " + b"9" * 5000 + b"\r\n"), ["POST"], [400]),
    ("body: a list", request("POST", "/v1/ports", b"[]"), ["POST"], [400]),
    ("body: a number", request("POST", "/v1/ports", b"7"), ["POST"], [400]),
    ("body: null", request("POST", "/v1/ports", b"null"), ["POST"], [400]),
    ("body: not JSON", request("POST", "/v1/ports", b"\xff\xfe{"), ["POST"], [400]),
    ("body: port as a string", request("POST", "/v1/ports", port_body(parentPort="80")),
     ["POST"], [400]),
    ("huge port", request("POST", "/v1/ports", port_body(parentPort=10**30)), ["POST"], [400]),
    ("port 70000", request("POST", "/v1/ports", port_body(parentPort=70000)), ["POST"], [400]),
    ("unicode digits in the proto", request("POST", "/v1/ports", json.dumps(
        {"proto": "tcp\u0664", "parentPort": 18000, "childPort": 80}).encode()),
     ["POST"], [400]),
    ("unicode digits in the IP", request("POST", "/v1/ports", port_body(
        parentIP="\u0661\u0662\u0667.0.0.1", parentPort=18000)), ["POST"], [400]),
    ("NUL in the IP", request("POST", "/v1/ports", port_body(
        parentIP="127.0.0.1\u0000", parentPort=18000)), ["POST"], [400]),
    ("non-ASCII target", "DELETE /v1/ports/\u0661 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
     ["DELETE"], [400]),
    ("absolute-form target", request("GET", "http://x/v1/info"), ["GET"], [200]),
    ("authority-form (CONNECT)", request("CONNECT", "x:80"), ["CONNECT"], [404]),
    ("unknown method", request("FOO", "/v1/info"), ["FOO"], [405]),
    ("no Host", b"GET /v1/info HTTP/1.1\r\n\r\n", ["GET"], [400]),
    ("not HTTP", b"BLAH\r\n\r\n", ["?"], [400]),
]


def test_hostile_requests_get_one_answer_each(start):
    proc, sock = start()
    failed = []
    for what, data, methods, statuses in HOSTILE:
        try:
            got = [s for s, _ in responses(send(sock, data), methods)]
        except (AssertionError, OSError, ValueError) as exc:
            got = f"{type(exc).__name__}: {str(exc)[:200]}"
        alive = proc.poll() is None and served(sock)
        if got != statuses or not alive:
            failed.append((what, got, "alive" if alive else "RUN ENDED"))
            if not alive:
                break
    assert not failed, failed
    assert proc_stderr(proc) == ""  # the client's fault: nothing to log


def test_expect_100_continue(start):
    """A client that waits for "100 Continue" before its body (curl does for a large
    one) gets it, then the answer; it used to wait until its own timeout."""
    proc, sock = start()
    body = port_body(parentPort=free_port())
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock)
        s.sendall(b"POST /v1/ports HTTP/1.1\r\n" + HOST + CLOSE + b"Expect: 100-continue\r\n"
                  + b"Content-Length: %d\r\n\r\n" % len(body))
        assert s.recv(65536).startswith(b"HTTP/1.1 100 "), "no 100 Continue"
        s.sendall(body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert [s for s, _ in responses(data, ["POST"])] == [201]
    assert proc.poll() is None


def test_slow_body(start):
    """A body sent a few bytes at a time is read whole; the API serves others meanwhile."""
    proc, sock = start()
    body = port_body(parentPort=free_port())
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(sock)
        s.sendall(b"POST /v1/ports HTTP/1.1\r\n" + HOST + CLOSE
                  + b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 8):
            s.sendall(body[i:i + 8])
            assert served(sock)
            time.sleep(0.05)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert [s for s, _ in responses(data, ["POST"])] == [201]
    assert proc.poll() is None


# -- item 4: a burst of clients, and out of fds -------------------------------------------

def test_a_burst_of_1000_half_sent_requests(start):
    """1000 clients connect at once (before the services load, the worst case) and hold
    a half-sent request: none is refused (the backlog was 128: EAGAIN), a normal
    request is still answered, and the run goes on."""
    proc, sock = start()
    time.sleep(0.3)  # past the services' grace: they load at the first client
    held, refused = [], 0
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(sock)
            except BlockingIOError:
                refused += 1
                s.close()
                continue
            held.append(s)
        assert refused == 0, f"{refused} of 1000 connections refused (EAGAIN)"
        for s in held:
            s.setblocking(True)
            s.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Half: ")
        assert served(sock)
        assert proc.poll() is None
    finally:
        for s in held:
            s.close()
    time.sleep(0.5)
    assert served(sock) and proc.poll() is None


def test_silent_clients_are_closed(start):
    """A client that connects and says nothing, or stops in the middle of a request's
    head, holds an fd of the parent: it is closed once ROOTLESS_API_TIMEOUT (60 s by
    default; 1 s here) passes, while a client that keeps asking is served all along."""
    proc, sock = start(env={"ROOTLESS_API_TIMEOUT": "1"})
    assert served(sock)  # the API has loaded
    silent, half = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    busy = socket.socket(socket.AF_UNIX)
    try:
        for s in (silent, half, busy):
            s.settimeout(10)
            s.connect(sock)
        half.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\n")
        start_time = time.monotonic()
        keep_alive = b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n"
        while time.monotonic() - start_time < 3:  # three times the timeout
            busy.sendall(keep_alive)
            assert busy.recv(65536).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.4)
        for s in (silent, half):  # EOF: closed by the server, with nothing sent
            assert s.recv(65536) == b""
        busy.sendall(keep_alive)
        assert busy.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in (silent, half, busy):
            s.close()
    assert proc.poll() is None


def lowest_free_fd(pid: int) -> int:
    fds = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in range(len(fds) + 1) if fd not in fds)


def set_soft_nofile(user, pid: int, soft: int | str) -> None:
    """prlimit as the user (root here lacks CAP_SYS_RESOURCE for another user's
    process; the owner may set its soft limit up to the hard one)."""
    r = user.run(["prlimit", "--pid", str(pid), f"--nofile={soft}:"])
    assert r.returncode == 0, r.stderr


def test_out_of_fds_new_clients_get_503_old_ones_go_on(user, start):
    proc, sock = start()
    hard = int(open(f"/proc/{proc.pid}/limits").read().split("Max open files")[1].split()[1])
    with socket.socket(socket.AF_UNIX) as old:
        old.settimeout(5)
        old.connect(sock)
        keep_alive = b"GET /v1/info HTTP/1.1\r\n" + HOST + b"\r\n"
        old.sendall(keep_alive)
        assert old.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.3)  # settled: nothing else opens fds meanwhile
        # no fd can be opened any more: the next one would be above the limit
        set_soft_nofile(user, proc.pid, lowest_free_fd(proc.pid))
        try:
            for _ in range(3):
                answers = responses(send(sock, request("GET", "/v1/info")), ["GET"])
                assert [s for s, _ in answers] == [503], answers
            old.sendall(keep_alive)
            assert old.recv(65536).startswith(b"HTTP/1.1 200 ")
            assert proc.poll() is None
        finally:
            set_soft_nofile(user, proc.pid, hard)
    assert served(sock) and proc.poll() is None
    lines = proc_stderr(proc).splitlines()
    assert len(lines) == 1 and "503" in lines[0] and "Traceback" not in lines[0], lines


# -- containment: the listener's failure ends the run, with one line ----------------------

def steal_fd(pid: int, path: str) -> socket.socket:
    """A duplicate of the listening socket at `path` in process `pid` (pidfd_getfd)."""
    import ctypes

    with open(f"/proc/{pid}/net/unix") as f:
        inode = next(fields[6] for fields in map(str.split, f)
                     if len(fields) > 7 and fields[7] == path and fields[5] == "01")
    fd = next(fd for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]")
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        stolen = libc.syscall(438, pidfd, int(fd), 0)  # SYS_pidfd_getfd
        if stolen < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=stolen)


def test_listener_failure_ends_the_run_with_one_line(start):
    """A listener shut down (by another process holding it) accepts no client ever
    again: the run cannot go on without its API, and says so. It used to spin at
    100% CPU on a listener that woke it for ever, the API dead and the run on."""
    proc, sock = start()
    assert served(sock)
    with steal_fd(proc.pid, sock) as listener:
        listener.shutdown(socket.SHUT_RDWR)
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the run went on with a dead API listener") from None
    lines = proc.stderr.read().splitlines()
    assert len(lines) == 1 and "API listener" in lines[0], lines
    assert code != 0
