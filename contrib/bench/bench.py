"""Benchmark: rootless-run against Debian's rootlesskit, side by side in one run.

Each scenario runs both with the same flags (ours under its rootlesskit-compatible
name, so the defaults match too) and the machine's limit without any supervisor,
taking turns every round (the machine is noisy), and reports medians and the ratio
rootless-run / rootlesskit. As root it runs everything as an unprivileged user
(--user, default rlt-test); as a normal user, as that user. Missing tools skip
what needs them; everything it starts is stopped when it ends, also on Ctrl-C.

    python3 -m contrib.bench [--quick] [--only NAME,...] [--json FILE] [--svg FILE]

The soak (`--only soak`, 10 minutes; --quick: 30 s) runs one instance of each side at
the same time under the same load, and reports the drift of their fds, memory and
threads, the errors their clients saw and the latency of short requests.
"""
import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import time

from . import _report, scenarios
from ._procs import Runner, Skip, make_link_dir, user_can_run

QUICK = {"startups": 10, "rounds": 2, "seconds": 1, "connections": 2000, "soak_seconds": 30}
FULL = {"startups": 30, "rounds": 7, "seconds": 3, "connections": 10000, "soak_seconds": 600}


def parse(argv):
    parser = argparse.ArgumentParser(prog="python3 -m contrib.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run, under 2 minutes ({QUICK})")
    parser.add_argument("--startups", type=int, help=f"start-ups a side ({FULL['startups']})")
    parser.add_argument("--rounds", type=int,
                        help=f"rounds of the other scenarios ({FULL['rounds']}; "
                             f"net-slirp4netns: twice as many; memory: at most 3)")
    parser.add_argument("--seconds", type=int, help=f"length of a throughput or connection "
                                                    f"round, whole seconds ({FULL['seconds']})")
    parser.add_argument("--connections", type=int,
                        help=f"connections before the last memory figure, the first included "
                             f"({FULL['connections']})")
    parser.add_argument("--soak-seconds", type=int,
                        help=f"length of the soak ({FULL['soak_seconds']}; --quick: "
                             f"{QUICK['soak_seconds']})")
    parser.add_argument("--user", help="run as this user when run as root (rlt-test)")
    parser.add_argument("--rootless-run", metavar="PATH", default=_default_ours(),
                        help="the rootless-run to measure (default: %(default)s)")
    parser.add_argument("--rootlesskit", metavar="PATH",
                        help="the reference (default: rootlesskit on the user's PATH)")
    parser.add_argument("--only", default="",
                        help="scenarios whose name starts with one of these (comma-separated): "
                             + ", ".join(s.name for s in _names()))
    parser.add_argument("--json", default="rootless-bench.json", metavar="FILE",
                        help="every sample ('' for none; default: %(default)s)")
    parser.add_argument("--svg", default="rootless-bench.svg", metavar="FILE",
                        help="the chart of ratios ('' for none; default: %(default)s)")
    parser.add_argument("--markdown", action="store_true",
                        help="print the table as Markdown too (for the README)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for key, default in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
        elif getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    return args


def _default_ours() -> str:
    """The rootless-run of the venv running the benchmark, else the installed one."""
    here = os.path.join(os.path.dirname(sys.executable), "rootless-run")
    return here if os.path.exists(here) else "/usr/local/bin/rootless-run"


def _names():
    settings = scenarios.Settings(**FULL)
    return scenarios.build(scenarios.Sides(None, "", "", settings))


def main(argv=None) -> int:
    args = parse(argv)
    try:
        runner = Runner(args.user)
    except KeyError:
        return _fail(f"there is no user {args.user or 'rlt-test'}: run contrib/test.sh once "
                     f"(it creates rlt-test), or pass --user NAME")
    except PermissionError as exc:
        return _fail(str(exc))
    # Stop everything also when we are told to stop, not only on Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    link_dir = None
    try:
        if not user_can_run(runner, args.rootless_run):
            return _fail(f"{args.rootless_run}: not found or not executable by "
                         f"{runner.user}: pass --rootless-run PATH (or run contrib/setup.sh)")
        link_dir = make_link_dir(os.path.realpath(args.rootless_run), "rootlesskit")
        ours = os.path.join(link_dir, "rootlesskit")
        theirs = args.rootlesskit or runner.which("rootlesskit")
        if theirs and not user_can_run(runner, theirs):
            theirs = None
        if theirs is None:
            print("bench: rootlesskit is not installed (apt-get install rootlesskit): its "
                  "column is skipped", file=sys.stderr)
        settings = scenarios.Settings(args.startups, args.rounds, args.seconds,
                                      args.connections, args.soak_seconds)
        chosen = scenarios.build(scenarios.Sides(runner, ours, theirs, settings))
        if args.only:
            words = [word.strip() for word in args.only.split(",") if word.strip()]
            chosen = [s for s in chosen if any(s.name.startswith(word) for word in words)]
            if not chosen:
                return _fail(f"--only {args.only}: no such scenario")
        results = _header(runner, args, ours, theirs)
        return _run(runner, chosen, results, args)
    except KeyboardInterrupt:  # before the first scenario (_run handles its own)
        print("bench: interrupted; stopping what it started", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        runner.stop_all()
        if link_dir:
            shutil.rmtree(link_dir, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(runner, chosen, results, args) -> int:
    all_rows, status, started = [], 0, time.monotonic()
    print(f"bench: {results['machine']['description']}; as {runner.user}; "
          f"{args.startups} start-ups, {args.rounds} rounds of {args.seconds} s",
          file=sys.stderr)
    try:
        for scenario in chosen:
            all_rows += _run_scenario(runner, scenario)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping what it started", file=sys.stderr)
        results["interrupted"] = True
        status = 130
    results["seconds"] = round(time.monotonic() - started, 1)
    results["rows"] = all_rows
    print("\n" + _report.terminal_table(all_rows), flush=True)
    if args.markdown:
        print("\n" + _report.markdown_table(all_rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nbench: every sample in {args.json}", file=sys.stderr)
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(_report.svg_chart(all_rows, results["machine"]["description"]))
        print(f"bench: chart in {args.svg}", file=sys.stderr)
    print(f"bench: {results['seconds']:.0f} s", file=sys.stderr)
    return status


def _run_scenario(runner, scenario) -> list[dict]:
    """Rounds of every side in turn, the order reversed every other round (A B L,
    L B A, ...) so that no side always runs just after another."""
    skipped = dict(scenario.skipped)
    missing = [tool for tool in scenario.needs if runner.which(tool) is None]
    if missing:
        why = "; ".join(f"{tool} is not installed (apt-get install "
                        f"{scenarios.PACKAGES.get(tool, tool)})" for tool in missing)
        print(f"bench: {scenario.name}: skipped: {why}", file=sys.stderr)
        return []
    for side, why in skipped.items():
        print(f"bench: {scenario.name}: no {side} figure: {why}", file=sys.stderr)
    order = [side for side in scenarios.SIDES if side in scenario.sides and side not in skipped]
    print(f"bench: {scenario.name} ...", file=sys.stderr)
    if scenario.together:
        return _run_together(scenario, order, skipped)
    with contextlib.ExitStack() as stack:
        if scenario.around:
            try:
                stack.enter_context(scenario.around())
            except Skip as exc:
                print(f"bench: {scenario.name}: skipped: {exc}", file=sys.stderr)
                return []
        return _run_rounds(scenario, order, skipped)


def _run_rounds(scenario, order, skipped) -> list[dict]:
    samples = {side: {} for side in order}
    for i in range(scenario.rounds + int(scenario.warmup)):
        for side in order if i % 2 == 0 else order[::-1]:
            if side in skipped:
                continue
            try:
                values = scenario.sides[side]()
            except Exception as exc:  # noqa: BLE001 - one side failing ends only that side
                skipped[side] = str(exc) if isinstance(exc, Skip) else f"{exc!r}"
                print(f"bench: {scenario.name}: no {side} figure: {exc}", file=sys.stderr)
                continue
            if scenario.warmup and i == 0:
                continue
            for key, v in values.items():
                samples[side].setdefault(key, []).append(v)
    return _rows(scenario, {s: v for s, v in samples.items() if v}, skipped)


def _run_together(scenario, order, skipped) -> list[dict]:
    """A scenario whose sides run at the same time (the soak)."""
    try:
        result = scenario.together({side: scenario.sides[side] for side in order})
    except Skip as exc:
        print(f"bench: {scenario.name}: skipped: {exc}", file=sys.stderr)
        return []
    found = _rows(scenario, result.samples, skipped | result.skipped, result.notes)
    if found:
        found[0][scenario.name] = result.info  # every sample, in the JSON and the chart
    return found


def _rows(scenario, samples, skipped, notes=None) -> list[dict]:
    found = _report.rows(scenario, samples, skipped, notes)
    for row in found:
        print(f"bench: {scenario.name}: {row['label'].strip()}: {_report.summary(row)}",
              file=sys.stderr)
    return found


def _header(runner, args, ours, theirs) -> dict:
    def version(argv):
        try:
            code, out = runner.run(argv, timeout=10)
        except Skip:
            return None
        lines = out.strip().splitlines()
        return lines[0] if code == 0 and lines else None

    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    distro = platform.freedesktop_os_release().get("PRETTY_NAME", "") \
        if hasattr(platform, "freedesktop_os_release") else ""
    machine = {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
               "os": distro, "load": os.getloadavg()}
    machine["description"] = (f"{machine['cpus']} CPUs ({cpu}), Linux {machine['kernel']}, "
                              f"{distro}")
    return {
        "machine": machine,
        "versions": {"rootless-run": version([args.rootless_run, "--version"]),
                     "rootlesskit": theirs and version([theirs, "--version"]),
                     "slirp4netns": version(["slirp4netns", "--version"]),
                     "pasta": version(["pasta", "--version"]),
                     "iperf3": version(["iperf3", "--version"])},
        "command": "python3 -m contrib.bench " + " ".join(sys.argv[1:]),
        "settings": {"startups": args.startups, "rounds": args.rounds,
                     "seconds": args.seconds, "connections": args.connections,
                     "soak_seconds": args.soak_seconds,
                     "rootless-run": os.path.realpath(args.rootless_run), "rootlesskit": theirs,
                     "user": runner.user},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _fail(message: str) -> int:
    print(f"bench: {message}", file=sys.stderr)
    return 1
