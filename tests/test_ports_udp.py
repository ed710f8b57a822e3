"""UDP through the builtin port driver, and the client's address as the child sees it
(TCP and UDP), with real traffic.

Loopback and namespaces the tests create only: clients on the host's loopback
(127.0.0.1, or another 127/8 address to tell clients apart), and, for a client that is
not local to the child, a network namespace made here, joined to the host by a veth
pair with addresses of 198.18.0.0/30 (the benchmarking range).
"""
import os
import socket
import subprocess
import time
import uuid
from types import SimpleNamespace

import pytest

from conftest import free_port, rss_kib, thread_names, wait_for_api, write_user_files
from test_ports import until

TCP_PEER = 9000   # tells each connection its peer "IP PORT\n" and closes
UDP_ECHO = 9001   # answers each datagram with it + b" from IP PORT"

SERVER_PY = f'''
import socket, threading

def tcp():
    listener = socket.create_server(("127.0.0.1", {TCP_PEER}), backlog=128)
    while True:
        conn, peer = listener.accept()
        with conn:
            conn.sendall(f"{{peer[0]}} {{peer[1]}}\\n".encode())

def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", {UDP_ECHO}))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data + f" from {{peer[0]}} {{peer[1]}}".encode(), peer)

threading.Thread(target=tcp, daemon=True).start()
udp()
'''


@pytest.fixture
def instance(user, rootless_run, state_dir, spawned, user_tmp):
    """start(*specs, flags=(), env=None): a running instance publishing `specs`, its
    command the servers above."""
    write_user_files(user, user_tmp, {"server.py": SERVER_PY})
    script = os.path.join(user_tmp, "server.py")

    def start(*specs, flags=(), env=None, command=None):
        args = [rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                f"--state-dir={state_dir}", *flags]
        for spec in specs:
            args += ["-p", spec]
        proc = user.popen([*args, "--", *(command or ["python3", script])], env=env)
        spawned.append(proc)
        sock = wait_for_api(proc, state_dir)
        with open(os.path.join(state_dir, "child_pid")) as f:
            child_pid = int(f.read())
        return SimpleNamespace(proc=proc, sock=sock, child_pid=child_pid)
    return start


def udp_ask(port: int, payload: bytes, source: str = "127.0.0.1", host: str = "127.0.0.1",
            sock: socket.socket | None = None, timeout: float = 2.0) -> bytes:
    own = sock is None
    if own:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_DGRAM)
        sock.bind((source, 0))
    try:
        sock.settimeout(timeout)
        sock.sendto(payload, (host, port))
        data, sender = sock.recvfrom(65535)
        assert sender[1] == port  # the answer comes from the published port
        return data
    finally:
        if own:
            sock.close()


def udp_ready(port: int) -> None:
    until(f"UDP echo through port {port}",
          lambda: udp_ask(port, b"ping", timeout=0.5).startswith(b"ping from "), 10)


def tcp_peer(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> tuple[str, int]:
    with socket.create_connection((host, port), timeout=5, source_address=(source, 0)) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            assert chunk, data
            data += chunk
    ip, port_text = data.decode().split()
    return ip, int(port_text)


def child_rules(child_pid: int) -> str:
    """`ip rule` in the child's netns (read as root from outside)."""
    return subprocess.run(["nsenter", "-t", str(child_pid), "-n", "ip", "rule"],
                          capture_output=True, text=True, check=True).stdout


# -- UDP ----------------------------------------------------------------------------------

def test_udp_echo_through_published_port(instance):
    port = free_port()
    instance(f"127.0.0.1:{port}:{UDP_ECHO}/udp")
    udp_ready(port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        for i in range(50):
            payload = f"datagram {i}".encode()
            assert udp_ask(port, payload, sock=s).startswith(payload + b" from 127.0.0.1 ")
        big = os.urandom(60000)  # one datagram, nearly the largest there is
        answer = udp_ask(port, big, sock=s)
        assert answer[:60000] == big


def test_udp_clients_get_their_own_answers(instance):
    """Two clients, interleaved: each flow answers its own client only."""
    port = free_port()
    instance(f"127.0.0.1:{port}:{UDP_ECHO}/udp")
    udp_ready(port)
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a, b:
        a.bind(("127.0.0.2", 0))
        b.bind(("127.0.0.3", 0))
        for s in (a, b):
            s.settimeout(2)
        for i in range(20):
            a.sendto(b"a%d" % i, ("127.0.0.1", port))
            b.sendto(b"b%d" % i, ("127.0.0.1", port))
            assert a.recv(100).startswith(b"a%d from 127.0.0.2 " % i)
            assert b.recv(100).startswith(b"b%d from 127.0.0.3 " % i)


def test_udp_bursts_from_several_clients(instance):
    """Three clients send interleaved bursts without waiting, in sizes up to 1.2 KB
    (all of them fit the child server's socket buffer): the relay reads them many at a
    time (recvmmsg), and each datagram still goes into its own client's flow, whole
    and in order."""
    port = free_port()
    instance(f"127.0.0.1:{port}:{UDP_ECHO}/udp")
    udp_ready(port)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        for n, s in enumerate(clients):
            s.bind((f"127.0.0.{n + 2}", 0))
            s.settimeout(5)
        sent = {n: [] for n in range(len(clients))}
        for i in range(20):
            for n, s in enumerate(clients):
                payload = (b"%d:%d:" % (n, i)).ljust((i * 229 + n * 71) % 1200, b"x")
                s.sendto(payload, ("127.0.0.1", port))
                sent[n].append(payload)
        for n, s in enumerate(clients):
            got = [s.recv(65535) for _ in sent[n]]
            suffix = f" from 127.0.0.{n + 2} ".encode()
            assert [g[:g.rindex(suffix)] for g in got] == sent[n]
    finally:
        for s in clients:
            s.close()


@pytest.mark.parametrize("proto", ["udp", "udp4"])
def test_udp_answers_come_from_the_address_the_client_used(instance, proto):
    """A port on the wildcard address, a client that sends to another address of the
    host (127.0.0.2 here; a second interface's address in life): the answer comes
    from that address, so a connected client accepts it. (rootlesskit answers from
    the address routing picks, 127.0.0.1, which such a client drops.)"""
    port = free_port()
    instance(f"0.0.0.0:{port}:{UDP_ECHO}/{proto}")
    udp_ready(port)
    for address in ("127.0.0.2", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.connect((address, port))  # the kernel drops datagrams from elsewhere
            s.send(b"where")
            assert s.recv(100).startswith(b"where from 127.0.0.1 ")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(b"who", (address, port))
            data, sender = s.recvfrom(100)
            assert sender == (address, port) and data.startswith(b"who from ")


def test_udp_flow_ends_when_idle(instance):
    """A flow is kept while used and ends after the idle timeout: the child sees the
    same source port within a flow and a new one after it expired."""
    port = free_port()
    instance(f"127.0.0.1:{port}:{UDP_ECHO}/udp", env={"ROOTLESS_UDP_FLOW_TIMEOUT": "1"})
    udp_ready(port)
    time.sleep(1.5)  # the readiness probes' flows expire
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        seen = []
        for _ in range(4):  # 2 s of traffic, every 0.5 s: longer than the timeout
            seen.append(udp_ask(port, b"x", sock=s).split()[-1])
            time.sleep(0.5)
        assert len(set(seen)) == 1, seen
        time.sleep(2)
        assert udp_ask(port, b"x", sock=s).split()[-1] != seen[0]


def test_bad_udp_flow_timeout_is_one_warning(instance):
    port = free_port()
    inst = instance(f"127.0.0.1:{port}:{UDP_ECHO}/udp",
                    env={"ROOTLESS_UDP_FLOW_TIMEOUT": "soon"})
    udp_ready(port)
    inst.proc.terminate()
    inst.proc.wait(timeout=10)
    lines = inst.proc.stderr.read().splitlines()
    assert [line for line in lines if "ROOTLESS_UDP_FLOW_TIMEOUT" in line] == [
        "rootless-run: warning: ROOTLESS_UDP_FLOW_TIMEOUT='soon' is not a positive number "
        "of seconds: using 60"]


def test_udp_before_the_server_starts(instance, user_tmp):
    """Datagrams to a child port nobody listens on yet get no answer (the child's ICMP
    error stays there); once the server is up, the same client gets answers."""
    port = free_port()
    trigger = os.path.join(user_tmp, "go")
    script = os.path.join(user_tmp, "server.py")
    instance(f"127.0.0.1:{port}:{UDP_ECHO}/udp", command=[
        "sh", "-c", f"while [ ! -e {trigger} ]; do sleep 0.05; done; exec python3 {script}"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(socket.timeout):
            udp_ask(port, b"early", sock=s, timeout=0.5)
        with pytest.raises(socket.timeout):
            udp_ask(port, b"early", sock=s, timeout=0.5)
        open(trigger, "w").close()
        until("an answer once the server runs",
              lambda: udp_ask(port, b"late", sock=s, timeout=0.3).startswith(b"late from"), 10)


def _bound(port: int, udp: bool, netns_of: int | None = None) -> bool:
    """Whether a socket is bound to `port` on the host, or in the netns of the process
    `netns_of` (read as root)."""
    enter = ["nsenter", "-t", str(netns_of), "-n"] if netns_of else []
    r = subprocess.run([*enter, "ss", "-Hln", "-u" if udp else "-t", f"sport = :{port}"],
                       capture_output=True, text=True, check=True)
    return bool(r.stdout.strip())


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_ports_load_at_their_first_client(user, rootless_run, state_dir, spawned, user_tmp,
                                          proto):
    """A -p port listens from the start, but the parent loads the relays only when its
    first client comes, as for the API: the client that wakes it is served (its
    connection or datagram waited in the socket), and the load shows in the parent:
    the ports' own loop, a thread, and no trio (12 MiB: a UDP port's first client
    loaded it, until its flows moved to the loop). Nothing here touches api.sock,
    which would load the API."""
    write_user_files(user, user_tmp, {"server.py": SERVER_PY})
    port = free_port()
    inner = UDP_ECHO if proto == "udp" else TCP_PEER
    proc = user.popen([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                       f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:{inner}/{proto}",
                       "--", "python3", os.path.join(user_tmp, "server.py")])
    spawned.append(proc)
    pid_file = os.path.join(state_dir, "child_pid")
    until("the child's pid", lambda: os.path.exists(pid_file), 20)
    with open(pid_file) as f:
        child_pid = int(f.read())
    udp = proto == "udp"
    until("the -p port and the server in the child",
          lambda: _bound(port, udp) and _bound(inner, udp, netns_of=child_pid), 20)
    assert proc.poll() is None, proc.stderr.read()
    time.sleep(0.3)  # well past the moment the services used to load
    idle = rss_kib(proc.pid)  # setpriv execs: the Popen's pid is rootless-run's parent
    assert "rootless ports" not in thread_names(proc.pid)
    # Both file tables grown to 1024 while their process had one thread: grown later,
    # in a process of several, each growth waits for an RCU grace period (8-10 ms of
    # the first client's wait, when the socket factory's first batch crossed 64 fds).
    for pid in (proc.pid, child_pid):
        assert _fd_table_size(pid) >= 1024, pid
    # Nor is the routing for clients' addresses set up yet (made as the command
    # started, it stalled the command's own first transfers).
    assert "fwmark" not in child_rules(child_pid)
    # The first client is seen as itself: the socket factory's hello (whether the child
    # sees clients' addresses) is answered before its connection or flow is made.
    if udp:
        assert udp_ask(port, b"first", source="127.0.0.7",
                       timeout=5).startswith(b"first from 127.0.0.7 ")
    else:
        assert tcp_peer(port, source="127.0.0.7")[0] == "127.0.0.7"
    loaded = rss_kib(proc.pid)
    assert "rootless ports" in thread_names(proc.pid)
    assert "rootless trio" not in thread_names(proc.pid)
    assert loaded - idle < 4 * 1024, f"RSS {idle} KiB idle, {loaded} KiB: trio loaded?"
    assert "fwmark 0x524c" in child_rules(child_pid)


def test_a_udp_port_loads_neither_trio_nor_socket_py(user, rootless_run, state_dir,
                                                     spawned):
    """A -p UDP port and its first datagrams load no trio (12 MiB: its first client
    waited 85-105 ms for it), nor socket.py, array or the collections package (enum and
    the rest: over 1 MiB): its flows run on the ports' loop, with the C modules. The
    import profile of the whole run, parent and child, as the user runs it."""
    port = free_port(kind=socket.SOCK_DGRAM)
    echo = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(('127.0.0.1', {UDP_ECHO}))\n"
            f"while True: d, a = s.recvfrom(100); s.sendto(d + b' from x', a)")
    proc = user.popen([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                       f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:{UDP_ECHO}/udp",
                       "--", "env", "-u", "PYTHONPROFILEIMPORTTIME", "python3", "-c", echo],
                      env={"PYTHONPROFILEIMPORTTIME": "1"})
    spawned.append(proc)
    udp_ready(port)
    proc.terminate()
    _, stderr = proc.communicate(timeout=20)
    imported = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines()
                if line.startswith("import time:")}
    # the profile covers the parent's services as they load: the check can fail
    assert "rootless.drivers.port._udp" in imported, stderr
    assert not {"trio", "enum", "socket", "array", "collections", "re", "ipaddress"
                } & imported, stderr


def _fd_table_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("FDSize:")).split()[1])


def test_udp_over_ipv6_loopback(instance):
    if not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("no IPv6 on this host")
    port = free_port("::1")
    instance(f"[::1]:{port}:127.0.0.1:{UDP_ECHO}/udp6")
    until("UDP over ::1", lambda: udp_ask(port, b"six", source="::1", host="::1",
                                          timeout=0.5).startswith(b"six from 127.0.0.1 "), 10)


def test_udp_port_added_and_removed_through_the_api(user, instance):
    from test_ports import api

    inst = instance()
    status, body = api(user, inst.sock, "POST", "/v1/ports",
                       {"proto": "udp", "parentIP": "127.0.0.1", "parentPort": 0,
                        "childPort": UDP_ECHO})
    assert status == 201, body
    import json
    added = json.loads(body)
    port = added["spec"]["parentPort"]
    udp_ready(port)
    assert f"sport {UDP_ECHO}" in child_rules(inst.child_pid)
    assert api(user, inst.sock, "DELETE", f"/v1/ports/{added['id']}")[0] == 200
    with pytest.raises(socket.timeout):
        udp_ask(port, b"gone", timeout=0.5)
    assert f"sport {UDP_ECHO}" not in child_rules(inst.child_pid)


# -- the client's address ---------------------------------------------------------------

@pytest.mark.parametrize("transparent", [True, False])
def test_child_sees_the_client_address_on_loopback(instance, transparent):
    """A client on the host's 127.0.0.7: the child sees 127.0.0.7 (TCP and UDP), or,
    with --source-ip-transparent=false, its own 127.0.0.1."""
    tcp, udp = free_port(), free_port()
    instance(f"127.0.0.1:{tcp}:{TCP_PEER}/tcp", f"127.0.0.1:{udp}:{UDP_ECHO}/udp",
             flags=[f"--source-ip-transparent={str(transparent).lower()}"])
    udp_ready(udp)
    expected = "127.0.0.7" if transparent else "127.0.0.1"
    until("TCP through the port", lambda: tcp_peer(tcp), 10)
    assert tcp_peer(tcp, source="127.0.0.7")[0] == expected
    answer = udp_ask(udp, b"who", source="127.0.0.7")
    assert answer.split()[2].decode() == expected, answer


@pytest.fixture
def client_netns():
    """A network namespace with 198.18.0.2/30, joined by a veth pair to the host's
    198.18.0.1/30: a client that is not on the host's loopback. `run(code)` runs
    Python code there (as root) and returns its stdout."""
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        pytest.skip("`ip netns` is not available")
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"rlt-{tag}", f"rlth{tag}", f"rltn{tag}"
    steps = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", ns],
        ["ip", "addr", "add", "198.18.0.1/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", ns, "addr", "add", "198.18.0.2/30", "dev", ns_if],
        ["ip", "-n", ns, "link", "set", ns_if, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)

        def run(code: str) -> str:
            r = subprocess.run(["ip", "netns", "exec", ns, "python3", "-c", code],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            return r.stdout
        yield run
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_child_sees_a_remote_client_address(instance, client_netns):
    """A client at 198.18.0.2, in another netns: the child sees 198.18.0.2 for TCP and
    UDP, and the answers find their way back (through the policy routing that brings
    them to the transparent sockets instead of slirp4netns)."""
    tcp, udp = free_port(), free_port()
    instance(f"198.18.0.1:{tcp}:{TCP_PEER}/tcp", f"198.18.0.1:{udp}:{UDP_ECHO}/udp")
    out = client_netns(f'''
import socket, time
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection(("198.18.0.1", {tcp}), timeout=3)
        break
    except OSError:
        assert time.monotonic() < deadline
        time.sleep(0.1)
print(s.recv(100).decode().split()[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
u.sendto(b"who", ("198.18.0.1", {udp}))
print(u.recv(100).decode().split()[2])
''')
    assert out.split() == ["198.18.0.2", "198.18.0.2"]
