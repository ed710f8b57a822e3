"""The soak: one instance of each supervisor (the same flags: slirp4netns, builtin
ports, a TCP and a UDP port published on the host's 127.0.0.1, servers on 127.0.0.1
in the namespace), both under the same load at the same time for minutes
(`_soak_load`), as the benchmark user. Every interval, for each: the open fds, PSS,
RSS and threads of the supervisor's processes (the command's excepted, as the memory
scenario counts them), the errors its clients saw and the latency of its short
requests. What it reports: the drift after the warm-up (the slope of a least-squares
line, per minute), the errors, and the latency percentiles side by side."""
import json
import os
import selectors
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

from . import _soak_load, _soak_server
from . import _workloads as w
from ._procs import Runner, Skip, last_error

TCP_PORT, UDP_PORT = 5202, 5203  # the servers', in the namespace
SPECS = ["127.0.0.1:{P}:%d/tcp" % TCP_PORT, "127.0.0.1:{P}:%d/udp" % UDP_PORT]
FLAGS = ["--net=slirp4netns", "--port-driver=builtin"]
# Long enough for the UDP flows to reach their level: they live until idle for 60 s
# in ours and 90 s in rootlesskit, and new ones come all the time.
WARMUP = 120
NAMES = {"ours": "rootless-run", "rootlesskit": "rootlesskit"}


# The programs run as the user, from copies in its state dir (the user may not be
# able to read this checkout).
PROGRAMS = {"server": _soak_server, "load": _soak_load}
LOAD_TEXT = (f"{_soak_load.RATE} short requests/s (a third reset mid-request), "
             f"{_soak_load.FLOWS} UDP flows/s from new 127.x.y.z sources, a bulk stream "
             f"each way (8 MiB bursts), a port added and removed through the API every "
             f"second")


@dataclass
class Soak:
    samples: dict  # side -> {metric key: [values]}, as a scenario's rounds give them
    notes: dict    # metric key -> a line for the table
    skipped: dict = field(default_factory=dict)  # side -> why
    info: dict = field(default_factory=dict)     # every sample, for the JSON and the chart


@dataclass
class Instance:
    proc: subprocess.Popen
    port: int
    state_dir: str
    command: list[str]  # the server's, in the namespace
    exited: bool = False


def timing(seconds: int) -> tuple[float, float]:
    """(sampling interval, warm-up) in seconds: a sample every 10 s (a sixth of the
    run when it is under 2 minutes, so a short run has some), WARMUP at most."""
    interval = 10.0 if seconds >= 120 else max(1.0, seconds / 6)
    return interval, min(WARMUP, seconds / 3)


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


def run(runner: Runner, binaries: dict[str, str], ctl: str | None, seconds: int) -> Soak:
    """Soak the supervisors `binaries` ({side: path}) together for `seconds`; `ctl`:
    the rootless-ctl whose `enter` runs against ours."""
    interval, warmup = timing(seconds)
    skipped = {}
    if ctl:
        print(f"bench: soak: `rootless-ctl enter -- true` every {_soak_load.ENTER_EVERY:g} s "
              f"runs against rootless-run only: rootlesskit has no such command",
              file=sys.stderr)
    with ExitStack() as stack:
        base = _state_base(runner)
        stack.callback(runner.run, ["rm", "-rf", base], timeout=30)
        programs = _copy_programs(runner, base)
        live = {}
        for side, binary in binaries.items():
            state_dir = os.path.join(base, side)
            supervisor = [binary, *FLAGS, f"--state-dir={state_dir}"]
            try:
                proc, port = stack.enter_context(
                    w.published(runner, supervisor, SPECS, programs["server"], TCP_PORT))
            except Skip as exc:
                skipped[side] = str(exc)
                print(f"bench: soak: no {side} figure: {exc}", file=sys.stderr)
                continue
            live[side] = Instance(proc, port, state_dir, programs["server"])
        if not live:
            return Soak({}, {}, skipped)
        drivers, logged = {}, {}
        bands = _api_ports(list(live))
        for side, instance in live.items():
            logged[side] = instance.proc.errors.seek(0, os.SEEK_END)  # before the load
            enter = [ctl, "enter", "--state-dir", instance.state_dir, "--", "true"] \
                if ctl and side == "ours" else None
            config = {"port": instance.port, "seconds": seconds, "interval": interval,
                      "api": os.path.join(instance.state_dir, "api.sock"),
                      "api_ports": bands[side], "child_port": TCP_PORT, "enter": enter}
            drivers[side] = runner.start([*programs["load"], json.dumps(config)],
                                         stdout=subprocess.PIPE)
            stack.callback(runner.stop, drivers[side])
        series = _collect(live, drivers, seconds, interval)
        for side, driver in drivers.items():
            try:
                code = driver.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = "did not end"
            if code != 0:
                skipped[side] = f"the load failed ({code}): {last_error(driver)}"
        for side, instance in live.items():
            logged[side] = _logged(side, instance.proc, logged[side])
    result = _figures({s: v for s, v in series.items() if s not in skipped}, skipped,
                      seconds, interval, warmup, ctl)
    result.info["logged"] = logged
    return result


def _logged(side: str, proc: subprocess.Popen, offset: int) -> list[str]:
    """What the supervisor wrote to stderr from `offset` on (a warning under load may
    be a bug its clients did not see), said once on the terminal."""
    proc.errors.seek(offset)
    lines = [line for line in proc.errors.read().decode(errors="replace").splitlines()
             if line.strip()]
    if lines:
        print(f"bench: soak: {NAMES[side]} logged {len(lines)} lines during the load; "
              f"the last: {lines[-1][:200]}", file=sys.stderr)
    return lines[-20:]


def _state_base(runner: Runner) -> str:
    """A dir of the user's for the two state dirs (in its runtime dir when there is
    one: no other user can change a path there)."""
    runtime = runner.env["XDG_RUNTIME_DIR"]
    parent = runtime if os.path.isdir(runtime) else "/tmp"
    code, out = runner.run(["mktemp", "-d", "-p", parent, "rootless-bench-soak-XXXXXX"],
                           timeout=10)
    if code != 0:
        raise Skip(f"could not make a state dir in {parent} as {runner.user}")
    return out.strip()


def _api_ports(sides: list[str]) -> dict[str, tuple[int, int]]:
    """For each side, its own range of ports for the ports it adds through the API:
    below the ephemeral ports, so that no client connection takes one of them between
    the load's check and the supervisor's bind, and apart from the other side's."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            top = int(f.read().split()[0]) - 1
    except (OSError, ValueError, IndexError):
        top = 32767
    first = min(10000, top // 2)
    size = (top - first + 1) // len(sides)
    return {side: (first + i * size, first + (i + 1) * size - 1)
            for i, side in enumerate(sides)}


def _copy_programs(runner: Runner, base: str) -> dict[str, list[str]]:
    """{name: the command running it} for PROGRAMS, copied to `base` as the user."""
    commands = {}
    for name, module in PROGRAMS.items():
        path = os.path.join(base, f"soak_{name}.py")
        with open(module.__file__, "rb") as f:
            code, _ = runner.run(["sh", "-c", 'cat > "$1"', "sh", path], timeout=10,
                                 input=f.read())
        if code != 0:
            raise Skip(f"could not write {path} as {runner.user}")
        commands[name] = ["python3", path]
    commands["server"] += [str(TCP_PORT), str(UDP_PORT)]
    return commands


def _collect(live: dict, drivers: dict, seconds: int, interval: float) -> dict:
    """The loads' lines as they come, each with the supervisor's figures of that
    moment; until every load has ended (or has overrun by a minute)."""
    selector = selectors.DefaultSelector()
    for side, driver in drivers.items():
        selector.register(driver.stdout, selectors.EVENT_READ, side)
    series = {side: [] for side in drivers}
    pending = {side: b"" for side in drivers}
    every = max(1, round(60 / interval)) if seconds >= 120 else 1
    shown, deadline = 0, time.monotonic() + seconds + 60
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            side = key.data
            data = os.read(key.fileobj.fileno(), 65536)
            if not data:
                selector.unregister(key.fileobj)
                continue
            pending[side] += data
            while b"\n" in pending[side]:
                line, pending[side] = pending[side].split(b"\n", 1)
                series[side].append(_sample(live[side], json.loads(line)))
        while shown < min(len(samples) for samples in series.values()):
            shown += 1
            if shown % every == 0:
                _progress(series, shown - 1)
    selector.close()
    return series


def _sample(instance: Instance, line: dict) -> dict:
    """A load's line with the supervisor's fds, memory and threads added; a
    supervisor that has exited is an error of its clients' (once)."""
    sample = dict(line)
    if instance.exited:
        return sample
    if instance.proc.poll() is None:
        try:
            sample.update(w.supervisor_usage(instance.proc.pid, instance.command))
            return sample
        except Skip:  # the command is gone: the supervisor is ending
            pass
    instance.exited = True
    why = f"the supervisor exited: {last_error(instance.proc)}" \
        if instance.proc.poll() is not None else "the command in the namespace is gone"
    sample["errors"] = {**sample["errors"], why: 1}
    return sample


def _progress(series: dict, i: int) -> None:
    parts = []
    for side, samples in series.items():
        last = samples[i]
        p99 = last.get("p99_us")
        parts.append(f"{NAMES[side]} fds {last.get('fds', '-')}, PSS "
                     f"{last.get('pss', 0):.1f} MiB, threads {last.get('threads', '-')}, "
                     f"p99 {'-' if p99 is None else f'{p99:.0f} us'}, "
                     f"errors {sum(last['errors'].values())}")
    t = next(iter(series.values()))[i]["t"]
    print(f"bench: soak: {clock(t)}  " + " | ".join(parts), file=sys.stderr)


# The figures whose drift is reported: sample key -> unit of the change.
DRIFTS = {"fds": "fds", "pss": "MiB", "rss": "MiB", "threads": "threads"}


def _figures(series: dict, skipped: dict, seconds: int, interval: float, warmup: float,
             ctl: str | None) -> Soak:
    samples, errors = {}, {}
    for side, got in series.items():
        settled = [s for s in got if s["t"] >= warmup - interval / 2]
        values = {key: [fit[0]] for key in DRIFTS if (fit := drift(settled, key))}
        errors[side] = {}
        for sample in got:  # the warm-up's errors too: none is allowed
            for kind, n in sample["errors"].items():
                errors[side][kind] = errors[side].get(kind, 0) + n
        values["errors"] = [sum(errors[side].values())]
        windows = [s for s in got if s["t"] - interval >= warmup - interval / 2]
        for key in ("p50", "p99"):
            found = [s[f"{key}_us"] for s in windows if s.get(f"{key}_us") is not None]
            if found:
                values[key] = found
        samples[side] = values
    notes = {key: _change(series, key, unit, warmup, interval) for key, unit in DRIFTS.items()}
    notes["errors"] = "; ".join(
        f"{NAMES[side]}: " + (", ".join(f"{kind} x{n}" for kind, n in sorted(kinds.items()))
                              or "none") for side, kinds in errors.items())
    if warmup < WARMUP:
        print(f"bench: soak: a warm-up of {clock(warmup)} is shorter than the UDP flows' idle "
              f"time (60 s ours, 90 s rootlesskit's): fds and memory of a run this short "
              f"still rise with the flows", file=sys.stderr)
    info = {"seconds": seconds, "interval": interval, "warmup": warmup, "load": LOAD_TEXT,
            "enter": (f"rootless-ctl enter -- true every {_soak_load.ENTER_EVERY:g} s, "
                      f"rootless-run only (rootlesskit has no such command)") if ctl else None,
            "errors": errors, "series": series}
    return Soak(samples, notes, skipped, info)


def drift(samples: list[dict], key: str) -> tuple[float, float | None] | None:
    """(slope, its standard error) of the least-squares line through the samples,
    per minute. The error says what the samples' noise allows: the builtin driver
    keeps pools of up to 64 sockets of each kind, so ours' fds swing by as much from
    one sample to the next without any leak."""
    points = [(s["t"] / 60, s[key]) for s in samples if key in s]
    if len(points) < 2:
        return None
    t, y = zip(*points)
    fit = statistics.linear_regression(t, y)
    if len(points) < 3:
        return fit.slope, None
    mean = statistics.fmean(t)
    residuals = sum((b - fit.intercept - fit.slope * a) ** 2 for a, b in points)
    spread = sum((a - mean) ** 2 for a in t)
    return fit.slope, (residuals / (len(points) - 2) / spread) ** 0.5


def _change(series: dict, key: str, unit: str, warmup: float, interval: float) -> str:
    """Each side's slope's standard error, and the last sample after the warm-up minus
    the first: the drift in plain terms."""
    errors, changes, span = [], [], ""
    digits = 1 if unit == "MiB" else 0
    for got in series.values():
        settled = [s for s in got if s["t"] >= warmup - interval / 2 and key in s]
        fit = drift(settled, key)
        if not fit:
            continue
        errors.append("-" if fit[1] is None else f"{fit[1]:.{digits + 2}f}")
        changes.append(f"{settled[-1][key] - settled[0][key]:+.{digits}f}")
        span = f"{clock(settled[0]['t'])}-{clock(settled[-1]['t'])}"
    if not errors:
        return ""
    return (f"standard error {', '.join(errors)} {unit}/min; last - first, "
            f"{span}: {', '.join(changes)} {unit}")
