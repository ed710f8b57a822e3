"""What the scenarios run: iperf3 on both ends, a small echo server and client for
short connections, an instance of a supervisor publishing a port, and the memory,
fds and threads of a supervisor's processes. Everything talks over the host's
loopback or the namespace's own addresses, nothing else."""
import json
import socket
import time
from contextlib import contextmanager

from ._procs import (Runner, Skip, cmdline, last_error, memory, open_fds, parent,
                     threads, tree)

# The echo server: one thread a connection, echoes until EOF. Short connections
# exchange 4 bytes each way. Run as `python3 -c ECHO_SERVER PORT`.
ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# The client: one connection after another (connect, 4 bytes there and back, close)
# for SECONDS or COUNT connections; prints {"done": N, "seconds": S}.
# Run as `python3 -c CLIENT PORT SECONDS COUNT` (0 = no limit of that kind).
CLIENT = """
import json, socket, sys, time
port, seconds, count = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
done, start = 0, time.perf_counter()
deadline = start + seconds if seconds else float("inf")
while (not count or done < count) and time.perf_counter() < deadline:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"ping")
        got = b""
        while len(got) < 4:
            chunk = c.recv(4 - len(got))
            if not chunk:
                sys.exit(f"connection {done + 1} closed before the echo came back")
            got += chunk
    done += 1
print(json.dumps({"done": done, "seconds": time.perf_counter() - start}))
"""

# A UDP echo server, and its client: COUNT clients one after another, each from a
# socket (a source port) of its own, so each is a new flow for the supervisor; prints
# {"done": N, "seconds": S}. Run as `python3 -c UDP_CLIENT PORT COUNT`.
UDP_ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
while True:
    data, client = s.recvfrom(65535)
    s.sendto(data, client)
"""
UDP_CLIENT = """
import json, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
start = time.perf_counter()
for done in range(count):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(b"ping", ("127.0.0.1", port))
        if s.recv(100) != b"ping":
            sys.exit(f"client {done + 1}: a wrong answer")
print(json.dumps({"done": count, "seconds": time.perf_counter() - start}))
"""

ECHO_PORT = 5202
IPERF_PORT = 5201


def free_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1 (iperf3 uses both on one number)."""
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise Skip("no free port on 127.0.0.1")


def iperf_client(runner: Runner, argv_prefix: list[str], host: str, port: int,
                 seconds: int, *, streams: int = 1, udp: bool = False,
                 interval: float | None = None, outer: list[str] = ()) -> dict:
    """Run an iperf3 client (under `argv_prefix`, e.g. a supervisor; all of it under
    `outer`, see Runner.start); returns {"gbps": received Gbit/s[, "loss":
    percent][, "intervals": Gbit/s of each `interval` seconds]}."""
    argv = argv_prefix + ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds),
                          "-P", str(streams), "-J"]
    if udp:
        # As fast as it goes; datagrams of a typical size (not 32 KiB loopback ones).
        argv += ["-u", "-b", "0", "-l", "1400"]
    if interval:
        argv += ["-i", str(interval)]
    code, out = runner.run(argv, timeout=seconds + 30, outer=outer)
    report = _json(out) or {}
    received = report.get("end", {}).get("sum_received")
    if code != 0 or not received:
        raise Skip(f"iperf3 client failed: {report.get('error') or out.strip()[-200:] or code}")
    result = {"gbps": received["bits_per_second"] / 1e9}
    if udp:
        result["loss"] = received["lost_percent"]
    if interval:
        result["intervals"] = [i["sum"]["bits_per_second"] / 1e9
                               for i in report.get("intervals", [])]
    return result


def _json(text: str) -> dict | None:
    try:
        return json.loads(text[text.index("{"):])
    except ValueError:
        return None


@contextmanager
def iperf_server(runner: Runner):
    """An iperf3 server on the host's 127.0.0.1; yields its port once it listens."""
    port = free_port()
    proc = runner.start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)])
    try:
        _wait_listening(proc, port, "iperf3 -s")
        yield port
    finally:
        runner.stop(proc)


@contextmanager
def iperf_server_in(runner: Runner, lab, address: str):
    """An iperf3 server on `address` in the network namespace of `lab` (lxc_lab.Lab);
    yields its port once it listens."""
    port = IPERF_PORT  # the lab's namespace is ours alone
    proc = runner.start(["iperf3", "-s", "-B", address, "-p", str(port)], outer=lab.prefix)
    try:
        _wait_listening(proc, port, "iperf3 -s", pid=str(proc.pid))
        yield port
    finally:
        runner.stop(proc)


@contextmanager
def echo_server(runner: Runner):
    port = free_port()
    proc = runner.start(["python3", "-c", ECHO_SERVER, str(port)])
    try:
        _wait_listening(proc, port, "the echo server")
        yield port
    finally:
        runner.stop(proc)


def listening(port: int, pid: str = "self", udp: bool = False) -> bool:
    """Whether a TCP socket listens (a UDP one is bound: `udp`) on `port` in the network
    namespace of `pid`. Read from /proc rather than by connecting: a probe connection
    would be taken by iperf3 for a test and make the real one fail."""
    tables, wanted = (("udp", "udp6"), "07") if udp else (("tcp", "tcp6"), "0A")
    for table in tables:
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    local, state = line.split()[1], line.split()[3]
                    if state == wanted and int(local.rsplit(":", 1)[1], 16) == port:
                        return True
        except (OSError, StopIteration):
            pass
    return False


def _wait_listening(proc, port: int, what: str, seconds: float = 10.0,
                    pid: str = "self") -> None:
    """Until `port` listens in the network namespace of `pid`."""
    deadline = time.monotonic() + seconds
    while not listening(port, pid):
        if proc.poll() is not None:
            raise Skip(f"{what} exited ({proc.returncode}): {last_error(proc)}")
        if time.monotonic() > deadline:
            raise Skip(f"{what} did not listen on port {port} within {seconds:.0f} s")
        time.sleep(0.02)


def connections(runner: Runner, port: int, seconds: float = 0, count: int = 0) -> dict:
    """Short connections to 127.0.0.1:port, one after another: {"rate": per second,
    "done": count}."""
    code, out = runner.run(["python3", "-c", CLIENT, str(port), str(seconds), str(count)],
                           timeout=(seconds or count / 100) + 60)
    result = _json(out)
    if code != 0 or not result:
        raise Skip(f"the connection client failed (exit {code})")
    return {"rate": result["done"] / result["seconds"], "done": result["done"],
            "seconds": result["seconds"]}


@contextmanager
def published(runner: Runner, supervisor: list[str], specs: list[str],
              command: list[str], command_port: int, udp: bool = False):
    """A supervisor (`supervisor` = binary and flags) publishing `specs` (with `{P}`
    for a free host port) and running `command`, which listens on `command_port`;
    yields (process, host port) once the supervisor listens on the host and the
    command in its namespace. A supervisor that exits first is a Skip quoting its
    error (e.g. a protocol our builtin driver does not support yet). `udp`: the
    specs and the command's port are UDP."""
    port = free_port()
    argv = [*supervisor, *(f"--publish={s.format(P=port)}" for s in specs), "--", *command]
    proc = runner.start(argv)
    try:
        _wait_for(proc, lambda: listening(port, udp=udp) and _command_listening(
                      proc.pid, command, command_port, udp), "the published port or the command")
        yield proc, port
    finally:
        runner.stop(proc)


def udp_clients(runner: Runner, port: int, count: int) -> dict:
    """`count` UDP clients of 127.0.0.1:port, one after another, each from a port of its
    own: {"done": count, "seconds": S}."""
    code, out = runner.run(["python3", "-c", UDP_CLIENT, str(port), str(count)],
                           timeout=count / 50 + 60)
    result = _json(out)
    if code != 0 or not result:
        raise Skip(f"the UDP client failed (exit {code}): {out.strip()[-200:]}")
    return result


def _wait_for(proc, ready, what: str, seconds: float = 15.0) -> None:
    """Until `ready()`; a Skip if the supervisor `proc` exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while not ready():
        if proc.poll() is not None:
            raise Skip(f"exited ({proc.returncode}): {last_error(proc)}")
        if time.monotonic() > deadline:
            raise Skip(f"{what} did not listen within {seconds:.0f} s")
        time.sleep(0.02)


@contextmanager
def with_api(runner: Runner, supervisor: list[str], command: list[str], command_port: int):
    """A supervisor (`supervisor` = binary and flags) with no -p, a state dir of the
    user's and `command` listening on `command_port`; yields (process, the path of its
    api.sock) once both listen. rootless Docker's shape: its ports come through the API."""
    code, base = runner.run(["mktemp", "-d", "-p", runner.env["XDG_RUNTIME_DIR"],
                             "rootless-bench-api-XXXXXX"], timeout=10)
    if code != 0:
        raise Skip(f"could not make a state dir as {runner.user}")
    state = f"{base.strip()}/state"
    sock = f"{state}/api.sock"
    proc = runner.start([*supervisor, f"--state-dir={state}", "--", *command])
    try:
        _wait_for(proc, lambda: _answers(sock) and _command_listening(proc.pid, command,
                                                                       command_port),
                  "the API or the command")
        yield proc, sock
    finally:
        runner.stop(proc)
        runner.run(["rm", "-rf", base.strip()], timeout=30)


def _answers(path: str) -> bool:
    """Whether api.sock exists (a connection would be the API's first client)."""
    try:
        with open("/proc/net/unix") as f:
            return any(line.rstrip().endswith(" " + path) for line in f)
    except OSError:
        return False


def api_add_port(sock: str, parent_port: int, child_port: int) -> None:
    """POST /v1/ports on the API at `sock` (as root here: any user's socket will do)."""
    body = json.dumps({"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": parent_port,
                       "childPort": child_port}).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 201"):
        raise Skip(f"the API did not add the port: {answer[:200]!r}")


def _command_listening(root: int, command: list[str], port: int, udp: bool = False) -> bool:
    return any(listening(port, str(pid), udp) for pid in tree(root) if cmdline(pid) == command)


def supervisor_usage(root: int, command: list[str]) -> dict:
    """PSS and RSS (MiB), open fds and threads of the supervisor's processes: `root`
    and its descendants, less the command (the first process running `command`) and
    its descendants. A process gone in between counts for nothing."""
    pids = tree(root)
    commands = {pid for pid in pids if cmdline(pid) == command}
    mine = []
    for pid in pids:
        ancestor = pid
        while ancestor and ancestor not in commands and ancestor != root:
            ancestor = parent(ancestor)
        if ancestor not in commands:
            mine.append(pid)
    if not commands:
        raise Skip("could not tell the command from the supervisor's processes")
    pss = rss = fds = tasks = counted = 0
    for pid in mine:
        try:
            p, r = memory(pid)
            f, t = open_fds(pid), threads(pid)
        except OSError:
            continue  # gone in between
        pss, rss, fds, tasks, counted = pss + p, rss + r, fds + f, tasks + t, counted + 1
    return {"pss": pss / 2**20, "rss": rss / 2**20, "fds": fds, "threads": tasks,
            "processes": counted}
