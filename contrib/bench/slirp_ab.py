"""Paired A/B of slirp4netns child->host TCP: ours against Debian's rootlesskit.

The main benchmark's net-slirp4netns scenario gives one median per side. This looks
closer, at what decides a round: iperf3 reports every 0.1 s, and an interval under
3 Gbit/s is counted as a stall (libslirp's ~0.2 s waits, docs/performance.md). Rounds
are interleaved (ours first in even rounds, rootlesskit first in odd ones), each side
with a fresh iperf3 server on the host's 127.0.0.1, reached at the gateway 10.0.2.2.
Ours runs under rootlesskit's name, which gives it rootlesskit's defaults.

    python3 -m contrib.bench.slirp_ab [--rounds N] [--seconds S] [--json FILE]
        [--rootless-run PATH] [--user NAME] [--calibrate] [-- EXTRA FLAGS FOR OURS]

Extra flags after `--` go to ours only (e.g. `--slirp4netns-binary=WRAPPER`, to try a
variant of the invocation). `--calibrate` runs ours on both sides ("ours" and "ours
again", the same build and flags): how far apart two identical sides come out is the
noise any real difference has to stand out of.
"""
import argparse
import json
import os
import shutil
import statistics
import sys

from . import _workloads as w
from ._procs import Runner, Skip, make_link_dir
from .scenarios import GATEWAY

STALL_GBPS = 3.0


def one_round(runner: Runner, supervisor: list[str], seconds: int) -> list[float] | None:
    """Gbit/s of each 0.1 s interval, or None when iperf3 failed (said on stderr)."""
    try:
        with w.iperf_server(runner) as port:
            return w.iperf_client(runner, supervisor + ["--net=slirp4netns", "--"], GATEWAY,
                                  port, seconds, interval=0.1)["intervals"]
    except Skip as exc:
        print(f"  {exc}", file=sys.stderr)
        return None


def summary(rounds: dict[str, list[list[float]]]) -> str:
    """Each side's medians and stalls, then the pairs: in how many the first side did
    better, and the median of first / second."""
    lines = []
    for side, rows in rounds.items():
        means = [statistics.mean(r) for r in rows]
        stalls = [sum(1 for x in r if x < STALL_GBPS) for r in rows]
        lines.append(
            f"{side:12} rounds {len(rows)}, median {statistics.median(means):.2f} Gbit/s, "
            f"median 0.1 s interval {statistics.median(x for r in rows for x in r):.2f}, "
            f"rounds with a stall {sum(1 for s in stalls if s)}, stalled intervals {sum(stalls)}")
    (first, ours), (_, theirs) = rounds.items()
    wins = sum(1 for a, b in zip(ours, theirs) if statistics.mean(a) > statistics.mean(b))
    ratios = [statistics.mean(a) / statistics.mean(b) for a, b in zip(ours, theirs)]
    lines.append(f"{first} better in {wins}/{len(ratios)} paired rounds, "
                 f"median ratio {statistics.median(ratios):.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slirp_ab", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--rootless-run", default=shutil.which("rootless-run") or
                        "/opt/rootless/venv/bin/rootless-run")
    parser.add_argument("--user", help="run as this user (root only; default rlt-test)")
    parser.add_argument("--calibrate", action="store_true",
                        help="ours on both sides: the A/A noise")
    parser.add_argument("extra", nargs="*", help="flags for ours only, after --")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    runner = Runner(args.user)
    for tool in ("iperf3", "slirp4netns", "rootlesskit"):
        if not runner.which(tool):
            print(f"slirp_ab: {tool} is not installed (apt-get install {tool})", file=sys.stderr)
            return 1
    link_dir = make_link_dir(os.path.realpath(args.rootless_run), "rootlesskit")
    try:
        ours = [os.path.join(link_dir, "rootlesskit"), *args.extra]
        sides = {"ours": ours,
                 **({"ours again": ours} if args.calibrate else
                    {"rootlesskit": [runner.which("rootlesskit")]})}
        rounds: dict[str, list[list[float]]] = {side: [] for side in sides}
        for i in range(args.rounds):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            got = {side: one_round(runner, sides[side], args.seconds) for side in order}
            if None in got.values():
                continue  # keep the rounds paired
            for side, intervals in got.items():
                rounds[side].append(intervals)
            print(f"round {i}: " + ", ".join(f"{side} {statistics.mean(v):.2f}"
                                             for side, v in got.items()), flush=True)
    finally:
        shutil.rmtree(link_dir)
    if not rounds["ours"]:
        print("slirp_ab: no round completed", file=sys.stderr)
        return 1
    print(summary(rounds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounds, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
