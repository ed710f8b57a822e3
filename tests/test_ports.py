"""Published ports through the builtin port driver, with real traffic.

rootless-run --net=slirp4netns --port-driver=builtin runs as the test user; its command
runs servers on the child's loopback (busybox httpd and small Python servers); clients connect to the host's loopback. Loopback only, on both sides: every
published spec has parent IP 127.0.0.1 (or ::1) and every client connects there.
"""
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import free_port, has_ipv6_loopback, wait_for_api, write_user_files

# The servers in the child (all on its 127.0.0.1)
HTTP = 8080      # busybox httpd serving TMP/www
ECHO = 9000      # echoes; half-closes once it has seen EOF and sent everything back
COLLECT = 9001   # reads to EOF, then answers "N SHA256\n" and closes
SPEAK = 9002     # says "hello\n", half-closes, reads to EOF, writes "N SHA256" to a file
NOTHING = 9999   # nothing listens there

FILE_TEXT = "the file's content\n"

SERVERS_PY = f'''
import hashlib, socket, sys, threading

def serve(port, handler):
    listener = socket.create_server(("127.0.0.1", port), backlog=256)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()

def drain(conn):
    digest, n = hashlib.sha256(), 0
    while True:
        data = conn.recv(65536)
        if not data:
            return n, digest.hexdigest()
        n += len(data)
        digest.update(data)

def echo(conn):
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(data)

def collect(conn):
    with conn:
        n, digest = drain(conn)
        conn.sendall(f"{{n}} {{digest}}\\n".encode())

def speak_first(conn):
    with conn:
        conn.sendall(b"hello\\n")
        conn.shutdown(socket.SHUT_WR)
        n, digest = drain(conn)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{{n}} {{digest}}\\n")
    import os
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])

# socat's echo listens with a backlog of 5: too few for the concurrent clients here
threading.Thread(target=serve, args=({ECHO}, echo), daemon=True).start()
threading.Thread(target=serve, args=({COLLECT}, collect), daemon=True).start()
serve({SPEAK}, speak_first)
'''


# -- helpers ------------------------------------------------------------------------------



def until(what: str, check, timeout: float = 5.0):
    """Poll `check` (OSError counts as "not yet") until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def exchange(port: int, payload: bytes, host: str = "127.0.0.1", timeout: float = 10) -> bytes:
    """Send `payload` (from a thread, so that a big one cannot deadlock against the
    echo), half-close, and return everything received until EOF."""
    with connect(port, host, timeout) as s:
        errors = []

        def send():
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send)
        sender.start()
        received = read_to_eof(s)
        sender.join()
        if errors:  # an OSError, as a failed connect: until() takes it for "not yet"
            raise errors[0]
        return received


def read_to_eof(s: socket.socket) -> bytes:
    chunks = []
    while True:
        data = s.recv(1 << 16)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def recv_exactly(s: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = s.recv(n - got)
        assert data, f"EOF after {got} of {n} bytes"
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def closed_within(s: socket.socket, seconds: float) -> bool:
    """Whether the peer ends the connection (EOF or reset) within `seconds`; data that
    arrives before is skipped."""
    s.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not s.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def http_get(port: int, path: str = "/file", host: str = "127.0.0.1",
             max_time: int = 3) -> bytes:
    """The body curl gets (as root, on the host); OSError when curl fails."""
    url = f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"
    r = subprocess.run(["curl", "-g", "-s", "-f", "-m", str(max_time), url],
                       capture_output=True, timeout=max_time + 10)
    if r.returncode != 0:
        raise OSError(f"curl {url}: exit {r.returncode}")
    return r.stdout


def api(user, sock: str, method: str, path: str, body=None) -> tuple[int, str]:
    """(status, body) of one request to the REST API, with curl as the test user."""
    args = ["curl", "-s", "-m", "3", "-w", "\n%{http_code}", "-X", method,
            "--unix-socket", sock, f"http://localhost{path}"]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary",
                 body if isinstance(body, str) else json.dumps(body)]
    r = user.run(args)
    text, _, status = r.stdout.rpartition("\n")
    return int(status), text


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))




# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture
def tmp(user, user_tmp):
    """The test user's dir with www/file (for httpd) and servers.py."""
    write_user_files(user, user_tmp, {"www/file": FILE_TEXT, "servers.py": SERVERS_PY})
    return user_tmp


def servers_command(tmp: str) -> list[str]:
    return ["sh", "-c",
            f"busybox httpd -f -p 127.0.0.1:{HTTP} -h {tmp}/www & "
            f"exec python3 {tmp}/servers.py {tmp}/received"]


@pytest.fixture
def instance(user, rootless_run, state_dir, spawned, tmp):
    """start(*specs, command=None): a running instance publishing `specs` (-p), its
    command the servers above unless given: .proc, .pid (of rootless-run: setpriv
    execs), .sock (api.sock), .tmp."""
    def start(*specs, command=None):
        args = [rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                f"--state-dir={state_dir}"]
        for spec in specs:
            args += ["-p", spec]
        proc = user.popen([*args, "--", *(command or servers_command(tmp))])
        spawned.append(proc)
        sock = wait_for_api(proc, state_dir)
        return SimpleNamespace(proc=proc, pid=proc.pid, sock=sock, tmp=tmp)
    return start


def wait_http(port: int, host: str = "127.0.0.1") -> None:
    until(f"httpd through port {port}", lambda: http_get(port, host=host) == FILE_TEXT.encode())


def wait_echo(port: int) -> None:
    until(f"echo through port {port}", lambda: exchange(port, b"ping", timeout=2) == b"ping")


# -- traffic through -p ports -------------------------------------------------------------

def test_http_through_published_port(instance):
    port = free_port()
    inst = instance(f"127.0.0.1:{port}:{HTTP}/tcp")
    big = os.urandom(20 << 20)
    path = os.path.join(inst.tmp, "www", "big")
    with open(path, "wb") as f:
        f.write(big)
    os.chmod(path, 0o644)
    wait_http(port)
    assert http_get(port) == FILE_TEXT.encode()
    got = http_get(port, "/big", max_time=10)
    assert len(got) == len(big)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(big).hexdigest()


def test_http_as_the_user(user, instance):
    port = free_port()
    instance(f"127.0.0.1:{port}:{HTTP}/tcp")
    wait_http(port)
    r = user.run(["curl", "-s", "-f", "-m", "3", f"http://127.0.0.1:{port}/file"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == FILE_TEXT


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_ipv6_parent_address(instance):
    port = free_port("::1")
    instance(f"[::1]:{port}:{HTTP}/tcp6")
    wait_http(port, host="::1")
    with pytest.raises(OSError):  # tcp6 on ::1: nothing on the IPv4 loopback
        connect(port, timeout=2).close()


def test_echo_one_megabyte(instance):
    port = free_port()
    instance(f"127.0.0.1:{port}:{ECHO}/tcp")
    wait_echo(port)
    payload = os.urandom(1 << 20)
    # sent, half-closed: the echo sees EOF only if our shutdown reached it, and we see
    # EOF only once it has sent the last byte back and half-closed too
    got = exchange(port, payload)
    assert len(got) == len(payload)
    assert got == payload


def test_echo_interactive(instance):
    """Round trips on one connection: nothing waits for more data or for EOF."""
    port = free_port()
    instance(f"127.0.0.1:{port}:{ECHO}/tcp")
    wait_echo(port)
    with connect(port, timeout=5) as s:
        for i in range(20):
            message = f"message {i}\n".encode() * (i + 1)
            s.sendall(message)
            assert recv_exactly(s, len(message)) == message
        s.shutdown(socket.SHUT_WR)
        assert read_to_eof(s) == b""


def test_half_close_from_the_client(instance):
    """The server answers only after it has seen our EOF; we still read its answer
    after our shutdown, then its EOF."""
    port = free_port()
    instance(f"127.0.0.1:{port}:{COLLECT}/tcp")
    payload = os.urandom(1 << 20)
    answer = until("collect server", lambda: exchange(port, payload, timeout=5))
    assert answer == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()


def test_half_close_from_the_server(instance):
    """The server half-closes first: we get its EOF, and can still send to it."""
    port = free_port()
    inst = instance(f"127.0.0.1:{port}:{SPEAK}/tcp")
    result = os.path.join(inst.tmp, "received")

    def greeting():
        with connect(port, timeout=5) as s:
            return read_to_eof(s) == b"hello\n"
    until("speak-first server", greeting)
    until("the first connection's result", lambda: os.path.exists(result))
    os.unlink(result)

    payload = os.urandom(1 << 20)
    with connect(port, timeout=10) as s:
        assert read_to_eof(s) == b"hello\n"  # the server's EOF came through...
        s.sendall(payload)                   # ...and our direction is still open
        s.shutdown(socket.SHUT_WR)
        assert closed_within(s, 5)
    until("the server's result", lambda: os.path.exists(result))
    with open(result) as f:
        assert f.read() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n"


def test_no_listener_in_the_child(instance):
    port = free_port()
    instance(f"127.0.0.1:{port}:{NOTHING}/tcp")
    until(f"port {port} listening", lambda: connect(port, timeout=1).close() or True)
    for send_first in (False, True):
        with connect(port, timeout=5) as s:
            start = time.monotonic()
            if send_first:
                try:
                    s.sendall(b"anyone there?")
                except (BrokenPipeError, ConnectionResetError):
                    continue  # closed already
            assert closed_within(s, 2), "the connection was left hanging"
            assert time.monotonic() - start < 2


def test_concurrent_connections(instance):
    """More connections at once than one batch of child sockets (16)."""
    port = free_port()
    instance(f"127.0.0.1:{port}:{ECHO}/tcp")
    wait_echo(port)
    payloads = [os.urandom(64 << 10) for _ in range(40)]
    results: list = [None] * len(payloads)

    def client(i):
        try:
            results[i] = exchange(port, payloads[i])
        except OSError as exc:
            results[i] = exc

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r == p for r, p in zip(results, payloads)), \
        [type(r).__name__ if not isinstance(r, bytes) else len(r) for r in results]


def test_many_sequential_connections_leak_no_fds(instance):
    port = free_port()
    inst = instance(f"127.0.0.1:{port}:{ECHO}/tcp")
    wait_echo(port)

    def one():
        with connect(port, timeout=5) as s:
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"

    one()
    time.sleep(0.2)
    after_first = fd_count(inst.pid)
    for _ in range(200):
        one()
    # The socket factory's pool may hold up to a batch more than after the first
    # connection (whose batch is smaller): a leak would be 200 or 400.
    from rootless.drivers.port._socket_factory import _BATCH

    until(f"fds of rootless-run back near {after_first}",
          lambda: fd_count(inst.pid) <= after_first + _BATCH + 5, timeout=3)


def test_client_reset_does_not_disturb_the_port(instance):
    port = free_port()
    inst = instance(f"127.0.0.1:{port}:{ECHO}/tcp")
    wait_echo(port)
    for _ in range(5):
        s = connect(port, timeout=5)
        s.sendall(os.urandom(256 << 10))  # unread echo: the close below resets
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()
    payload = os.urandom(1 << 20)
    assert exchange(port, payload) == payload
    assert inst.proc.poll() is None


def test_instance_ends_with_the_command_despite_open_connections(instance, tmp):
    port = free_port()
    trigger = os.path.join(tmp, "stop")
    inst = instance(f"127.0.0.1:{port}:{ECHO}/tcp", command=[
        "sh", "-c", f"socat TCP-LISTEN:{ECHO},bind=127.0.0.1,fork,reuseaddr EXEC:cat & "
                    f"while [ ! -e {trigger} ]; do sleep 0.05; done"])
    wait_echo(port)
    with connect(port, timeout=5) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        open(trigger, "w").close()
        assert inst.proc.wait(timeout=5) == 0
        assert closed_within(s, 2)
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=2).close()


def test_sctp_at_start_is_refused(user, rootless_run, state_dir):
    r = user.run([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                  f"--state-dir={state_dir}", "-p", f"127.0.0.1:{free_port()}:53/sctp",
                  "--", "true"], timeout=20)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert "builtin port driver" in r.stderr and "sctp" in r.stderr, r.stderr


@pytest.mark.parametrize("port_driver", ["builtin", "slirp4netns"])
def test_a_run_with_published_ports_imports_no_msgspec(user, rootless_run, state_dir, spawned,
                                                       port_driver):
    """-p, parsed before the fork, and its first connection load no msgspec (3 MiB the
    child would share, 10-16 ms of start-up): it is the API's, loaded at the API's first
    client, and this run has none. The import profile of the whole run, parent and
    child, as the user runs it; the command is a one-shot echo server."""
    port = free_port()
    echo = ("import socket; s = socket.create_server(('', 9000)); c, _ = s.accept(); "
            "c.sendall(c.recv(100))")
    proc = user.popen([rootless_run, "--net=slirp4netns", f"--port-driver={port_driver}",
                       f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:9000/tcp", "--",
                       "env", "-u", "PYTHONPROFILEIMPORTTIME", "python3", "-c", echo],
                      env={"PYTHONPROFILEIMPORTTIME": "1"})
    spawned.append(proc)
    # Once the relay (or slirp4netns' forward) reached the server: its one answer.
    until("an echo through the published port",
          lambda: exchange(port, b"ping", timeout=2) == b"ping", timeout=20)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
                if line.startswith("import time:")}
    # the profile covers the spec's parsing and the service thread: the check can fail
    assert "rootless.portspec" in imported, stderr
    assert not {name for name in imported if name.startswith("msgspec")}, stderr
    if port_driver == "builtin":
        # Its TCP ports run on its own loop: no trio (12 MiB), nor what the standard
        # library's socket.py, re or ipaddress would load (enum: 1 MiB).
        assert "rootless.drivers.port._engine" in imported, stderr
        assert not {"trio", "enum", "re", "ipaddress", "socket"} & imported, stderr
    else:
        assert "trio" in imported, stderr  # slirp4netns' driver is served under trio


# -- the REST API -------------------------------------------------------------------------

def test_api_add_list_remove(user, instance):
    inst = instance()
    sock = inst.sock
    spec = {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": 0, "childPort": HTTP}
    status, body = api(user, sock, "POST", "/v1/ports", spec)
    assert status == 201, body
    added = json.loads(body)
    port = added["spec"]["parentPort"]
    assert port != 0
    assert added["spec"] == {**spec, "parentPort": port} and isinstance(added["id"], int)
    wait_http(port)

    status, body = api(user, sock, "GET", "/v1/ports")
    assert status == 200
    assert json.loads(body) == [added]

    # the same parent IP and port again, as tcp or tcp4: a conflict
    for proto in ("tcp", "tcp4"):
        status, body = api(user, sock, "POST", "/v1/ports",
                           {**spec, "proto": proto, "parentPort": port})
        assert status == 409, (proto, body)
        assert json.loads(body)["message"]
    assert len(json.loads(api(user, sock, "GET", "/v1/ports")[1])) == 1

    # another automatic port is another port
    status, body = api(user, sock, "POST", "/v1/ports", spec)
    assert status == 201, body
    other = json.loads(body)
    assert other["id"] > added["id"]
    assert other["spec"]["parentPort"] not in (0, port)
    wait_http(other["spec"]["parentPort"])

    assert api(user, sock, "DELETE", f"/v1/ports/{added['id']}")[0] == 200
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=2).close()
    assert json.loads(api(user, sock, "GET", "/v1/ports")[1]) == [other]
    assert http_get(other["spec"]["parentPort"]) == FILE_TEXT.encode()  # untouched

    status, body = api(user, sock, "DELETE", f"/v1/ports/{added['id']}")
    assert status == 404 and json.loads(body)["message"]

    # the port was released: it can be published again
    status, body = api(user, sock, "POST", "/v1/ports", {**spec, "parentPort": port})
    assert status == 201, body
    assert json.loads(body)["id"] > other["id"]
    wait_http(port)


def test_p_port_taken_on_the_host(user, rootless_run, state_dir):
    """A -p port that cannot be bound ends the run with one line naming the spec as
    given and the fix; the command never starts (test_supervisor_faults)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = user.run([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                      f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:{HTTP}/tcp",
                      "--", "sleep", "20"], timeout=15)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"rootless-run: error: -p 127.0.0.1:{port}:{HTTP}/tcp: "
                                     f"127.0.0.1:{port}/tcp is in use on the host: pick "
                                     f"another parent port, or 0 for a free one"], r.stderr


def test_api_port_taken_on_the_host(user, instance):
    inst = instance()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, body = api(user, inst.sock, "POST", "/v1/ports",
                           {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": port,
                            "childPort": HTTP})
        assert status == 409, body
        assert str(port) in json.loads(body)["message"]
    assert api(user, inst.sock, "GET", "/v1/ports") == (200, "[]")


def test_removing_a_port_ends_its_connections(user, instance):
    inst = instance()
    status, body = api(user, inst.sock, "POST", "/v1/ports",
                       {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": 0,
                        "childPort": ECHO})
    assert status == 201, body
    added = json.loads(body)
    port = added["spec"]["parentPort"]
    wait_echo(port)
    with connect(port, timeout=5) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        assert api(user, inst.sock, "DELETE", f"/v1/ports/{added['id']}")[0] == 200
        assert closed_within(s, 2), "the connection outlived its port"
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=2).close()
    assert inst.proc.poll() is None


@pytest.mark.parametrize("proto", ["sctp", "sctp4"])
def test_api_unsupported_proto(user, instance, proto):
    inst = instance()
    status, body = api(user, inst.sock, "POST", "/v1/ports",
                       {"proto": proto, "parentIP": "127.0.0.1", "parentPort": free_port(),
                        "childPort": 80})
    assert status == 400, body
    message = json.loads(body)["message"]
    assert "builtin" in message and proto in message, message
    assert api(user, inst.sock, "GET", "/v1/ports") == (200, "[]")


# -- Debian's rootlessctl ----------------------------------------------------------------

def test_debian_rootlessctl(user, instance):
    inst = instance()

    def rootlessctl(*args):
        r = user.run(["rootlessctl", "--socket", inst.sock, *args])
        assert r.returncode == 0, r.stderr
        return r.stdout

    port = free_port()
    ident = rootlessctl("add-ports", f"127.0.0.1:{port}:{HTTP}/tcp").strip()
    assert ident.isdigit()
    wait_http(port)
    rows = rootlessctl("list-ports").splitlines()
    assert rows[0].split() == ["ID", "PROTO", "PARENTIP", "PARENTPORT", "CHILDIP", "CHILDPORT"]
    assert [row.split() for row in rows[1:]] == [[ident, "tcp", "127.0.0.1", str(port),
                                                  str(HTTP)]]
    info = rootlessctl("info")
    assert "- Port Driver: builtin" in info.splitlines()
    assert rootlessctl("remove-ports", ident).strip() == ident
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=2).close()
    assert len(rootlessctl("list-ports").splitlines()) == 1
