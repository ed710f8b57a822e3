"""Units that stop cleanly (issue 19, part 3): every unit of contrib/systemd started
as the user manager starts it, stopped as `systemctl --user stop` stops it, and the
supervisor's exit status judged by the unit's own SuccessExitStatus=.

No systemd runs here as a manager, so the test plays its part, from the unit file: the
ExecStart= line with its Environment= and EnvironmentFile=, specifiers and $VARIABLES
expanded as systemd.service(5) says, run as the test user with a NOTIFY_SOCKET
(test_systemd's listener); then the stop as systemd.kill(5) describes it for the
unit's KillMode=:
  mixed          SIGTERM, then SIGCONT, to the main process only; SIGKILL to whatever is
                 left once it has exited, or to everything after TimeoutStopSec=;
  control-group  SIGTERM, then SIGCONT, to every process of the unit; SIGKILL to the
                 rest after TimeoutStopSec=.
The unit's control group is the test user's processes: nothing else runs as that user
in a test slot. A status is clean as systemd.service(5) has it: 0, the signals HUP,
INT, TERM and PIPE, and what SuccessExitStatus= lists.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from conftest import RUN, VENV_BIN, free_port, write_user_files
from test_ports import until
from test_supervisor_faults import slirp4netns_of
from test_systemd import NotifyListener

HERE = os.path.dirname(os.path.abspath(__file__))
UNITS = os.path.normpath(os.path.join(HERE, "..", "contrib", "systemd"))
ALL_UNITS = sorted(f for f in os.listdir(UNITS)
                   if f.endswith((".service", ".socket", ".timer", ".path")))
SERVICES = [f for f in ALL_UNITS if f.endswith(".service")]
TEMPLATE = "rootless@.service"
DOCKER_UNIT = "docker-rootless.service"
INSTANCE = "web"  # rootless@web: reads %E/rootless/web.env

# systemd.service(5): what is clean besides exit 0 and SuccessExitStatus= (not oneshot).
CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}
DEFAULT_TIMEOUT_STOP = 90.0  # DefaultTimeoutStopSec= of systemd-system.conf(5)
HANG = 30  # a run that has not ended this long after it should have: stuck
RELOADED = "Got signal to reload configuration"  # what dockerd logs on SIGHUP

needs_dockerd = pytest.mark.skipif(
    not shutil.which("dockerd", path="/usr/sbin:/usr/bin"),
    reason="docker.io is not installed (contrib/setup.sh installs it)")


# -- the unit file, as systemd reads it ------------------------------------------------

def parse_unit(path: str) -> dict[str, list[tuple[str, str]]]:
    """section -> [(key, value)] in order; "\\" at a line's end continues it."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def timespan(value: str) -> float:
    """systemd.time(7) spans as the units use them: "30", "30s", "1min 30s", "infinity"."""
    if value == "infinity":
        return float("inf")
    scale = {"": 1, "s": 1, "sec": 1, "ms": 1e-3, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"time span {value!r}: teach timespan() this form"
    return sum(float(n) * scale[u] for n, u in parts)


class Unit:
    def __init__(self, filename: str, instance: str = INSTANCE):
        self.file = filename
        self.template = "@." in filename
        self.name = filename.replace("@.", f"@{instance}.") if self.template else filename
        self.instance = instance if self.template else ""
        self.sections = parse_unit(os.path.join(UNITS, filename))

    def values(self, key: str, section: str = "Service") -> list[str]:
        """Every assignment of `key`, an empty one resetting the list (systemd's rule
        for list settings)."""
        found: list[str] = []
        for k, v in self.sections.get(section, []):
            if k == key:
                found = [] if v == "" else found + [v]
        return found

    def value(self, key: str, default: str | None = None) -> str | None:
        found = self.values(key)
        return found[-1] if found else default

    @property
    def kill_mode(self) -> str:
        return self.value("KillMode", "control-group")

    @property
    def timeout_stop(self) -> float:
        return timespan(self.value("TimeoutStopSec", str(DEFAULT_TIMEOUT_STOP)))

    @property
    def kill_signal(self) -> int:
        name = self.value("KillSignal", "SIGTERM")
        return getattr(signal, name if name.startswith("SIG") else "SIG" + name)

    def success_exit_status(self) -> tuple[set[int], set[int]]:
        """(exit codes, signals) SuccessExitStatus= lists."""
        codes, signals = set(), set()
        for value in self.values("SuccessExitStatus"):
            for word in value.split():
                if word.isdigit():
                    codes.add(int(word))
                else:
                    assert word.startswith("SIG"), f"{word}: teach the test this status name"
                    signals.add(getattr(signal, word))
        return codes, signals

    def clean(self, returncode: int) -> bool:
        """Whether systemd takes the main process' end as a clean one (Popen's
        returncode: the exit code, or -N for death by signal N)."""
        codes, signals = self.success_exit_status()
        if returncode >= 0:
            return returncode == 0 or returncode in codes
        return -returncode in CLEAN_SIGNALS | signals

    # -- the command line

    def specifiers(self, env: dict) -> dict[str, str]:
        """systemd.unit(5)'s specifiers these units may use, for a user manager."""
        prefix = self.name.split("@")[0] if self.template else self.name.rsplit(".", 1)[0]
        return {"i": self.instance, "I": self.instance, "n": self.name, "p": prefix,
                "N": self.name.rsplit(".", 1)[0], "t": env["XDG_RUNTIME_DIR"],
                "E": env["XDG_CONFIG_HOME"], "h": env["HOME"], "u": env["USER"], "%": "%"}

    def expand_specifiers(self, text: str, env: dict) -> str:
        table = self.specifiers(env)

        def one(match):
            assert match.group(1) in table, f"%{match.group(1)}: teach the test this specifier"
            return table[match.group(1)]
        return re.sub(r"%(.)", one, text)

    def environment(self, manager: dict) -> dict[str, str]:
        """What Environment= and EnvironmentFile= (which overrides it) add."""
        env: dict[str, str] = {}
        for value in self.values("Environment"):
            for assignment in shlex.split(self.expand_specifiers(value, manager)):
                key, _, val = assignment.partition("=")
                env[key] = val
        for value in self.values("EnvironmentFile"):
            path = self.expand_specifiers(value.lstrip("-"), manager)
            if value.startswith("-") and not os.path.exists(path):
                continue
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if line and line[0] not in "#;":
                        key, _, val = line.partition("=")
                        env[key.strip()] = val.strip().strip("\"'")
        return env

    def command(self, key: str, env: dict) -> list[str]:
        """ExecStart= (or another Exec line) as argv: "$VAR" as a word of its own is
        the value split at whitespace, "${VAR}" one word (systemd.service(5))."""
        (line,) = self.values(key)
        argv: list[str] = []
        for word in shlex.split(self.expand_specifiers(line, env)):
            if re.fullmatch(r"\$[A-Za-z_][A-Za-z0-9_]*", word):
                argv += env.get(word[1:], "").split()
            else:
                argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                                   lambda m: env.get(m.group(1), ""), word))
        argv[0] = argv[0].lstrip("-:+!")  # prefixes for the manager, not the command
        return argv


# -- the manager's part ----------------------------------------------------------------

@pytest.fixture
def manager(user, user_tmp):
    """A user manager's environment for one test: HOME (%h), XDG_RUNTIME_DIR (%t) and
    XDG_CONFIG_HOME (%E) of the test user's own, in user_tmp, and systemd's notify
    socket. Returns (env, listener)."""
    dirs = {}
    for key, name in (("HOME", "home"), ("XDG_RUNTIME_DIR", "run"),
                      ("XDG_CONFIG_HOME", "config")):
        dirs[key] = os.path.join(user_tmp, name)
        os.mkdir(dirs[key], 0o700)
        os.chown(dirs[key], user.uid, user.gid)
    listener = NotifyListener(user_tmp, user.uid, user.gid)
    env = user.env({**dirs, "NOTIFY_SOCKET": listener.path})
    yield env, listener
    listener.close()


@dataclass
class Stopped:
    status: int       # the main process' end: its exit code, or -N for signal N
    timed_out: bool   # still running at TimeoutStopSec=: systemd says Result: timeout
    left: list        # the processes systemd's final SIGKILL had to kill


class Started:
    """A unit's ExecStart= run as the user manager runs it (its stdout and stderr,
    the journal, in a file)."""

    def __init__(self, user, unit: Unit, manager, spawned):
        env, self.listener = manager
        self.user, self.unit = user, unit
        self.env = {**env, **unit.environment(env)}
        argv = unit.command("ExecStart", self.env)
        assert os.path.basename(argv[0]) == "rootless-run", argv
        argv[0] = RUN  # this checkout's, where the unit says /usr/local/bin
        self.journal = os.path.join(env["XDG_RUNTIME_DIR"], f"{unit.name}.log")
        with open(self.journal, "w") as f:
            self.proc = user.popen(argv, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        spawned.append(self.proc)

    def ready(self, timeout: float = 60) -> dict:
        """Wait for READY=1 as systemd would take it (NotifyAccess=main: from the main
        process only)."""
        while True:
            try:
                fields, sender = self.listener.receive(timeout=timeout)
            except TimeoutError:
                pytest.fail(f"no READY=1 within {timeout} s: {self.output()[-3000:]}")
            if self.unit.value("NotifyAccess", "main") == "main":
                assert sender == self.proc.pid, (fields, sender, self.proc.pid)
            if fields.get("READY") == "1":
                assert self.proc.poll() is None, self.output()
                return fields

    def output(self) -> str:
        with open(self.journal, errors="replace") as f:
            return f.read()

    def stop(self) -> Stopped:
        """`systemctl --user stop`, as systemd.kill(5) has it for the unit's KillMode."""
        mode = self.unit.kill_mode
        if mode == "mixed":
            targets = [self.proc.pid]
        elif mode == "control-group":
            targets = [pid for pid, _, _ in self.user.processes()]
        else:
            pytest.fail(f"KillMode={mode}: processes may outlive the unit (systemd.kill(5))")
        for pid in targets:
            for sig in (self.unit.kill_signal, signal.SIGCONT):  # SIGCONT: always, after
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.unit.timeout_stop
        timed_out = False
        try:
            self.proc.wait(timeout=self.unit.timeout_stop)
        except subprocess.TimeoutExpired:
            timed_out = True
        # mixed: what is left once the main process has gone is SIGKILLed at once;
        # control-group: the manager waits for the whole group until the timeout.
        # Either way a process that is already dying (killed by the supervisor as it
        # ended) is given a moment (3 s) rather than counted as left behind.
        settle = 0 if timed_out else (3 if mode == "mixed" else
                                      max(3, deadline - time.monotonic()))
        left = self._settle(settle)
        _kill(left)
        self.proc.wait(timeout=HANG)
        return Stopped(self.proc.returncode, timed_out, left)

    def ended(self, timeout: float = HANG) -> Stopped:
        """The unit's main process ended by itself (a crash): what systemd sees."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run still runs {timeout} s later: {self.output()[-3000:]}")
        left = self._settle(3)
        _kill(left)
        return Stopped(self.proc.returncode, False, left)

    def _settle(self, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        while (left := self.user.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left


def _kill(processes: list) -> None:
    for pid, _, _ in processes:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def instance(user, manager, command: str, flags: str = "") -> Unit:
    """rootless@web, its COMMAND and ROOTLESS_FLAGS in %E/rootless/web.env, as the
    unit's comment tells a user to write them."""
    env, _ = manager
    write_user_files(user, os.path.join(env["XDG_CONFIG_HOME"], "rootless"), {
        f"{INSTANCE}.env": f"ROOTLESS_FLAGS={flags}\nCOMMAND={command}\n"})
    return Unit(TEMPLATE)


def script(user, manager, name: str, body: str) -> str:
    """An executable shell script of the user's: a command of the unit (COMMAND= is
    split at whitespace, without quotes, as systemd splits $COMMAND)."""
    env, _ = manager
    directory = os.path.join(env["HOME"], "bin")
    write_user_files(user, directory, {name: "#!/bin/sh\n" + body})
    path = os.path.join(directory, name)
    os.chmod(path, 0o755)
    return path


def assert_clean_stop(unit: Unit, stopped: Stopped, started: Started) -> None:
    assert not stopped.timed_out, f"still running after TimeoutStopSec: {started.output()}"
    assert stopped.left == [], f"left for systemd's SIGKILL: {stopped.left}"
    assert unit.clean(stopped.status), (
        f"{unit.name} ends failed on a normal stop: status {stopped.status}, "
        f"SuccessExitStatus={unit.values('SuccessExitStatus')}: {started.output()}")


# -- the unit files ----------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("filename", ALL_UNITS)
def test_systemd_analyze_verify(user, user_tmp, filename):
    """Every unit we ship parses as the user manager would parse it; a bad value of a
    stop setting is reported (the check can fail)."""
    unit = Unit(filename)
    os.chmod(user_tmp, 0o755)
    runtime = os.path.join(user_tmp, "runtime")  # systemd-analyze leaves systemd/ there
    os.mkdir(runtime, 0o700)
    os.chown(runtime, user.uid, user.gid)
    target = os.path.join(user_tmp, unit.name)
    with open(os.path.join(UNITS, filename)) as f:
        text = f.read()

    def verify(content: str) -> str:
        with open(target, "w") as f:
            f.write(content)
        r = user.run(["systemd-analyze", "--user", "verify", target],
                     env={"XDG_RUNTIME_DIR": runtime})
        assert r.returncode == 0, r.stderr
        return r.stderr

    assert verify(text) == ""
    assert "SIGBOGUS" in verify(re.sub(r"^SuccessExitStatus=", "SuccessExitStatus=SIGBOGUS ",
                                       text, flags=re.M))


@pytest.mark.parametrize("filename", SERVICES)
def test_a_stop_status_is_listed(filename):
    """The supervisor exits 128+N when the command dies of the stop signal N (shown
    by the tests below): every service lists it, whatever its KillSignal=."""
    unit = Unit(filename)
    codes, _ = unit.success_exit_status()
    assert 128 + unit.kill_signal in codes, unit.values("SuccessExitStatus")
    assert unit.kill_mode == "mixed", "SIGTERM to rootless-run alone: it forwards it"


# -- rootless@.service ----------------------------------------------------------------

@pytest.mark.parametrize("flags", ["", "--pidns", "--net=pasta", "-p 127.0.0.1:{port}:80/tcp"],
                         ids=["default", "pidns", "pasta", "port"])
def test_stop_is_clean(user, manager, spawned, flags):
    """The command dies of the SIGTERM rootless-run forwards: exit 143, which the unit
    lists; READY=1 before, STOPPING=1 after, nothing said, nothing left."""
    unit = instance(user, manager, "sleep 1000", flags.format(port=free_port()))
    started = Started(user, unit, manager, spawned)
    started.ready()
    stopped = started.stop()
    assert stopped.status == 128 + signal.SIGTERM
    assert_clean_stop(unit, stopped, started)
    fields, _ = started.listener.receive(timeout=5)
    assert fields == {"STOPPING": "1"}
    assert started.output() == ""


def test_stop_of_a_command_that_exits_on_sigterm(user, manager, spawned):
    """A daemon that handles SIGTERM and exits 0 (as dockerd does) is clean as well."""
    command = script(user, manager, "graceful", "trap 'exit 0' TERM\nsleep 1000 & wait\n")
    unit = instance(user, manager, command)
    started = Started(user, unit, manager, spawned)
    started.ready()
    stopped = started.stop()
    assert stopped.status == 0
    assert_clean_stop(unit, stopped, started)


def test_stop_as_systemd_sends_it_every_time(user, manager, spawned):
    """systemd's SIGTERM and the SIGCONT right after it, repeated over fresh starts.
    They once landed, at times, on the supervisor's services thread: its main thread,
    which alone runs the handlers that forward them, slept on in poll(), and the
    command never heard of the stop (a third of the stops hung until TimeoutStopSec)."""
    unit = instance(user, manager, "sleep 1000")
    for n in range(12):
        started = Started(user, unit, manager, spawned)
        started.ready()
        stopped = started.stop()
        assert stopped.status == 128 + signal.SIGTERM, (n, stopped, started.output())
        assert not stopped.timed_out and stopped.left == [], (n, stopped)
        started.listener.receive(timeout=5)  # STOPPING=1


# gdb, run as the test user on its own rootless-run: once READY=1 has been sent, stop
# the main thread where it enters its wait with no end (poll(2), timeout -1), send the
# stop signal there and let it go. The signal's C handler runs before the syscall; its
# Python handler (the one that forwards it) only runs when the poll returns.
PIN_SIGNAL_BEFORE_THE_WAIT = """\
set pagination off
set confirm off
set follow-fork-mode parent
set detach-on-fork on
handle SIGTERM nostop noprint pass
handle SIGCONT nostop noprint pass
handle SIGCHLD nostop noprint pass
break sendto if *(unsigned long long *)$rsi == 0x0a313d5944414552
commands 1
  silent
  tbreak poll thread 1 if (int)$rdx == -1
  commands
    silent
    python import os, signal; os.kill(gdb.selected_inferior().pid, signal.SIGTERM)
    detach
    quit
  end
  continue
end
run
"""  # 0x0a313d5944414552: "READY=1\n", little-endian


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb missing (contrib/setup.sh installs it)")
def test_a_stop_signal_just_before_the_wait_is_not_lost(user, manager, user_tmp, spawned):
    """A signal landing in the instant between Python's last check for signals and the
    poll(2) the supervisor then waits in: its handler ran only when the poll returned,
    which, with nothing else to wake it, was never (systemd's stop hung until
    TimeoutStopSec, a stop in 50 to 100 under load; CI saw it). gdb puts the signal
    in that instant every time."""
    env, listener = manager
    script_path = os.path.join(user_tmp, "pin.gdb")
    write_user_files(user, user_tmp, {"pin.gdb": PIN_SIGNAL_BEFORE_THE_WAIT})
    journal = os.path.join(user_tmp, "gdb.log")
    with open(journal, "w") as f:
        gdb = user.popen(["gdb", "-q", "-batch", "-x", script_path, "--args", sys.executable,
                          RUN, "--notify=ready", "--net=none", "--", "sleep", "1000"],
                         env=env, stdout=f, stderr=subprocess.STDOUT)
    spawned.append(gdb)
    gdb.wait(timeout=60)
    with open(journal) as f:
        said = f.read()
    assert "detached" in said, said  # the signal was pinned where the test means
    fields, _ = listener.receive(timeout=5)
    assert fields.get("READY") == "1", fields
    deadline = time.monotonic() + 10
    while (left := user.processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], f"the stop was lost: {left}\n{said}"


def test_rootless_ctl_stop_of_a_unit_is_a_clean_stop(user, manager, spawned):
    """`rootless-ctl stop web` on the unit's instance sends the same SIGTERM: it says
    143, which the unit lists, so systemd takes it for a clean end (inactive, not
    restarted by Restart=on-failure)."""
    unit = instance(user, manager, "sleep 1000")
    started = Started(user, unit, manager, spawned)
    started.ready()
    r = user.run([os.path.join(VENV_BIN, "rootless-ctl"), "stop", INSTANCE], env=started.env)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    stopped = started.ended()
    assert stopped.status == 128 + signal.SIGTERM
    assert unit.clean(stopped.status) and stopped.left == []


START_UP = [(TEMPLATE, m) for m in (0, 0.05, 0.1, 0.2, 0.3, 0.5)] + [
    pytest.param(DOCKER_UNIT, m, marks=[pytest.mark.slow, needs_dockerd])
    for m in (0, 0.1, 0.3)]


@pytest.mark.parametrize("filename, moment", START_UP)
def test_stop_during_start_up(user, manager, spawned, filename, moment):
    """`systemctl stop` while the unit is still activating: whatever the moment, the
    run ends cleanly, nothing left. Before rootless-run handles SIGTERM it dies of it
    (clean by systemd's defaults); after, it forwards it, and the command dies of it
    (143) or, dockerd once started, exits 0."""
    unit = instance(user, manager, "sleep 1000") if filename == TEMPLATE else Unit(filename)
    started = Started(user, unit, manager, spawned)
    time.sleep(moment)
    stopped = started.stop()
    assert stopped.status in (-signal.SIGTERM, 128 + signal.SIGTERM, 0), started.output()
    assert_clean_stop(unit, stopped, started)


CRASHES = {  # how -> (the command's script after the trigger, the status it makes)
    "exit-1": ("exit 1\n", 1),
    "sigsegv": ("kill -SEGV $$\n", 128 + signal.SIGSEGV),
    "sigkill": ("kill -KILL $$\n", 128 + signal.SIGKILL),  # as the OOM killer would
}


@pytest.mark.parametrize("how", list(CRASHES))
def test_crash_is_not_clean(user, manager, spawned, user_tmp, how):
    """The command's own end, running: the status passes through and is not one the
    unit lists, so systemd says failed (and Restart=on-failure restarts it)."""
    tail, status = CRASHES[how]
    trigger = os.path.join(user_tmp, "crash")
    command = script(user, manager, "crash",
                     f"while [ ! -e {trigger} ]; do sleep 0.05; done\n{tail}")
    unit = instance(user, manager, command)
    started = Started(user, unit, manager, spawned)
    started.ready()
    open(trigger, "w").close()
    stopped = started.ended()
    assert stopped.status == status, started.output()
    assert not unit.clean(stopped.status)
    assert stopped.left == []


def test_network_helper_death_is_not_clean(user, manager, spawned):
    """A part the run cannot live without dies: the run ends with 1, failed."""
    unit = instance(user, manager, "sleep 1000", "--net=slirp4netns")
    started = Started(user, unit, manager, spawned)
    started.ready()
    os.kill(slirp4netns_of(started.proc.pid), signal.SIGKILL)
    stopped = started.ended()
    assert stopped.status == 1
    assert not unit.clean(stopped.status)
    assert stopped.left == []


@pytest.mark.slow  # the unit's TimeoutStopSec=, waited for
def test_command_ignoring_sigterm_is_killed_at_the_timeout(user, manager, spawned):
    """A command that ignores SIGTERM: rootless-run forwards it and goes on waiting
    (it has no stop timer of its own: TimeoutStopSec= is the unit's to say), the
    command keeps running, until systemd's SIGKILL at TimeoutStopSec= ends every
    process of the unit: Result: timeout, failed, whatever SuccessExitStatus= says.
    The next start finds the state dir the killed run left, and runs."""
    command = script(user, manager, "stubborn", "trap '' TERM\nwhile :; do sleep 1; done\n")
    unit = instance(user, manager, command)
    started = Started(user, unit, manager, spawned)
    started.ready()
    stopped = started.stop()
    assert stopped.timed_out
    assert stopped.status == -signal.SIGKILL
    names = " ".join(cmd for _, _, cmd in stopped.left)
    assert command in names and "rootless-run" in names, stopped.left  # still there
    until("nothing of the run", lambda: user.processes() == [], timeout=10)

    again = instance(user, manager, "sleep 1000")
    started = Started(user, again, manager, spawned)
    started.ready()
    assert_clean_stop(again, started.stop(), started)


# -- docker-rootless.service ----------------------------------------------------------

@pytest.mark.slow
@needs_dockerd
def test_docker_unit_reloads_and_stops_cleanly(user, manager, spawned):
    """The unit's real dockerd: READY=1 is its own (NotifyAccess=all), ExecReload=
    (SIGHUP to rootless-run, which forwards it) makes it reload every time, and a
    stop ends it cleanly with nothing left."""
    unit = Unit(DOCKER_UNIT)
    started = Started(user, unit, manager, spawned)
    started.ready()
    reload = unit.command("ExecReload", {**started.env, "MAINPID": str(started.proc.pid)})
    for n in range(1, 6):
        r = user.run(reload, env=started.env)
        assert r.returncode == 0, r.stderr
        until(f"reload {n}", lambda: started.output().count(RELOADED) >= n, timeout=20)
    stopped = started.stop()
    assert stopped.status == 0, started.output()[-3000:]
    assert "Daemon shutdown complete" in started.output()
    assert_clean_stop(unit, stopped, started)

