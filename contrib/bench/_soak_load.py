"""The soak's load on one supervisor, run as the benchmark user on the host (stdlib
only; run from a copy the benchmark writes to the state dir: the user may not be able
to read this checkout). Everything goes to the host's loopback and the supervisor's
api.sock.

    python3 soak_load.py CONFIG_JSON

CONFIG: {"port": P (published, TCP and UDP), "seconds": S, "interval": I,
         "api": "STATE/api.sock" or null, "api_ports": [FIRST, LAST], "child_port": C,
         "enter": [argv] or null}

At the same time, until S seconds are over:
- short requests, RATE a second: connect, 16 bytes there and back, close (timed);
  every third one sends half its request and resets (SO_LINGER 0 close);
- UDP flows, FLOWS a second, each from a new socket on a random 127.x.y.z:
  EXCHANGES datagrams there and back, then closed;
- two bulk streams, one up and one down: bursts of 8 MiB with a pause after each,
  a new connection every BULK_BURSTS bursts;
- every second, a port added through the API (POST /v1/ports), one short request
  through it, and the port removed (DELETE /v1/ports/ID);
- every ENTER_EVERY seconds, the `enter` command (e.g. rootless-ctl enter -- true).

Every I seconds one JSON line on stdout for the interval just ended: {"t": seconds
since the start, "requests": timed short requests, "p50_us", "p99_us", "errors":
{kind: count}, "done": {what: count}}. An error is counted only when the client did
not cause it: a connection that resets on purpose counts only what failed before
its reset.
"""
import collections
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time

RATE = 100          # short requests a second
FLOWS = 2           # new UDP flows a second (each lives on as a flow in the supervisor
                    # until its idle timeout: 60 s ours, 90 s rootlesskit's)
EXCHANGES = 5
BURST = 8 << 20     # as the server's
PAUSE = 0.25
BULK_BURSTS = 40    # a bulk connection lasts about 10 s
ENTER_EVERY = 5.0
TIMEOUT = 10.0      # a hang, not a slow answer: counted as an error of its kind
CHUNK = bytes(1 << 20)

stop = threading.Event()
lock = threading.Lock()
errors = collections.Counter()
done = collections.Counter()
latencies: list[float] = []


class Failed(Exception):
    """The answer was wrong (not an OSError): the message is the error's kind."""


def count_error(unit: str, exc: BaseException) -> None:
    kind = str(exc) if isinstance(exc, Failed) else type(exc).__name__
    with lock:
        errors[f"{unit}: {kind}"] += 1


def count(what: str, n: int = 1) -> None:
    with lock:
        done[what] += n


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise Failed("closed before the answer")
        data += chunk
    return data


def short_request(port: int) -> float:
    """One timed request (seconds); Failed or OSError when it does not work."""
    request = b"Q" + random.randbytes(15)
    start = time.perf_counter()
    with connect(port) as conn:
        conn.sendall(request)
        if read_exactly(conn, 16) != request[::-1]:
            raise Failed("wrong answer")
    return time.perf_counter() - start


def reset_request(port: int) -> None:
    """Half a request, then a reset: what fails after the reset is ours, not counted."""
    conn = connect(port)
    try:
        conn.sendall(b"Q" + random.randbytes(7))
    finally:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def paced(rate: float):
    """Yields RATE times a second until the end; slots missed are skipped, not bunched."""
    period, next_at = 1 / rate, time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        next_at = max(next_at + period, time.monotonic() - period)
        yield


def short_requests(port: int) -> None:
    for i, _ in enumerate(paced(RATE)):
        if i % 3 == 2:
            try:
                reset_request(port)
                count("resets")
            except OSError as exc:
                count_error("reset request, before its reset", exc)
            continue
        try:
            elapsed = short_request(port)
        except (OSError, Failed) as exc:
            count_error("short request", exc)
            continue
        with lock:
            latencies.append(elapsed)
        count("short")


def random_source() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


def udp_flow(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)  # loopback at this rate loses nothing: no answer is an error
        sock.bind((random_source(), 0))
        for _ in range(EXCHANGES):
            data = random.randbytes(32)
            sock.sendto(data, ("127.0.0.1", port))
            try:
                answer, _ = sock.recvfrom(65536)
            except TimeoutError:
                raise Failed("no answer within 2 s") from None
            if answer != data:
                raise Failed("wrong answer")
            count("udp")
            time.sleep(0.05)


def udp_flows(port: int) -> None:
    for _ in paced(FLOWS):
        try:
            udp_flow(port)
        except (OSError, Failed) as exc:
            count_error("udp flow", exc)


def bulk_up(port: int) -> None:
    with connect(port) as conn:
        conn.sendall(b"U" + struct.pack(">I", BULK_BURSTS))
        for _ in range(BULK_BURSTS):
            for _ in range(BURST // len(CHUNK)):
                conn.sendall(CHUNK)
            count("bulk bytes", BURST)
            time.sleep(PAUSE)
        conn.shutdown(socket.SHUT_WR)
        got = struct.unpack(">Q", read_exactly(conn, 8))[0]
        if got != BULK_BURSTS * BURST:
            raise Failed("bytes lost")


def bulk_down(port: int) -> None:
    with connect(port) as conn:
        conn.sendall(b"D" + struct.pack(">I", BULK_BURSTS))
        total = 0
        while chunk := conn.recv(1 << 20):
            total += len(chunk)
            count("bulk bytes", len(chunk))
        if total != BULK_BURSTS * BURST:
            raise Failed("bytes lost")


def bulk(port: int, stream) -> None:
    while not stop.is_set():
        try:
            stream(port)
        except (OSError, Failed) as exc:
            count_error(stream.__name__.replace("_", " "), exc)
            time.sleep(0.5)  # not a loop of failures as fast as it goes


def http(path: str, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: api\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\nConnection: "
                     f"close\r\n\r\n".encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body
    except (IndexError, ValueError):
        raise Failed("not an HTTP answer") from None


def free_port(first: int, last: int) -> int:
    """A port of first..last free on 127.0.0.1 just now. The range is below the
    ephemeral ports: no client's connect() can take the port before the supervisor
    binds it (bind(0) would pick one of them)."""
    for _ in range(100):
        port = random.randint(first, last)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise Failed(f"no free port in {first}-{last}")


def api_cycle(path: str, ports: tuple[int, int], child_port: int) -> None:
    port = free_port(*ports)
    spec = {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": port, "childIP": "",
            "childPort": child_port}
    status, body = http(path, "POST", "/v1/ports", json.dumps(spec).encode())
    if status != 201:
        raise Failed(f"add: HTTP {status} {body[:80].decode(errors='replace')}")
    ident = json.loads(body)["id"]
    try:
        short_request(port)
    except (OSError, Failed) as exc:
        count_error("request through a port the API added", exc)
    status, body = http(path, "DELETE", f"/v1/ports/{ident}")
    if status != 200:
        raise Failed(f"remove: HTTP {status} {body[:80].decode(errors='replace')}")


def api(path: str, ports: tuple[int, int], child_port: int) -> None:
    for _ in paced(1.0):
        try:
            api_cycle(path, ports, child_port)
            count("api add+remove")
        except (OSError, Failed, ValueError, KeyError) as exc:
            count_error("api", exc)


def enter(argv: list[str]) -> None:
    for _ in paced(1 / ENTER_EVERY):
        try:
            run = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            count_error("enter", exc)
            continue
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["no error output"])[-1]
            count_error("enter", Failed(f"exit {run.returncode}: {last[:100]}"))
        else:
            count("enter")


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(fraction * len(values)))]


def report(start: float) -> None:
    global latencies
    with lock:
        window, latencies = latencies, []
        line = {"t": round(time.monotonic() - start, 2), "requests": len(window),
                "errors": dict(errors), "done": dict(done)}
        errors.clear()
        done.clear()
    for name, fraction in (("p50_us", 0.5), ("p99_us", 0.99)):
        value = percentile(window, fraction)
        line[name] = None if value is None else round(value * 1e6, 1)
    print(json.dumps(line), flush=True)


def main(config: dict) -> None:
    sys.setswitchinterval(0.001)  # the timed requests wait less for the GIL
    port = config["port"]
    units = [(short_requests, port), (udp_flows, port), (bulk, port, bulk_up),
             (bulk, port, bulk_down)]
    if config.get("api"):
        units.append((api, config["api"], config["api_ports"], config["child_port"]))
    if config.get("enter"):
        units.append((enter, config["enter"]))
    start = time.monotonic()
    for target, *args in units:
        threading.Thread(target=target, args=args, daemon=True).start()
    end, interval = start + config["seconds"], config["interval"]
    next_report = start + interval
    while next_report <= end + 0.01:
        time.sleep(max(0.0, next_report - time.monotonic()))
        report(start)
        next_report += interval
    stop.set()  # the threads are daemons: what is in flight ends with the process


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
