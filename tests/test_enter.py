"""Joining a running instance (`rootless-ctl enter`, `rootless-run --reuse`) through the
real thing: instances started by the unprivileged test user, real namespaces, real
slirp4netns, and the refusals a stale or foreign state dir must get."""
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import VENV_BIN

CTL = os.path.join(VENV_BIN, "rootless-ctl")
KINDS = ("user", "mnt", "net", "pid")


def wait_until(predicate, timeout: float = 15, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s")
        time.sleep(interval)


def ns_of(pid: int | str) -> dict[str, str]:
    return {kind: os.readlink(f"/proc/{pid}/ns/{kind}") for kind in KINDS}


def one_error_line(stderr: str, *words: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def instance(user, spawned, rootless_run, state_dir):
    """Start an instance on `state_dir` whose command mounts a tmpfs on /mnt with a
    marker in it and writes /etc/rlt-marker (copy-up), then waits; returns its
    child_pid once it is recorded and the marker is in place."""
    def start(*flags, shell_prefix: str = ""):
        script = (f"{shell_prefix}mount -t tmpfs none /mnt && echo in-tmpfs > /mnt/marker && "
                  "echo in-etc > /etc/rlt-marker && touch $ROOTLESSKIT_STATE_DIR/ready && "
                  "exec sleep 120")
        proc = user.popen([rootless_run, "--state-dir", state_dir, *flags, "--",
                           "sh", "-c", script])
        spawned.append(proc)
        wait_until(lambda: proc.poll() is not None or (
            os.path.exists(os.path.join(state_dir, "ready"))
            and os.path.exists(os.path.join(state_dir, "namespaces"))))
        assert proc.poll() is None, proc.stderr.read()
        with open(os.path.join(state_dir, "child_pid")) as f:
            return proc, int(f.read())
    return start


def enter(user, state_dir, *command, env=None, cwd="/tmp"):
    return user.run([CTL, "enter", "--state-dir", state_dir, "--", *command], env=env,
                    cwd=cwd)


# -- what enter sees ----------------------------------------------------------------------

PROBE = ("id -u; pwd; cat /mnt/marker /etc/rlt-marker; echo $ROOTLESSKIT_STATE_DIR; "
         "ip -4 -o addr show; for k in user mnt net pid; do readlink /proc/self/ns/$k; done; "
         "cat /proc/1/cmdline | tr '\\0' ' '; echo")


def test_enter_sees_the_instance(user, instance, state_dir):
    _, child = instance("--net=slirp4netns", "--pidns")
    expected = ns_of(child)
    assert expected["user"] != os.readlink("/proc/self/ns/user")
    r = enter(user, state_dir, "sh", "-c", PROBE)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[0] == "0"  # uid 0 through the instance's map
    assert lines[1] == "/tmp"  # the working directory, kept
    assert lines[2:4] == ["in-tmpfs", "in-etc"]  # its tmpfs, its copy-up of /etc
    assert lines[4] == state_dir
    assert "10.0.2.100/24" in r.stdout  # slirp4netns' address on the instance's tap0
    assert lines[-5:-1] == [expected[k] for k in KINDS]
    # pid 1 of the instance's pid namespace is rootless-run's child, seen from inside
    assert "rootless-run" in lines[-1]


def test_enter_without_pidns_and_from_the_environment(user, instance, state_dir):
    _, child = instance("--net=none")
    expected = ns_of(child)
    host_pid_ns = os.readlink("/proc/self/ns/pid")
    script = "cat /mnt/marker; for k in user mnt net pid; do readlink /proc/self/ns/$k; done"
    for how in ({"ROOTLESSKIT_STATE_DIR": state_dir}, None):
        args = [CTL, "enter", "--", "sh", "-c", script] if how else \
            [CTL, "--socket", os.path.join(state_dir, "api.sock"), "enter", "sh", "-c", script]
        r = user.run(args, env=how)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "in-tmpfs"
        assert lines[1:4] == [expected["user"], expected["mnt"], expected["net"]]
        assert lines[4] == host_pid_ns  # no pid namespace to join: the host's


def test_working_directory_missing_inside_is_root(user, instance, state_dir):
    instance("--net=none")  # copy-up of /etc: a dir made there now is not inside
    outside = f"/etc/rlt-enter-{uuid.uuid4().hex[:8]}"
    os.mkdir(outside, 0o755)
    try:
        r = enter(user, state_dir, "pwd", cwd=outside)
    finally:
        os.rmdir(outside)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "/\n"


def test_exit_status_passes_through(user, instance, state_dir):
    instance("--net=none")
    assert enter(user, state_dir, "sh", "-c", "exit 7").returncode == 7
    assert enter(user, state_dir, "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    r = enter(user, state_dir, "no-such-command-here")
    assert r.returncode == 127
    one_error_line(r.stderr, "no-such-command-here", "command not found")
    r = enter(user, state_dir, "/etc/hostname")  # a file, not executable
    assert r.returncode == 126
    one_error_line(r.stderr, "/etc/hostname")


def test_signal_reaches_the_command(user, spawned, instance, state_dir):
    instance("--net=none")
    proc = user.popen([CTL, "enter", "--state-dir", state_dir, "--", "sh", "-c",
                       "trap 'echo got-term; exit 3' TERM; echo ready; "
                       "while :; do sleep 0.05; done"])
    spawned.append(proc)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)  # to rootless-ctl, which forwards it
    out, err = proc.communicate(timeout=10)
    assert out == "got-term\n", err
    assert proc.returncode == 3


# -- refusals -------------------------------------------------------------------------------

def test_killed_instance_is_refused(user, instance, state_dir):
    proc, child = instance("--net=none")
    os.kill(proc.pid, signal.SIGKILL)  # setpriv exec'd rootless-run: this is the parent
    proc.wait(timeout=10)
    wait_until(lambda: not os.path.exists(f"/proc/{child}"))
    assert os.path.exists(os.path.join(state_dir, "namespaces"))  # left behind
    r = enter(user, state_dir, "true")
    assert r.returncode == 1
    one_error_line(r.stderr, "no instance is running", state_dir)


def test_stale_child_pid_is_refused_even_with_the_lock_held(user, spawned, instance,
                                                            state_dir):
    """A lock held (by anyone) is not enough: child_pid must still be the process whose
    namespaces were recorded at start."""
    proc, child = instance("--net=none")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    wait_until(lambda: not os.path.exists(f"/proc/{child}"))
    holder = user.popen(["flock", "-n", os.path.join(state_dir, "lock"), "sh", "-c",
                         "echo locked; exec sleep 60"])
    spawned.append(holder)
    assert holder.stdout.readline() == "locked\n"

    r = enter(user, state_dir, "true")  # child_pid names no process now
    assert r.returncode == 1
    one_error_line(r.stderr, "stale", f"pid {child}", "gone")

    other = user.popen(["sleep", "60"])  # child_pid "reused" by another process of ours
    spawned.append(other)
    with open(os.path.join(state_dir, "child_pid"), "w") as f:
        f.write(str(other.pid))
    r = enter(user, state_dir, "true")
    assert r.returncode == 1
    one_error_line(r.stderr, "stale", f"pid {other.pid}", "not the instance's child")


def test_another_users_instance_is_refused(user, nosub_user, spawned, rootless_run):
    shared = f"/tmp/rlt-enter-{uuid.uuid4().hex[:8]}"
    os.mkdir(shared, 0o755)  # the owner's, and both users can reach the state dir's entry
    os.chown(shared, user.uid, user.gid)
    state_dir = os.path.join(shared, "state")
    try:
        proc = user.popen([rootless_run, "--net=none", "--state-dir", state_dir, "--",
                           "sleep", "120"])
        spawned.append(proc)
        wait_until(lambda: os.path.exists(os.path.join(state_dir, "namespaces")))
        r = enter(nosub_user, state_dir, "id")
        assert r.returncode == 1
        one_error_line(r.stderr, f"belongs to uid {user.uid}", "your own")
        # under the owner's 0700 runtime dir, the path cannot even be reached
        r = enter(nosub_user, os.path.join(user.runtime_dir, "x"), "id")
        assert r.returncode == 1
        one_error_line(r.stderr, "permission denied", "another user")
        r = nosub_user.run([rootless_run, "--reuse", "--state-dir", state_dir, "--", "id"])
        assert r.returncode == 1
        one_error_line(r.stderr, f"belongs to uid {user.uid}")
    finally:
        subprocess.run(["rm", "-rf", shared], check=False)


def test_bad_state_dirs_are_refused(user, user_tmp, rootless_run):
    missing = os.path.join(user_tmp, "missing")
    r = enter(user, missing, "true")
    assert r.returncode == 1
    one_error_line(r.stderr, missing, "does not exist")

    a_file = os.path.join(user_tmp, "file")
    with open(a_file, "w"):
        pass
    r = enter(user, a_file, "true")
    assert r.returncode == 1
    one_error_line(r.stderr, a_file, "not a directory")

    r = enter(user, user_tmp, "true")  # a dir of ours, no instance
    assert r.returncode == 1
    one_error_line(r.stderr, "no instance is running")

    r = user.run([CTL, "enter", "--", "true"])  # no --state-dir, no environment
    assert r.returncode == 1
    one_error_line(r.stderr, "--state-dir", "ROOTLESSKIT_STATE_DIR")

    r = user.run([rootless_run, "--reuse", "--", "true"])
    assert r.returncode == 1
    one_error_line(r.stderr, "--reuse needs --state-dir")


# -- rootless-run --reuse ---------------------------------------------------------------------

def test_reuse_joins_a_running_instance(user, instance, state_dir, rootless_run):
    proc, child = instance("--net=slirp4netns", "--pidns")
    r = user.run([rootless_run, "--reuse", "--state-dir", state_dir, "--net=none", "--",
                  "sh", "-c", "cat /mnt/marker; ip -4 -o addr show; exit 5"])
    assert r.returncode == 5, r.stderr
    assert r.stdout.startswith("in-tmpfs\n")
    assert "10.0.2.100/24" in r.stdout  # the instance's network, not the --net=none asked
    assert proc.poll() is None  # the instance runs on
    assert ns_of(child)  # and its child too


def test_reuse_starts_an_instance_when_none_runs(user, state_dir, rootless_run):
    r = user.run([rootless_run, "--reuse", "--net=none", "--state-dir", state_dir, "--",
                  "sh", "-c", "readlink /proc/self/ns/user; exit 4"])
    assert r.returncode == 4, r.stderr
    assert r.stdout.strip() != os.readlink("/proc/self/ns/user")
    assert sorted(os.listdir(state_dir)) == ["lock"]  # its run files cleared at exit


def test_racing_reuses_make_one_instance(user, spawned, state_dir, rootless_run):
    """Started together on an empty dir: the lock picks one creator, the other waits
    for its namespaces and joins; both commands run in the same namespaces."""
    script = "for k in user mnt net; do readlink /proc/self/ns/$k; done; sleep 2"
    for attempt in range(3):
        path = f"{state_dir}-{attempt}"
        procs = [user.popen([rootless_run, "--debug", "--reuse", "--net=slirp4netns",
                             "--state-dir", path, "--", "sh", "-c", script])
                 for _ in range(2)]
        spawned.extend(procs)
        outs = [p.communicate(timeout=60) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
            assert len(out.splitlines()) == 3, out
        assert outs[0][0] == outs[1][0], outs  # the same user, mount and net namespaces
        assert sum("--reuse: joining" in err for _, err in outs) == 1, outs
        assert outs[0][0].split()[0] != os.readlink("/proc/self/ns/user")
        subprocess.run(["rm", "-rf", path], check=False)


# -- the fast path ----------------------------------------------------------------------------

def test_enter_path_imports_nothing_heavy(tmp_path):
    """`rootless-ctl enter` must not load trio, msgspec, h11 nor argparse (threads and
    their import time would be in the way of setns and of start-up)."""
    code = ("import sys\nfrom rootless.ctl import main\n"
            f"code = main(['enter', '--state-dir', {str(tmp_path / 'none')!r}, '--', 'true'])\n"
            "heavy = [m for m in ('trio', 'msgspec', 'h11', 'argparse', 'json', 'threading')"
            " if m in sys.modules]\n"
            "print(code, heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout == "1 []\n", r.stderr
    assert "does not exist" in r.stderr
