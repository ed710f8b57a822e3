"""Benchmark: `rootless-ctl enter -- true` against `nsenter -U --preserve-credentials
-m -n -t PID true` on the same running instance, alternating, medians.

Run as root it re-runs itself as an unprivileged user (default rlt-test) so the timed
commands are started by that user directly (no setpriv inside the timings). It starts
one instance (`rootless-run --net=slirp4netns --state-dir DIR -- sleep`), times both
commands in turns, and stops the instance.

    python3 contrib/bench/enter_bench.py [--rounds N] [--user NAME] [--venv DIR]
"""
import argparse
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def _time(argv: list[str]) -> float:
    """Wall time from spawn to exit; posix_spawn keeps the harness' own cost small."""
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ)
    _, status = os.waitpid(pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(argv)} failed with status {os.waitstatus_to_exitcode(status)}")
    return elapsed


def _wait_for(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            sys.exit(f"the instance did not record {path} within {timeout:.0f} s")
        time.sleep(0.01)


def measure(venv: str, rounds: int) -> int:
    ctl, run = os.path.join(venv, "bin", "rootless-ctl"), os.path.join(venv, "bin", "rootless-run")
    nsenter = shutil.which("nsenter")
    state = tempfile.mkdtemp(prefix="enter-bench-", dir=os.environ.get("XDG_RUNTIME_DIR"))
    instance = subprocess.Popen([run, "--net=slirp4netns", "--state-dir", state, "--",
                                 "sleep", "3600"], start_new_session=True)
    try:
        _wait_for(os.path.join(state, "namespaces"))
        with open(os.path.join(state, "child_pid")) as f:
            pid = f.read().strip()
        ours = [ctl, "enter", "--state-dir", state, "--", "/bin/true"]
        theirs = [nsenter, "-U", "--preserve-credentials", "-m", "-n", "-t", pid, "/bin/true"]
        python = [os.path.join(venv, "bin", "python"), "-c", "pass"]
        for argv in (ours, theirs, python):  # warm the page cache
            _time(argv)
        a, b, p = [], [], []
        for _ in range(rounds):
            a.append(_time(ours))
            b.append(_time(theirs))
            p.append(_time(python))
    finally:
        os.killpg(instance.pid, signal.SIGTERM)
        instance.wait()
        shutil.rmtree(state, ignore_errors=True)
    ma, mb, mp = (statistics.median(x) * 1000 for x in (a, b, p))
    print(f"rounds: {rounds} (alternating), user uid {os.getuid()}, {os.cpu_count()} CPUs")
    print(f"rootless-ctl enter -- true                        median {ma:6.2f} ms")
    print(f"nsenter -U --preserve-credentials -m -n -t PID true  median {mb:6.2f} ms")
    print(f"ratio: {ma / mb:.2f}x")
    print(f"(for scale: the venv's `python -c pass`             median {mp:6.2f} ms)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--user", default="rlt-test", help="user to run as, when run as root")
    parser.add_argument("--venv", default=os.environ.get("ROOTLESS_VENV", "/opt/rootless/venv"))
    args = parser.parse_args()
    if os.getuid() == 0:
        pw = pwd.getpwnam(args.user)
        env = {"HOME": pw.pw_dir, "USER": pw.pw_name, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
               "XDG_RUNTIME_DIR": f"/run/user/{pw.pw_uid}"}
        return subprocess.run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                               "--init-groups", "--", sys.executable, os.path.abspath(__file__),
                               "--rounds", str(args.rounds), "--venv", args.venv],
                              env=env, cwd="/tmp").returncode
    return measure(args.venv, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
