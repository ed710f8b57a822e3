"""Named instances and finding every instance (issue 19 part 1): `rootless-run --name`,
`rootless-ctl ps`, `stop`, `--name` on every rootless-ctl command, `--reuse --name`
and the only-instance default; through real instances of the unprivileged test user.

Each test gets an XDG_RUNTIME_DIR of its own (the registry of running instances lives
there), and a TMPDIR of its own for the temp state dirs of unnamed runs."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid

import pytest

from conftest import RUN, VENV_BIN, free_port

CTL = os.path.join(VENV_BIN, "rootless-ctl")


def wait_until(predicate, what: str, timeout: float = 20, proc=None):
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the instance exited ({proc.returncode}) before {what}: "
                        f"{proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def one_error(r, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert ": error: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert r.stdout == ""
    return lines[0]


@pytest.fixture
def runtime(user, request):
    """An XDG_RUNTIME_DIR of the test user's for this test alone."""
    path = os.path.join(user.runtime_dir, "xdg-" + uuid.uuid4().hex[:8])
    os.mkdir(path, 0o700)
    os.chown(path, user.uid, user.gid)
    request.node.user_dirs.append(path)
    return path


@pytest.fixture
def env(runtime, user_tmp):
    return {"XDG_RUNTIME_DIR": runtime, "TMPDIR": user_tmp}


def registry(runtime: str) -> str:
    return os.path.join(runtime, "rootless", ".registry")


@pytest.fixture
def launch(user, spawned, env, runtime):
    """launch(*flags, command=...): rootless-run in the background, as the user; returns
    once it is registered (its command runs). Its pid is the supervisor's (setpriv
    execs it)."""
    def launch(*flags, command=("sleep", "120"), ready: str = ""):
        proc = user.popen([RUN, *flags, "--", *command], env=env)
        spawned.append(proc)
        if ready:  # the command says it is ready (its traps are set)
            assert proc.stdout.readline() == ready + "\n", proc.stderr.read()
        entry = os.path.join(registry(runtime), str(proc.pid))
        wait_until(lambda: os.path.islink(entry), f"{entry} registered", proc=proc)
        return proc
    return launch


def ctl(user, env, *args, extra: dict | None = None):
    return user.run([CTL, *args], env={**env, **(extra or {})})


def ps(user, env) -> list[dict]:
    r = ctl(user, env, "ps", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return [json.loads(line) for line in r.stdout.splitlines()]


def state_of(user, env, *target) -> str:
    r = ctl(user, env, *target, "info", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["stateDir"]


# -- ps ---------------------------------------------------------------------------------------

def test_ps_lists_every_instance_named_or_not(user, env, runtime, user_tmp, launch, state_dir):
    port = free_port()
    web = launch("--net=slirp4netns", "--name", "web", "-p", f"127.0.0.1:{port}:80/tcp")
    temp = launch("--net=none")  # a temp state dir in $TMPDIR, printed nowhere
    db = launch("--net=none", "--name", "db", "--state-dir", state_dir,
                command=("sh", "-c", "exec sleep 120"))

    rows = {row["pid"]: row for row in ps(user, env)}
    assert set(rows) == {web.pid, temp.pid, db.pid}
    row = rows[web.pid]
    assert row["name"] == "web"
    assert row["stateDir"] == os.path.join(runtime, "rootless", "web")
    assert (row["networkDriver"], row["portDriver"]) == ("slirp4netns", "builtin")
    assert row["ports"] == [{"id": 1, "spec": {"proto": "tcp", "parentIP": "127.0.0.1",
                                               "parentPort": port, "childPort": 80}}]
    assert row["command"] == ["sleep", "120"]
    assert 0 <= row["uptime"] < 600
    row = rows[temp.pid]
    assert row["name"] is None
    assert row["stateDir"].startswith(user_tmp + "/rootless-")
    assert (row["networkDriver"], row["portDriver"], row["ports"]) == ("none", "builtin", [])
    row = rows[db.pid]  # --state-dir wins; the name labels it
    assert (row["name"], row["stateDir"]) == ("db", state_dir)
    assert row["command"] == ["sh", "-c", "exec sleep 120"]

    # The temp one is found by its dir; each answers for itself.
    assert state_of(user, env, "--state-dir", rows[temp.pid]["stateDir"]) == \
        rows[temp.pid]["stateDir"]

    r = ctl(user, env, "ps")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PID", "UPTIME", "DRIVERS", "PORTS", "COMMAND"]
    assert len(lines) == 4, r.stdout
    line = next(line for line in lines if line.startswith("web "))
    fields = line.split()
    assert fields[1] == str(web.pid)
    assert fields[3:] == ["slirp4netns/builtin", f"127.0.0.1:{port}:80/tcp", "sleep", "120"]
    line = next(line for line in lines if line.startswith("db "))
    assert line.split()[4:] == ["-", "sh", "-c", "'exec", "sleep", "120'"]
    assert any(line.startswith(rows[temp.pid]["stateDir"] + " ") for line in lines)


def test_ps_prunes_what_is_gone(user, env, runtime, launch, state_dir):
    alive = launch("--net=none", "--name", "alive")
    killed = launch("--net=none", "--state-dir", state_dir)
    os.kill(killed.pid, signal.SIGKILL)  # nothing of it can unregister
    killed.wait(timeout=10)
    stale = os.path.join(registry(runtime), str(killed.pid))
    assert os.path.islink(stale)

    assert [row["pid"] for row in ps(user, env)] == [alive.pid]
    assert not os.path.lexists(stale)  # pruned: its lock was free

    # A new run on the same dir: listed once, with its own pid, even when an entry of
    # the killed one (pointing at the same dir, now locked again) is still there.
    again = launch("--net=none", "--state-dir", state_dir)
    os.symlink(state_dir, stale)
    os.lchown(stale, user.uid, user.gid)
    assert sorted(row["pid"] for row in ps(user, env)) == sorted([alive.pid, again.pid])
    assert not os.path.lexists(stale)  # pruned: the dir's record is another supervisor's

    # An entry a supervisor killed as it made it was left under a temp name.
    half_made = os.path.join(registry(runtime), f".{killed.pid}.tmp")
    os.symlink(state_dir, half_made)
    os.lchown(half_made, user.uid, user.gid)
    ps(user, env)
    assert not os.path.lexists(half_made)

    # The only-instance default prunes too, and does not count the stale ones.
    os.kill(again.pid, signal.SIGKILL)
    again.wait(timeout=10)
    assert state_of(user, env) == os.path.join(runtime, "rootless", "alive")
    assert os.listdir(registry(runtime)) == [str(alive.pid)]


def test_an_instance_that_cannot_register_runs_on(user, env, runtime):
    base = os.path.join(runtime, "rootless")
    os.mkdir(base, 0o700)
    with open(os.path.join(base, ".registry"), "w"):
        pass  # a file where the registry dir goes
    for path in (base, os.path.join(base, ".registry")):
        os.chown(path, user.uid, user.gid)
    r = user.run([RUN, "--net=none", "--", "sh", "-c", "exit 5"], env=env)
    assert r.returncode == 5, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and ": warning: cannot register the instance" in lines[0], r.stderr
    assert "rootless-ctl ps will not list it" in lines[0]


# -- names ------------------------------------------------------------------------------------

def test_name_makes_a_private_state_dir(user, env, runtime):
    r = user.run([RUN, "--net=none", "--name", "one", "--", "sh", "-c",
                  'echo "$ROOTLESSKIT_STATE_DIR"'], env=env)
    assert r.returncode == 0, r.stderr
    path = os.path.join(runtime, "rootless", "one")
    assert r.stdout == path + "\n"
    for directory in (path, os.path.dirname(path)):
        st = os.stat(directory)
        assert (st.st_uid, st.st_mode & 0o777) == (user.uid, 0o700)
    assert sorted(os.listdir(path)) == ["lock"]  # the run's files cleared at exit
    assert os.listdir(registry(runtime)) == []  # and its entry


def test_second_start_of_a_running_name_is_refused(user, env, runtime, launch, state_dir):
    web = launch("--net=none", "--name", "web")
    for flags in (["--name", "web"], ["--name=web", "--state-dir", state_dir]):
        r = user.run([RUN, "--net=none", *flags, "--", "true"], env=env)
        one_error(r, "an instance named web is running already", f"pid {web.pid}",
                  os.path.join(runtime, "rootless", "web"), "rootless-ctl stop web")
    assert web.poll() is None
    assert state_of(user, env, "--name", "web") == os.path.join(runtime, "rootless", "web")

    # The other way round: a name running in its --state-dir keeps its own dir free.
    db = launch("--net=none", "--name", "db", "--state-dir", state_dir)
    r = user.run([RUN, "--net=none", "--name", "db", "--", "true"], env=env)
    one_error(r, "an instance named db is running already", f"pid {db.pid}", state_dir)
    # Another name starts.
    r = user.run([RUN, "--net=none", "--name", "web2", "--", "true"], env=env)
    assert r.returncode == 0, r.stderr


BAD_NAMES = ["", ".", "..", "a/b", "../x", "-x", ".hidden", "x" * 65, "a b", "caf\u00e9",
             "a\nb", "*"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused(user, env, runtime, name):
    r = user.run([RUN, "--net=none", f"--name={name}", "--", "true"], env=env)
    one_error(r, "--name")
    for args in ([f"--name={name}", "info"], [f"--name={name}", "enter", "--", "true"],
                 ["stop", "--", name] if "/" not in name else [f"--name={name}", "stop"]):
        one_error(ctl(user, env, *args), "name")
    assert os.listdir(runtime) == []  # nothing made


def test_name_needs_a_runtime_dir(user, env):
    r = user.run([RUN, "--net=none", "--name", "web", "--", "true"],
                 env={**env, "XDG_RUNTIME_DIR": ""})
    one_error(r, "--name needs $XDG_RUNTIME_DIR", "--state-dir")
    # an unnamed run needs none, and says nothing about it
    r = user.run([RUN, "--net=none", "--", "true"], env={**env, "XDG_RUNTIME_DIR": ""})
    assert (r.returncode, r.stderr.splitlines()) == (0, []), r.stderr


# -- rootless-ctl: --name, the only instance, several ------------------------------------------

def test_every_command_takes_a_name(user, env, runtime, launch):
    port, other_port = free_port(), free_port()
    web = launch("--net=none", "--name", "web", "-p", f"127.0.0.1:{port}:80/tcp")
    other = launch("--net=none", "--name", "other")  # two: no default
    path = os.path.join(runtime, "rootless", "web")

    assert state_of(user, env, "--name", "web") == path
    assert state_of(user, env, "--name=other") == os.path.join(runtime, "rootless", "other")
    r = ctl(user, env, "--name", "web", "list-ports")
    assert r.returncode == 0, r.stderr
    assert f"127.0.0.1    {port}" in r.stdout
    r = ctl(user, env, "--name", "web", "add-ports", f"127.0.0.1:{other_port}:81/tcp")
    assert (r.returncode, r.stdout) == (0, "2\n"), r.stderr
    r = ctl(user, env, "--name", "web", "remove-ports", "2")
    assert (r.returncode, r.stdout) == (0, "2\n"), r.stderr
    for args in (["--name", "web", "enter"], ["enter", "--name", "web"],
                 ["--name", "other", "enter", "--name=web"]):
        r = ctl(user, env, *args, "--", "sh", "-c", 'id -u; echo "$ROOTLESSKIT_STATE_DIR"')
        assert (r.returncode, r.stdout) == (0, f"0\n{path}\n"), (args, r.stderr)

    r = ctl(user, env, "--name", "web", "stop")
    assert r.returncode == 143, r.stderr  # sleep died of the SIGTERM
    assert web.wait(timeout=10) == 143
    assert other.poll() is None
    for args in (["--name", "web", "info"], ["--name", "web", "enter", "--", "true"],
                 ["stop", "web"]):
        one_error(ctl(user, env, *args), "no instance named web is running")
    one_error(ctl(user, env, "--name", "web", "--state-dir", path, "info"),
              "--name and --state-dir", "give one")


def test_the_only_instance_is_the_default(user, env, runtime, launch):
    one_error(ctl(user, env, "info"), "no running instance", "--socket",
              "$ROOTLESSKIT_STATE_DIR")
    one_error(ctl(user, env, "enter", "--", "true"), "no running instance")
    port = free_port()
    only = launch("--net=none", "-p", f"127.0.0.1:{port}:80/tcp")  # unnamed: a temp dir
    path = state_of(user, env)
    assert path == ps(user, env)[0]["stateDir"]
    r = ctl(user, env, "list-ports")
    assert r.returncode == 0 and str(port) in r.stdout, r.stderr
    r = ctl(user, env, "enter", "--", "sh", "-c", 'echo "$ROOTLESSKIT_STATE_DIR"')
    assert (r.returncode, r.stdout) == (0, path + "\n"), r.stderr

    two = launch("--net=none", "--name", "two")
    for args in (["info"], ["list-ports"], ["enter", "--", "true"], ["stop"]):
        r = ctl(user, env, *args)
        line = one_error(r, "2 instances are running", f"{path} (pid {only.pid}, sleep)",
                         f"two (pid {two.pid}, sleep)", "--name NAME", "rootless-ctl ps")
        assert line.index(path) < line.index("two (pid")  # oldest first
    assert only.poll() is None and two.poll() is None  # `stop` stopped none of them
    # Inside an instance (or given), $ROOTLESSKIT_STATE_DIR wins.
    two_dir = os.path.join(runtime, "rootless", "two")
    r = ctl(user, env, "info", extra={"ROOTLESSKIT_STATE_DIR": two_dir})
    assert r.returncode == 0 and f"State Directory: {two_dir}\n" in r.stdout, r.stderr


# -- stop ---------------------------------------------------------------------------------------

TRAP = "trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done"


def test_stop_ends_the_run_and_exits_with_its_status(user, env, runtime, launch, user_tmp):
    trapping = launch("--net=none", "--name", "trapping", command=("sh", "-c", TRAP),
                      ready="ready")
    r = ctl(user, env, "stop", "trapping")
    assert (r.returncode, r.stdout, r.stderr) == (7, "", "")
    assert trapping.wait(timeout=10) == 7  # the run ended before stop returned
    path = os.path.join(runtime, "rootless", "trapping")
    assert sorted(os.listdir(path)) == ["lock"]
    assert os.listdir(registry(runtime)) == []

    # An unnamed one, by the state dir ps shows: its temp dir is gone with it.
    temp = launch("--net=none")
    path = ps(user, env)[0]["stateDir"]
    r = ctl(user, env, "stop", path)
    assert (r.returncode, r.stderr) == (143, ""), r.stderr
    assert temp.wait(timeout=10) == 143
    assert not os.path.exists(path)

    # The name is free again at once.
    again = launch("--net=none", "--name", "trapping", command=("sh", "-c", TRAP),
                   ready="ready")
    r = ctl(user, env, "--name", "trapping", "stop")
    assert r.returncode == 7, r.stderr
    assert again.wait(timeout=10) == 7
    one_error(ctl(user, env, "stop", "trapping"), "no instance named trapping is running")
    one_error(ctl(user, env, "stop", os.path.join(user_tmp, "nothing")), "does not exist")


@pytest.fixture
def small_fs(user):
    """A 128 KiB tmpfs of the user's, to fill."""
    root = tempfile.mkdtemp(prefix="rlt-names-fs-")
    os.chmod(root, 0o755)
    mount = os.path.join(root, "fs")
    os.mkdir(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=128k,mode=0700,uid={user.uid},"
                    f"gid={user.gid}", "tmpfs", mount], check=True)
    yield mount
    subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(root)


def fill(directory: str) -> None:
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(fd)


def test_stop_reads_the_status_on_a_full_disk(user, env, launch, small_fs):
    """The status is written as the run ends: a state dir's file system full by then
    must not lose it (its room is taken at start)."""
    state = os.path.join(small_fs, "state")
    trapping = launch("--net=none", "--state-dir", state, command=("sh", "-c", TRAP),
                      ready="ready")
    fill(small_fs)
    r = ctl(user, env, "stop", state)
    assert (r.returncode, r.stderr) == (7, ""), r.stderr
    assert trapping.wait(timeout=10) == 7
    assert trapping.stderr.read() == ""


def test_stop_times_out_on_a_command_that_does_not_end(user, env, launch):
    stubborn = launch("--net=none", "--name", "stubborn", ready="ready",
                      command=("sh", "-c", "trap '' TERM; echo ready; "
                                           "while :; do sleep 0.05; done"))
    r = ctl(user, env, "stop", "--timeout", "0.5", "stubborn")
    one_error(r, "has not ended within 0.5 s", f"kill -KILL {stubborn.pid}", "--timeout")
    assert stubborn.poll() is None  # stop does not kill


def test_stop_of_a_supervisor_killed_meanwhile_says_so(user, env, runtime, launch, spawned):
    marker = os.path.join(runtime, "got-term")
    stubborn = launch("--net=none", "--name", "stubborn", ready="ready",
                      command=("sh", "-c", f"trap 'touch {marker}' TERM; echo ready; "
                                           f"while :; do sleep 0.05; done"))
    stopper = user.popen([CTL, "stop", "stubborn"], env=env)
    spawned.append(stopper)
    wait_until(lambda: os.path.exists(marker), "the SIGTERM forwarded")
    os.kill(stubborn.pid, signal.SIGKILL)
    out, err = stopper.communicate(timeout=20)
    assert stopper.returncode == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and "did not record the run's status" in lines[0], err
    assert f"pid {stubborn.pid}" in lines[0]


# -- rootless-run --reuse --name ----------------------------------------------------------------

def ns(pid) -> str:
    return os.readlink(f"/proc/{pid}/ns/user")


def child_pid(state_dir: str) -> int:
    with open(os.path.join(state_dir, "child_pid")) as f:
        return int(f.read())


def test_reuse_by_name(user, env, runtime, launch, state_dir):
    probe = ["sh", "-c", 'echo "$ROOTLESSKIT_STATE_DIR"; readlink /proc/self/ns/user']
    # None runs: --reuse --name starts it, in the name's dir.
    r = user.run([RUN, "--reuse", "--name", "r", "--net=none", "--", *probe], env=env)
    assert r.returncode == 0, r.stderr
    path = os.path.join(runtime, "rootless", "r")
    first, userns = r.stdout.splitlines()
    assert first == path and userns != os.readlink("/proc/self/ns/user")

    # One runs: joined.
    launch("--net=none", "--name", "r")
    r = user.run([RUN, "--reuse", "--name", "r", "--", *probe], env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [path, ns(child_pid(path))]

    # A name running in a --state-dir of its own: joined by the name.
    launch("--net=none", "--name", "s", "--state-dir", state_dir)
    r = user.run([RUN, "--reuse", "--name", "s", "--", *probe], env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [state_dir, ns(child_pid(state_dir))]
