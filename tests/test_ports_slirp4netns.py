"""Published ports through --port-driver=slirp4netns (slirp4netns' own hostfwd), with
real traffic.

rootless-run --net=slirp4netns --port-driver=slirp4netns runs as the test user; the
servers in the child listen on its interface address (10.0.2.100) or on 0.0.0.0: the
hostfwd delivers there, not to the child's loopback. Clients are on the host's
127.0.0.1 only; every published spec has parent IP 127.0.0.1.
"""
import json
import os
import socket
from types import SimpleNamespace

import pytest

from conftest import free_port, wait_for_api, write_user_files
from test_ports import api, connect, http_get, read_to_eof, until

CHILD_IP = "10.0.2.100"
HTTP = 8080   # busybox httpd on 0.0.0.0, serving TMP/www
WHO = 9003    # TCP on 0.0.0.0: writes the client's address as the child sees it, closes
UDP = 7000    # UDP on 10.0.2.100: answers "<client address> <datagram>"; writes TMP/udp-seen

FILE_TEXT = "served through slirp4netns\n"

SERVERS_PY = f'''
import os, socket, sys, threading

def who():
    listener = socket.create_server(("0.0.0.0", {WHO}), backlog=64)
    while True:
        conn, peer = listener.accept()
        with conn:
            conn.sendall(peer[0].encode() + b"\\n")

def udp(address):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, {UDP}))
    while True:
        data, peer = s.recvfrom(65536)
        with open(sys.argv[1] + ".tmp", "wb") as f:
            f.write(data)
        os.rename(sys.argv[1] + ".tmp", sys.argv[1])
        s.sendto(peer[0].encode() + b" " + data, peer)

threading.Thread(target=who, daemon=True).start()
udp(sys.argv[2])
'''


# -- fixtures and helpers -----------------------------------------------------------------

@pytest.fixture
def tmp(user, user_tmp):
    write_user_files(user, user_tmp, {"www/file": FILE_TEXT, "servers.py": SERVERS_PY})
    return user_tmp




@pytest.fixture
def instance(user, rootless_run, state_dir, spawned, tmp):
    """start(*specs, flags=(), child_ip=CHILD_IP): a running instance with
    --port-driver=slirp4netns publishing `specs`; its command runs httpd and the
    servers above. Returns .proc, .sock (api.sock), .tmp, .udp_seen; waits until the
    API answers (the -p ports are added before the API starts)."""
    def start(*specs, flags=(), child_ip=CHILD_IP):
        args = [rootless_run, "--net=slirp4netns", "--port-driver=slirp4netns",
                f"--state-dir={state_dir}", *flags]
        for spec in specs:
            args += ["-p", spec]
        udp_seen = os.path.join(tmp, "udp-seen")
        command = ["sh", "-c", f"busybox httpd -f -p 0.0.0.0:{HTTP} -h {tmp}/www & "
                               f"exec python3 {tmp}/servers.py {udp_seen} {child_ip}"]
        proc = user.popen([*args, "--", *command])
        spawned.append(proc)
        sock = wait_for_api(proc, state_dir)
        return SimpleNamespace(proc=proc, sock=sock, tmp=tmp, udp_seen=udp_seen)
    return start


def who(port: int) -> str:
    """The client's address as the WHO server in the child saw it."""
    with connect(port, timeout=5) as s:
        return read_to_eof(s).decode().strip()


def udp_ask(port: int, payload: bytes, timeout: float = 2.0) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(payload, ("127.0.0.1", port))
        return s.recvfrom(65536)[0]


def wait_http(port: int) -> None:
    until(f"httpd through port {port}", lambda: http_get(port) == FILE_TEXT.encode())


def refused(port: int) -> bool:
    try:
        connect(port, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def ctl(user, program: str, sock: str, *args, ok: bool = True):
    r = user.run([program, "--socket", sock, *args])
    if ok:
        assert r.returncode == 0, r.stderr
    return r


# -- traffic ------------------------------------------------------------------------------

def test_tcp_through_published_ports(instance):
    http, whoport, explicit = free_port(), free_port(), free_port()
    instance(f"127.0.0.1:{http}:{HTTP}/tcp", f"127.0.0.1:{whoport}:{WHO}/tcp4",
             f"127.0.0.1:{explicit}:{CHILD_IP}:{WHO}/tcp")
    wait_http(http)
    assert http_get(http) == FILE_TEXT.encode()
    # slirp4netns' hostfwd: the child sees the connection come from the gateway
    # (.2), where the builtin driver's would come from inside the child
    assert who(whoport) == "10.0.2.2"
    assert who(explicit) == "10.0.2.2"


def test_tcp_follows_the_cidr(instance):
    """With --cidr the child's address, the default child IP, moves with it."""
    port = free_port()
    instance(f"127.0.0.1:{port}:{WHO}/tcp", flags=["--cidr=10.0.5.0/24"],
             child_ip="10.0.5.100")
    assert until("who through the port", lambda: who(port)) == "10.0.5.2"


def test_udp_through_published_port(instance):
    port = free_port()
    inst = instance(f"127.0.0.1:{port}:{UDP}/udp", flags=["--disable-host-loopback=false"])
    until("udp echo", lambda: udp_ask(port, b"ping", timeout=0.5))
    for size in (1, 1000, 8000):
        payload = os.urandom(size)
        assert udp_ask(port, payload) == b"10.0.2.2 " + payload
    with open(inst.udp_seen, "rb") as f:
        assert f.read() == payload


def test_udp_with_disable_host_loopback_warns(instance):
    """rootless-run's default --disable-host-loopback: slirp4netns forwards the
    datagram, but drops the answer to the host's loopback. The warning says so, once,
    and names the fix; this test keeps it true."""
    port, other = free_port(), free_port()
    inst = instance(f"127.0.0.1:{port}:{UDP}/udp", f"127.0.0.1:{other}:{UDP}/udp4")
    payload = b"are you there?"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        s.connect(("127.0.0.1", port))

        def delivered():
            s.send(payload)
            try:
                with open(inst.udp_seen, "rb") as f:
                    return f.read() == payload
            except FileNotFoundError:
                return False
        until("the datagram in the child", delivered)
        with pytest.raises(TimeoutError):
            s.recv(100)
    inst.proc.terminate()
    _, stderr = inst.proc.communicate(timeout=10)
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, stderr
    assert "--disable-host-loopback=false" in warnings[0] and "UDP" in warnings[0]


# -- the API, rootless-ctl and Debian's rootlessctl ---------------------------------------

def test_rootless_ctl_add_list_remove(user, instance):
    inst = instance()
    out = ctl(user, "rootless-ctl", inst.sock, "add-ports", "--json",
              f"127.0.0.1:0:{HTTP}/tcp", f"127.0.0.1:0:{UDP}/udp").stdout
    tcp, udp = (json.loads(line) for line in out.splitlines())
    port = tcp["spec"]["parentPort"]
    assert port != 0 and udp["spec"]["parentPort"] != 0  # free ports, picked for slirp4netns
    assert tcp["spec"] == {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": port,
                           "childPort": HTTP}
    wait_http(port)

    listed = [json.loads(line) for line in
              ctl(user, "rootless-ctl", inst.sock, "list-ports", "--json").stdout.splitlines()]
    assert listed == [tcp, udp]

    assert ctl(user, "rootless-ctl", inst.sock, "remove-ports",
               str(tcp["id"])).stdout.strip() == str(tcp["id"])
    assert refused(port)  # slirp4netns closed its listener
    listed = ctl(user, "rootless-ctl", inst.sock, "list-ports", "--json").stdout
    assert [json.loads(line) for line in listed.splitlines()] == [udp]

    r = ctl(user, "rootless-ctl", inst.sock, "remove-ports", str(tcp["id"]), ok=False)
    assert r.returncode == 1 and f"port {tcp['id']}" in r.stderr
    assert "Traceback" not in r.stderr

    # the port is free again: published anew, with a new id
    again = ctl(user, "rootless-ctl", inst.sock, "add-ports", "--json",
                f"127.0.0.1:{port}:{HTTP}/tcp").stdout
    assert json.loads(again)["id"] > udp["id"]
    wait_http(port)


def test_debian_rootlessctl(user, instance):
    inst = instance(flags=["--disable-host-loopback=false"])
    port, uport = free_port(), free_port()
    ident = ctl(user, "rootlessctl", inst.sock, "add-ports",
                f"127.0.0.1:{port}:{HTTP}/tcp").stdout.strip()
    uident = ctl(user, "rootlessctl", inst.sock, "add-ports",
                 f"127.0.0.1:{uport}:{UDP}/udp").stdout.strip()
    assert ident.isdigit() and uident.isdigit()
    wait_http(port)
    assert until("udp echo", lambda: udp_ask(uport, b"x", timeout=0.5)) == b"10.0.2.2 x"
    rows = ctl(user, "rootlessctl", inst.sock, "list-ports").stdout.splitlines()
    assert [row.split() for row in rows[1:]] == [
        [ident, "tcp", "127.0.0.1", str(port), str(HTTP)],
        [uident, "udp", "127.0.0.1", str(uport), str(UDP)]]
    info = ctl(user, "rootlessctl", inst.sock, "info").stdout.splitlines()
    assert "- Port Driver: slirp4netns" in info
    assert "  - Supported protocols: [tcp tcp4 udp udp4]" in info

    assert ctl(user, "rootlessctl", inst.sock, "remove-ports", ident).stdout.strip() == ident
    assert refused(port)
    ctl(user, "rootlessctl", inst.sock, "remove-ports", uident)
    with pytest.raises(TimeoutError):  # no more forwarding of datagrams either
        udp_ask(uport, b"x", timeout=1)
    assert len(ctl(user, "rootlessctl", inst.sock, "list-ports").stdout.splitlines()) == 1


def test_api_info(user, instance):
    inst = instance()
    status, body = api(user, inst.sock, "GET", "/v1/info")
    assert status == 200, body
    # rootlesskit-docker-proxy reads disallowLoopbackChildIP: it then forwards to the
    # child's IP, which slirp4netns can reach, instead of 127.0.0.1
    assert json.loads(body)["portDriver"] == {
        "driver": "slirp4netns", "protos": ["tcp", "tcp4", "udp", "udp4"],
        "disallowLoopbackChildIP": True}


def test_api_conflicts(user, instance):
    port = free_port()
    inst = instance(f"127.0.0.1:{port}:{HTTP}/tcp")
    wait_http(port)

    def post(spec):
        status, body = api(user, inst.sock, "POST", "/v1/ports",
                           {"parentIP": "127.0.0.1", "childPort": HTTP, **spec})
        return status, json.loads(body)

    for spec in ({"proto": "tcp", "parentPort": port},     # the same
                 {"proto": "tcp4", "parentPort": port},    # the same family
                 {"proto": "tcp", "parentIP": "0.0.0.0", "parentPort": port},  # overlaps
                 {"proto": "tcp", "parentIP": "", "parentPort": port}):
        status, body = post(spec)
        assert status == 409, (spec, body)
        assert str(port) in body["message"] and "1" in body["message"], body

    with socket.socket() as taken:  # a port someone else holds on the host
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        status, body = post({"proto": "tcp", "parentPort": taken.getsockname()[1]})
        assert status == 409, body
        assert "in use on the host" in body["message"], body
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        status, body = post({"proto": "udp", "parentPort": taken.getsockname()[1],
                             "childPort": UDP})
        assert status == 409, body

    # another family, the same port number: no conflict
    status, body = post({"proto": "udp", "parentPort": port, "childPort": UDP})
    assert status == 201, body
    ports = json.loads(api(user, inst.sock, "GET", "/v1/ports")[1])
    assert [(p["id"], p["spec"]["proto"]) for p in ports] == [(1, "tcp"), (body["id"], "udp")]
    assert http_get(port) == FILE_TEXT.encode()  # the first port is untouched


@pytest.mark.parametrize("spec, words", [
    ({"proto": "tcp6", "parentIP": "::1"}, ["tcp6", "slirp4netns", "tcp, tcp4, udp, udp4"]),
    ({"proto": "udp6", "parentIP": "::1"}, ["udp6", "slirp4netns", "tcp, tcp4, udp, udp4"]),
    ({"proto": "sctp"}, ["sctp", "slirp4netns", "tcp, tcp4, udp, udp4"]),
    ({"proto": "tcp", "parentIP": "::1"}, ["IPv4", "::1"]),
    ({"proto": "tcp", "childIP": "127.0.0.1"}, ["loopback", "10.0.2.100"]),
    ({"proto": "udp", "childIP": "fd00::100"}, ["IPv4", "fd00::100"]),
    ({"proto": "tcp", "childIP": "0.0.0.0"}, ["0.0.0.0", "10.0.2.100"]),
    ({"proto": "tcp", "parentIP": "192.0.2.1"}, ["192.0.2.1", "not an address of this host"]),
])
def test_api_refuses_what_slirp4netns_cannot_do(user, instance, spec, words):
    inst = instance()
    body = {"parentIP": "127.0.0.1", "parentPort": free_port(), "childPort": HTTP, **spec}
    status, text = api(user, inst.sock, "POST", "/v1/ports", body)
    assert status == 400, text
    message = json.loads(text)["message"]
    assert all(word in message for word in words), message
    assert api(user, inst.sock, "GET", "/v1/ports") == (200, "[]")


# -- refused at start ---------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--net=pasta"], ["--port-driver=slirp4netns needs --net=slirp4netns", "--net=pasta"]),
    (["--net=host"], ["needs --net=slirp4netns"]),
    (["--net=none"], ["needs --net=slirp4netns"]),
    (["--net=slirp4netns", "-p", "8080:80/tcp6"], ["-p 8080:80/tcp6", "slirp4netns"]),
    (["--net=slirp4netns", "-p", "8080:80/udp6"], ["udp6", "tcp, tcp4, udp, udp4"]),
    (["--net=slirp4netns", "-p", "127.0.0.1:8080:80/sctp"], ["sctp", "slirp4netns"]),
    (["--net=slirp4netns", "-p", "127.0.0.1:8080:127.0.0.1:80/tcp"], ["loopback"]),
    (["--net=slirp4netns", "-p", "[::1]:8080:80/tcp"], ["IPv4", "::1"]),
])
def test_refused_before_the_command(user, rootless_run, user_tmp, flags, words):
    marker = os.path.join(user_tmp, "ran")
    r = user.run([rootless_run, "--port-driver=slirp4netns", *flags, "--",
                  "touch", marker], timeout=20)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "error" in lines[0], r.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert not os.path.exists(marker)


def test_port_in_use_at_start(user, rootless_run, state_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = user.run([rootless_run, "--net=slirp4netns", "--port-driver=slirp4netns",
                      f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:80/tcp", "--",
                      "sleep", "30"], timeout=20)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert f"-p 127.0.0.1:{port}:80/tcp" in lines[0] and "in use" in lines[0], lines[0]


def test_automatic_port_at_start(user, instance):
    inst = instance(f"127.0.0.1:0:{HTTP}/tcp")
    ports = json.loads(api(user, inst.sock, "GET", "/v1/ports")[1])
    assert len(ports) == 1 and ports[0]["spec"]["parentPort"] != 0
    wait_http(ports[0]["spec"]["parentPort"])
