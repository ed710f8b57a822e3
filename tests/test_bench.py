"""The benchmark (contrib/bench) still works: runs with tiny sizes, as the test user.

Not a timing test: it checks that each scenario gives figures for every side that
can run here (or says why not), that the files are written, that bad input is one
line, and that nothing is left running, also after a Ctrl-C.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from contrib.bench import lxc_lab  # noqa: E402
TINY = ["--quick", "--startups", "2", "--rounds", "1", "--seconds", "1",
        "--connections", "200", "--soak-seconds", "6"]


def bench_argv(user, rootless_run, tmp_path, *args) -> list[str]:
    return [sys.executable, "-m", "contrib.bench", "--user", user.name,
            "--rootless-run", rootless_run, "--json", str(tmp_path / "bench.json"),
            "--svg", str(tmp_path / "bench.svg"), *args]


def bench(user, rootless_run, tmp_path, *args, timeout=240):
    return subprocess.run(bench_argv(user, rootless_run, tmp_path, *args), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def rows(tmp_path) -> dict:
    with open(tmp_path / "bench.json") as f:
        return {row["label"]: row for row in json.load(f)["rows"]}


def test_every_scenario_gives_figures(user, rootless_run, tmp_path):
    run = bench(user, rootless_run, tmp_path, *TINY)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    found = rows(tmp_path)
    have = {tool: shutil.which(tool) for tool in ("rootlesskit", "iperf3", "pasta")}
    expected = ["startup: X --net=host true", "builtin port: short connections/s",
                "memory PSS, idle, 1 port", "memory PSS after the first connection",
                "first client's answer through a published port",
                "memory RSS after 200 connections",
                # memory-udp: a tenth as many UDP clients, a flow each
                "first UDP client's answer through a published port",
                "memory PSS after the first UDP client", "memory PSS after 20 UDP clients"]
    if not lxc_lab.missing():
        expected.append("startup: X --net=lxc-user-nic true")
        if have["iperf3"]:
            expected.append("net child->bridge TCP, lxc-user-nic")
    if have["iperf3"]:
        expected += ["builtin port TCP host->child, 1 stream",
                     "builtin port TCP host->child, 4 streams",
                     "slirp4netns port TCP host->child, 1 stream",
                     "net child->host TCP, slirp4netns"]
    for label in expected:
        row = found[label]
        assert row["samples"]["ours"], (label, row["skipped"])
        assert bool(row["samples"].get("rootlesskit")) == bool(have["rootlesskit"]), label
        assert row["median"]["ours"] > 0
    assert found["startup: X --net=host true"]["samples"]["limit"]
    assert found["builtin port: short connections/s"]["samples"]["limit"]
    # 200 connections went through the port by the last memory figure.
    assert len(found["memory PSS after 200 connections"]["samples"]["ours"]) == 1
    if have["iperf3"]:
        assert found["builtin port TCP host->child, 1 stream"]["samples"]["limit"]
        udp = found["builtin port UDP host->child (-b 0, 1400 B)"]
        # Our builtin UDP may not be there yet: then it says so, in one clear line.
        assert udp["samples"].get("ours") or "udp" in udp["skipped"]["ours"]
        if have["rootlesskit"]:
            assert 0 <= udp["median"]["rootlesskit"]
            assert found["  UDP datagrams lost"]["samples"]["rootlesskit"]
    if not lxc_lab.missing():
        assert found["startup: X --net=lxc-user-nic true"]["samples"]["limit"]
        if have["iperf3"]:
            # ours through slirp4netns, in the same lab and rounds, in the limit column
            lxc = found["net child->bridge TCP, lxc-user-nic"]
            assert lxc["samples"]["ours"] and lxc["samples"]["limit"]
            assert lxc["limit_label"] == "rootless-run --net=slirp4netns"
    if have["iperf3"] and have["pasta"]:
        pasta = found["net child->host TCP, pasta"]
        assert pasta["samples"]["ours"] and pasta["samples"]["limit"]
        assert "no pasta" in pasta["skipped"]["rootlesskit"]
    # The table, with a ratio for each pair.
    assert "rootless-run" in run.stdout and "rootlesskit" in run.stdout
    if have["rootlesskit"]:
        assert found["startup: X --net=host true"]["ratio"] > 0
    # The chart: one bar a compared metric.
    chart = ET.parse(tmp_path / "bench.svg").getroot()
    bars = [r for r in chart.iter("{http://www.w3.org/2000/svg}rect")][1:]  # less the page
    assert len(bars) == sum(1 for row in found.values() if row["advantage"])
    assert len(bars) >= len(expected)


def test_soak_gives_samples_and_report_lines(user, rootless_run, tmp_path):
    """Both supervisors at once under the soak's load, a sample a second for 6 s:
    every sample has the supervisor's figures and the clients' counts, and the report
    has its rows, its lines and its chart. (No figure is judged: a tiny run on a
    shared machine.)"""
    run = bench(user, rootless_run, tmp_path, "--only", "soak", "--soak-seconds", "6")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    have_theirs = bool(shutil.which("rootlesskit"))
    sides = {"ours", "rootlesskit"} if have_theirs else {"ours"}
    found = rows(tmp_path)
    what = ["open fds, drift after warm-up", "memory PSS, drift after warm-up",
            "memory RSS, drift after warm-up", "threads, drift after warm-up",
            "errors seen by the clients", "short request p50 (median of the windows)",
            "short request p99 (median of the windows)"]
    for label in (f"soak 6 s: {w}" for w in what):
        assert set(found[label]["samples"]) == sides, label
        assert f"bench: soak: {label}: rootless-run " in run.stderr
        assert label in run.stdout  # the table
    if have_theirs:
        assert found["soak 6 s: short request p50 (median of the windows)"]["ratio"] > 0
    info = found["soak 6 s: open fds, drift after warm-up"]["soak"]
    assert (info["seconds"], info["interval"], info["warmup"]) == (6, 1.0, 2.0)
    assert set(info["series"]) == sides
    for side, samples in info["series"].items():
        assert len(samples) == 6, side
        for sample in samples:
            assert sample["fds"] > 0 and sample["pss"] > 0 and sample["threads"] > 0
            assert sample["processes"] >= 3  # parent, child, slirp4netns at least
            assert isinstance(sample["errors"], dict)
        done = {}
        for sample in samples:
            for key, n in sample["done"].items():
                done[key] = done.get(key, 0) + n
        assert done["short"] and done["resets"] and done["udp"] and done["bulk bytes"], side
        assert done["api add+remove"], (side, info["errors"][side])
        assert bool(done.get("enter")) == (side == "ours"), (side, info["errors"][side])
    assert "rootlesskit has no such command" in run.stderr
    # The chart: a line a side in each of the four plots.
    chart = ET.parse(tmp_path / "bench.svg").getroot()
    lines = list(chart.iter("{http://www.w3.org/2000/svg}polyline"))
    assert len(lines) == 4 * len(sides)
    # The state dirs and the programs' copies are gone with the instances.
    assert not [n for n in os.listdir(user.runtime_dir) if n.startswith("rootless-bench-soak")]


@pytest.mark.skipif(bool(lxc_lab.missing()), reason=lxc_lab.missing() or "-")
def test_lxc_user_nic_scenarios_remove_their_lab(user, rootless_run, tmp_path):
    """The two --net=lxc-user-nic scenarios give figures for each side, and leave
    nothing of their lab: no netns, no dnsmasq, no line in lxc-usernet."""
    def usernet():
        try:
            with open(lxc_lab.USERNET) as f:
                return f.read()
        except FileNotFoundError:
            return None

    before = usernet()
    run = bench(user, rootless_run, tmp_path, *TINY, "--only", "startup-lxc,net-lxc")
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    found = rows(tmp_path)
    sides = {"ours", "limit"} | ({"rootlesskit"} if shutil.which("rootlesskit") else set())
    for label in ("startup: X --net=lxc-user-nic true", "net child->bridge TCP, lxc-user-nic"):
        assert {side for side, got in found[label]["samples"].items() if got} == sides, \
            (label, found[label]["skipped"])
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "rlt-lxc-" not in netns
    assert usernet() == before
    assert not labs_dnsmasq()


def labs_dnsmasq() -> list[int]:
    """The pids of a lab's dnsmasq (its files are in the lab's temp dir)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"rlt-lxc-lab-" in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def test_missing_reference_is_skipped_with_a_message(user, rootless_run, tmp_path):
    run = bench(user, rootless_run, tmp_path, *TINY, "--only", "startup-host",
                "--rootlesskit", "/nonexistent/rootlesskit")
    assert run.returncode == 0, run.stderr
    assert "rootlesskit is not installed (apt-get install rootlesskit)" in run.stderr
    row = rows(tmp_path)["startup: X --net=host true"]
    assert row["samples"]["ours"] and row["samples"]["limit"]
    assert "rootlesskit" not in row["samples"]
    assert row["versus"] == "limit"


def test_bad_input_is_one_line(user, rootless_run, tmp_path):
    for args, text in [(["--user", "no-such-user-rlt"], "there is no user no-such-user-rlt"),
                       (["--rootless-run", "/nonexistent/rootless-run"], "--rootless-run PATH"),
                       (["--only", "nothing-like-it"], "no such scenario")]:
        argv = bench_argv(user, rootless_run, tmp_path, "--quick") + args  # the last wins
        run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 1, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], run.stderr


def test_ctrl_c_stops_everything(user, rootless_run, tmp_path):
    proc = subprocess.Popen(bench_argv(user, rootless_run, tmp_path, "--only", "port-tcp-1",
                                       "--rounds", "20", "--seconds", "30"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # Wait until the iperf3 client runs through a published port of a supervisor.
        deadline = time.monotonic() + 60
        while not any("iperf3 -c" in cmd for _, _, cmd in user.processes()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the benchmark never started iperf3"
            time.sleep(0.1)
        assert any("rootlesskit" in cmd for _, _, cmd in user.processes())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    deadline = time.monotonic() + 2  # SIGKILLed processes take a moment to go
    while user.processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert user.processes() == []
    with open(tmp_path / "bench.json") as f:
        assert json.load(f)["interrupted"] is True


def test_a_ratio_within_the_noise_is_called_level():
    """The verdict weighs a ratio against how much the rounds vary: round figures
    that swing as slirp4netns' do (13 or 18 Gbit/s, stalls) give a tie, a lead that
    holds every round does not. (Report arithmetic only: no timing.)"""
    sys.path.insert(0, REPO)
    from contrib.bench import _report
    from contrib.bench.scenarios import Metric, Scenario

    def row(ours, theirs, higher_better=True):
        scenario = Scenario("s", [Metric("x", "x", "Gbit/s", higher_better)], {}, len(ours))
        return _report.rows(scenario, {"ours": {"x": ours}, "rootlesskit": {"x": theirs}},
                            {})[0]

    swinging = row([13.2, 17.9, 11.0, 13.4, 18.2, 13.1, 12.6],
                   [13.5, 18.5, 13.3, 9.8, 17.7, 13.0, 13.4])
    lo, hi = swinging["ci"]
    assert lo < 1 < hi
    assert _report.verdict(swinging).startswith("level with rootlesskit")
    steady = row([20.1, 20.5, 19.8, 20.9, 20.3, 21.0], [11.2, 11.0, 10.9, 11.5, 11.1, 11.3],
                 higher_better=False)  # start-up times: ours slower every round
    assert 1.7 < steady["ci"][0] <= steady["ratio"] <= steady["ci"][1] < 2.0
    assert _report.verdict(steady).startswith("behind rootlesskit 1.8")
    # Too few rounds, or rounds that do not pair up: no interval, no tie claimed.
    assert row([1.0, 2.0], [2.0, 1.0])["ci"] is None
    assert _report.ratio_interval([1.0] * 6, [1.0] * 5) is None


def test_slirp_ab_counts_stalls_and_paired_wins():
    """contrib/bench/slirp_ab.py's summary on given intervals (arithmetic only: the A/B
    itself takes minutes of iperf3 and is run by hand, docs/performance.md)."""
    sys.path.insert(0, REPO)
    from contrib.bench import slirp_ab

    rounds = {"ours": [[13.0, 13.0, 0.0, 13.0], [18.0, 18.0, 18.0, 18.0]],
              "rootlesskit": [[12.0, 12.0, 12.0, 12.0], [18.5, 2.9, 18.5, 18.5]]}
    text = slirp_ab.summary(rounds)
    ours, theirs, paired = text.splitlines()
    assert "rounds with a stall 1, stalled intervals 1" in ours
    assert "rounds with a stall 1, stalled intervals 1" in theirs  # 2.9 < 3 Gbit/s
    assert "median 0.1 s interval 15.50" in ours
    assert paired.startswith("ours better in 1/2 paired rounds")
    # --calibrate's sides: the pairs count the first side's wins, whatever the names
    first, second, paired = slirp_ab.summary(
        {"ours": [[10.0], [10.0], [4.0]], "ours again": [[5.0], [5.0], [8.0]]}).splitlines()
    assert first.startswith("ours ") and second.startswith("ours again ")
    assert paired == "ours better in 2/3 paired rounds, median ratio 2.000x"
