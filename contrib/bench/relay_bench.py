"""Benchmark of the builtin port driver's relay: rootless-run against Debian's
rootlesskit, same flags, alternating round by round, loopback only.

Each round starts one instance of each (`--net=slirp4netns --port-driver=builtin
-p 127.0.0.1:P:5201/tcp -p 127.0.0.1:Q:5202/tcp`, iperf3 -s and a small echo server
in the child) and measures through the published ports:
  - TCP throughput, iperf3 host -> child, 1 and 4 streams, and the relaying process's
    CPU time meanwhile (its parent process: the one that copies);
  - the short-connection rate: connect, 4 bytes each way, close, with C clients at
    once (non-blocking, one thread), and the CPU time each connection costs the
    tool's processes (its parent, and its child, which dials for rootlesskit);
and, as the limit, iperf3 straight over the host's loopback. Reports medians.

    python3 -m contrib.bench.relay_bench [--rounds N] [--seconds S] [--user NAME]

Run as root it runs the instances as --user (default rlt-test); otherwise as the
caller. ROOTLESS_VENV chooses our installation (default /opt/rootless/venv).
"""
import argparse
import errno
import json
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import time

from .bench import Runner

VENV = os.environ.get("ROOTLESS_VENV", "/opt/rootless/venv")

# Runs in the child: echo whatever comes, close on EOF; one thread, epoll.
ECHO_SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=4096)
srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is srv:
            while True:
                try:
                    c, _ = srv.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
            continue
        try:
            data = s.recv(65536)
            if data:
                s.send(data)
                continue
        except OSError:
            pass
        sel.unregister(s)
        s.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tool_cpu(pid: int) -> float:
    """CPU seconds of `pid` and its descendants, less the servers in the child (for
    rootlesskit, its child process dials each connection: that counts)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
            if comm not in ("iperf3", "python3", "sh", "slirp4netns"):
                total += cpu_seconds(p)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


class Instance:
    """One rootless-run or rootlesskit publishing iperf3 (P) and the echo server (Q)."""

    def __init__(self, runner: Runner, binary: str):
        self.iperf, self.echo = free_port(), free_port()
        argv = [binary, "--net=slirp4netns", "--port-driver=builtin",
                "-p", f"127.0.0.1:{self.iperf}:5201/tcp",
                "-p", f"127.0.0.1:{self.echo}:5202/tcp", "--",
                "sh", "-c", f"iperf3 -s -p 5201 >/dev/null & "
                            f"exec python3 -c '{ECHO_SERVER}' 5202"]
        self.proc = subprocess.Popen(runner.prefix + argv, env=runner.env, cwd="/tmp",
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while not self._echoes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{binary}: the published echo port never answered: "
                                   f"{self.proc.stderr.read()[-300:]!r}")
            time.sleep(0.05)

    def _echoes(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.echo), timeout=1) as c:
                c.sendall(b"ping")
                return c.recv(4) == b"ping"
        except OSError:
            return False

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.proc.stderr.close()


def iperf(port: int, streams: int, seconds: float) -> float:
    """Gbit/s received, iperf3 client on the host."""
    for _ in range(50):  # until iperf3 listens
        run = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t",
                              str(seconds), "-P", str(streams), "-J"],
                             capture_output=True, text=True)
        result = json.loads(run.stdout or "{}")
        if run.returncode == 0 and "sum_received" in result.get("end", {}):
            return result["end"]["sum_received"]["bits_per_second"] / 1e9
        time.sleep(0.1)  # not listening yet, or busy
    raise RuntimeError(f"iperf3 -c 127.0.0.1 -p {port}: {run.stdout[-300:]}")


def iperf_relayed(port: int, streams: int, seconds: float, pid: int):
    """(Gbit/s, CPU cores the process `pid` used meanwhile)."""
    before, start = cpu_seconds(pid), time.monotonic()
    gbps = iperf(port, streams, seconds)
    return gbps, (cpu_seconds(pid) - before) / (time.monotonic() - start)


def connection_rate(port: int, seconds: float, concurrency: int) -> float:
    """Completed connections a second: connect, send 4 bytes, read them back, close."""
    sel = selectors.DefaultSelector()
    done = failed = 0

    def start():
        s = socket.socket()
        s.setblocking(False)
        if s.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
            raise OSError("connect failed")
        sel.register(s, selectors.EVENT_WRITE, "connecting")

    for _ in range(concurrency):
        start()
    t0 = time.monotonic()
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        for key, _ in sel.select(1):
            s = key.fileobj
            if key.data == "connecting":
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    s.send(b"ping")
                    sel.modify(s, selectors.EVENT_READ, "reading")
                    continue
            else:
                try:
                    ok = s.recv(4) == b"ping"
                except OSError:
                    ok = False
                done, failed = done + ok, failed + (not ok)
            if key.data == "connecting":
                failed += 1
            sel.unregister(s)
            s.close()
            start()
    elapsed = time.monotonic() - t0
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    sel.close()
    if failed > done // 100:
        raise RuntimeError(f"{failed} connections failed, {done} completed")
    return done / elapsed


def raw_loopback(runner: Runner, streams: int, seconds: float) -> float:
    port = free_port()
    server = subprocess.Popen(["iperf3", "-s", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        return iperf(port, streams, seconds)
    finally:
        server.terminate()
        server.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m contrib.bench.relay_bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4, help="per measurement")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="clients at once for the connection rate")
    parser.add_argument("--user", default="rlt-test", help="user to run as, when root")
    parser.add_argument("--only", choices=["ours", "rootlesskit"], default=None)
    parser.add_argument("--json", default="", help="write every sample to this file")
    args = parser.parse_args(argv)

    tools = {"ours": os.path.join(VENV, "bin", "docker-rootlesskit"),
             "rootlesskit": shutil.which("rootlesskit")}
    for tool, path in tools.items():
        if not path or not os.path.exists(path):
            print(f"relay_bench: {tool} is not installed", file=sys.stderr)
            return 1
    if shutil.which("iperf3") is None:
        print("relay_bench: iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 1
    if args.only:
        tools = {args.only: tools[args.only]}
    runner = Runner(args.user)

    metrics = ("tcp 1 stream Gbps", "tcp 1 stream cores", "tcp 4 streams Gbps",
               "tcp 4 streams cores", "conn/s", "conn CPU us each")
    samples = {tool: {m: [] for m in metrics} for tool in tools}
    raw = {1: [], 4: []}
    for round_ in range(args.rounds):
        for streams in (1, 4):
            raw[streams].append(raw_loopback(runner, streams, args.seconds))
        order = list(tools) if round_ % 2 == 0 else list(reversed(tools))
        for tool in order:
            inst = Instance(runner, tools[tool])
            try:
                s = samples[tool]
                for streams, name in ((1, "tcp 1 stream"), (4, "tcp 4 streams")):
                    gbps, cores = iperf_relayed(inst.iperf, streams, args.seconds,
                                                inst.proc.pid)
                    s[f"{name} Gbps"].append(gbps)
                    s[f"{name} cores"].append(cores)
                before, start = tool_cpu(inst.proc.pid), time.monotonic()
                rate = connection_rate(inst.echo, args.seconds, args.concurrency)
                s["conn/s"].append(rate)
                s["conn CPU us each"].append((tool_cpu(inst.proc.pid) - before) * 1e6
                                             / (rate * (time.monotonic() - start)))
            finally:
                inst.stop()
        print(f"round {round_ + 1}: " + "; ".join(
            f"{tool} " + ", ".join(f"{samples[tool][m][-1]:.2f}" for m in metrics)
            for tool in tools), file=sys.stderr)

    med = {tool: {m: statistics.median(v) for m, v in s.items()} for tool, s in samples.items()}
    print(f"raw loopback iperf3: 1 stream {statistics.median(raw[1]):.1f} Gbps, "
          f"4 streams {statistics.median(raw[4]):.1f} Gbps")
    print(f"{'metric (median of ' + str(args.rounds) + ')':32}" +
          "".join(f"{tool:>14}" for tool in tools) +
          ("   ratio" if len(tools) == 2 else ""))
    for m in metrics:
        line = f"{m:32}" + "".join(f"{med[tool][m]:14.2f}" for tool in tools)
        if len(tools) == 2 and med["rootlesskit"][m]:
            line += f"   {med['ours'][m] / med['rootlesskit'][m]:.2f}x"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"raw": raw, "samples": samples, "medians": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
