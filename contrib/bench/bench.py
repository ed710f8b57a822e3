"""Benchmark: rootless-run against Debian's rootlesskit, side by side in one run.

Each scenario runs both implementations with the same flags, alternating A/B over
several rounds (the machine is noisy), and reports medians and their ratio
(ours / rootlesskit: below 1.0 is faster for times). Run as root it runs the
commands as an unprivileged user (default rlt-test, made by contrib/test.sh);
run as a normal user it runs them as that user.

    python3 -m contrib.bench [--rounds N] [--quick] [--json FILE] [--only NAME]
"""
import argparse
import json
import os
import platform
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import time

VENV = os.environ.get("ROOTLESS_VENV", "/opt/rootless/venv")


class Runner:
    """Runs commands as the benchmark user."""

    def __init__(self, user: str):
        self.as_root = os.getuid() == 0
        pw = pwd.getpwnam(user) if self.as_root else pwd.getpwuid(os.getuid())
        self.env = {
            "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "XDG_RUNTIME_DIR": f"/run/user/{pw.pw_uid}",
        }
        self.prefix = (["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                        "--init-groups", "--"] if self.as_root else [])

    def time_once(self, argv: list[str]) -> float:
        """Wall time of one run, from exec to exit (setpriv's own exec is measured
        by the same amount for both implementations)."""
        start = time.perf_counter()
        subprocess.run(self.prefix + argv, env=self.env, cwd="/tmp", check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def alternate(runner: Runner, ours: list[str], theirs: list[str], rounds: int):
    a, b = [], []
    runner.time_once(ours)  # warm the page cache for both
    runner.time_once(theirs)
    for _ in range(rounds):
        a.append(runner.time_once(ours))
        b.append(runner.time_once(theirs))
    return a, b


def scenario_startup_host(runner, rounds, ours_bin, theirs_bin):
    flags = ["--net=host"]
    return alternate(runner, [ours_bin, *flags, "true"], [theirs_bin, *flags, "true"], rounds)


def scenario_startup_slirp(runner, rounds, ours_bin, theirs_bin):
    flags = ["--net=slirp4netns", "--copy-up=/etc", "--disable-host-loopback"]
    return alternate(runner, [ours_bin, *flags, "true"], [theirs_bin, *flags, "true"], rounds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iperf_child_to_host(runner, argv_prefix: list[str], seconds: int) -> float:
    """Gbit/s from an iperf3 client in the namespace to a server on the host's loopback,
    reached through the gateway (10.0.2.2 maps to the host's 127.0.0.1)."""
    port = _free_port()
    server = subprocess.Popen(runner.prefix + ["iperf3", "-s", "-1", "-B", "127.0.0.1",
                                               "-p", str(port)],
                              env=runner.env, cwd="/tmp", stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        out = subprocess.run(runner.prefix + argv_prefix + [
            "iperf3", "-c", "10.0.2.2", "-p", str(port), "-t", str(seconds), "-J"],
            env=runner.env, cwd="/tmp", check=True, capture_output=True, text=True).stdout
        return json.loads(out[out.index("{"):])["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        server.kill()
        server.wait()


def throughput(runner, rounds, ours_argv, theirs_argv, seconds=3):
    a, b = [], []
    for _ in range(max(1, rounds)):
        a.append(iperf_child_to_host(runner, ours_argv, seconds))
        b.append(iperf_child_to_host(runner, theirs_argv, seconds))
    return a, b


def scenario_net_slirp(runner, rounds, ours_bin, theirs_bin):
    flags = ["--net=slirp4netns"]
    return throughput(runner, rounds, [ours_bin, *flags], [theirs_bin, *flags])


def scenario_net_pasta(runner, rounds, ours_bin, theirs_bin):
    # rootlesskit 1.1 has no pasta: compared with our slirp4netns, which is what
    # --net=auto weighs it against.
    return throughput(runner, rounds, [ours_bin, "--net=pasta"], [ours_bin, "--net=slirp4netns"])


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


def _published(runner, argv: list[str], child_port: int, seconds: float = 10.0,
               probe: bool = True):
    """Start an instance publishing 127.0.0.1:PORT -> child_port; returns (proc, port)
    once a connection through it reaches the child's echo server (probe), or once the
    port accepts connections (not probe)."""
    port = _free_port()
    proc = subprocess.Popen(runner.prefix + [argv[0], "--net=slirp4netns",
                                             "--port-driver=builtin",
                                             f"-p=127.0.0.1:{port}:{child_port}/tcp",
                                             *argv[1:]],
                            env=runner.env, cwd="/tmp", stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                if not probe:
                    return proc, port
                c.sendall(b"ping")
                if c.recv(4):
                    return proc, port
        except OSError:
            pass
        time.sleep(0.05)
    _stop(proc)
    raise subprocess.CalledProcessError(1, argv, stderr="the published port never answered")


def _stop(proc) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, 9)
        proc.wait()


def _port_iperf(runner, binary: str, streams: int, seconds: int) -> float:
    proc, port = _published(runner, [binary, "--", "iperf3", "-s", "-p", "5201"], 5201,
                            probe=False)
    try:
        for _ in range(20):  # until iperf3 listens in the child
            run = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t",
                                  str(seconds), "-P", str(streams), "-J"],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                return json.loads(run.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
            time.sleep(0.2)
        raise subprocess.CalledProcessError(run.returncode, run.args, stderr=run.stdout[-300:])
    finally:
        _stop(proc)


def scenario_port_tcp(streams):
    def scenario(runner, rounds, ours_bin, theirs_bin):
        a, b = [], []
        for _ in range(max(1, rounds)):
            a.append(_port_iperf(runner, ours_bin, streams, 3))
            b.append(_port_iperf(runner, theirs_bin, streams, 3))
        return a, b
    return scenario


def _connection_rate(runner, binary: str, seconds: float) -> float:
    """Connections a second: connect, 4 bytes each way, close; one client."""
    proc, port = _published(runner, [binary, "--", "python3", "-c", ECHO_SERVER, "5202"],
                            5202)
    try:
        done, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(b"ping")
                if c.recv(4) != b"ping":
                    raise subprocess.CalledProcessError(1, ["echo"], stderr="bad echo")
            done += 1
        return done / seconds
    finally:
        _stop(proc)


def scenario_connection_rate(runner, rounds, ours_bin, theirs_bin):
    a, b = [], []
    for _ in range(max(1, rounds)):
        a.append(_connection_rate(runner, ours_bin, 3))
        b.append(_connection_rate(runner, theirs_bin, 3))
    return a, b


# name -> (function, unit, which way is better, rounds divisor)
SCENARIOS = {
    "startup: X --net=host true": (scenario_startup_host, "ms", "lower is better", 1),
    "startup: X --net=slirp4netns --copy-up=/etc --disable-host-loopback true":
        (scenario_startup_slirp, "ms", "lower is better", 1),
    "net child->host TCP, slirp4netns": (scenario_net_slirp, "Gbps", "higher is better", 4),
    "net child->host TCP, ours: pasta vs slirp4netns":
        (scenario_net_pasta, "Gbps", "higher is better", 4),
    "builtin port TCP host->child, 1 stream": (scenario_port_tcp(1), "Gbps",
                                               "higher is better", 6),
    "builtin port TCP host->child, 4 streams": (scenario_port_tcp(4), "Gbps",
                                                "higher is better", 6),
    "builtin port: short connections/s": (scenario_connection_rate, "conn/s",
                                          "higher is better", 6),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m contrib.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40, help="A/B rounds a scenario")
    parser.add_argument("--quick", action="store_true", help="few rounds, for a smoke check")
    parser.add_argument("--user", default="rlt-test", help="user to run as, when run as root")
    parser.add_argument("--json", default="", help="write every sample to this file")
    parser.add_argument("--only", default="", help="run scenarios whose name contains this")
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else args.rounds

    # Ours under its rootlesskit-compatible name: the same flags then mean the same
    # thing for both (rootless-run's own defaults add a copy-up of /etc, for one).
    ours = os.path.join(VENV, "bin", "docker-rootlesskit")
    theirs = shutil.which("rootlesskit")
    if shutil.which("iperf3") is None:
        print("bench: iperf3 is not installed (apt-get install iperf3)", file=sys.stderr)
        return 1
    if not os.path.exists(ours):
        print("bench: rootless-run is not installed: run contrib/setup.sh", file=sys.stderr)
        return 1
    if theirs is None:
        print("bench: Debian's rootlesskit is not installed (apt-get install rootlesskit): "
              "nothing to compare with", file=sys.stderr)
        return 1
    try:
        runner = Runner(args.user)
    except KeyError:
        print(f"bench: no user {args.user}: run contrib/test.sh once, or pass --user",
              file=sys.stderr)
        return 1

    results = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                           "python": platform.python_version()},
               "rounds": rounds, "scenarios": {}}
    print(f"{'scenario':72} {'ours':>10} {'reference':>10} {'ratio':>7}")
    for name, (func, unit, sense, divisor) in SCENARIOS.items():
        if args.only and args.only not in name:
            continue
        try:
            a, b = func(runner, max(1, rounds // divisor), ours, theirs)
        except subprocess.CalledProcessError as exc:
            print(f"{name:72} skipped: {' '.join(map(str, exc.cmd[-4:]))} failed "
                  f"({exc.returncode}): {(exc.stderr or '').strip()[:200]}")
            continue
        scale = 1000 if unit == "ms" else 1
        ma, mb = statistics.median(a) * scale, statistics.median(b) * scale
        ratio = ma / mb
        print(f"{name:72} {ma:7.1f}{unit:>4} {mb:7.1f}{unit:>4} {ratio:6.2f}x  ({sense})")
        results["scenarios"][name] = {"unit": unit, "ours": a, "rootlesskit": b,
                                      "median_ours": ma, "median_rootlesskit": mb,
                                      "ratio": ratio}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0
