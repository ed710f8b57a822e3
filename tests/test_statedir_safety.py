"""The state dir against other users and against faults (issue 16, items 18-22, 26),
through real runs of rootless-run as the unprivileged test user, with the slot's
second user (nosub_user) as the other user, the "attacker".

fs.protected_symlinks is 0 on this machine: the kernel does not stop a run from
following a symlink another user planted in /tmp; the state dir's walk must."""
import json
import os
import stat
import subprocess
import sys
import time
import uuid

import pytest

from conftest import VENV_BIN, wait_for_api

CTL = os.path.join(VENV_BIN, "rootless-ctl")


def one_line(r: subprocess.CompletedProcess, *words: str) -> str:
    lines = r.stderr.splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(directory: str) -> dict:
    """Every entry of `directory` with its mode and content: what must not change."""
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        st = os.lstat(path)
        content = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                content = f.read()
        out[name] = (st.st_mode, st.st_uid, content)
    return out


@pytest.fixture
def shared_tmp(request):
    """Paths in /tmp (sticky, world-writable, as on any machine) removed at teardown."""
    paths = []

    def make(tag: str) -> str:
        path = f"/tmp/rlt-{tag}-{uuid.uuid4().hex[:8]}"
        paths.append(path)
        return path
    yield make
    for path in paths:
        subprocess.run(["rm", "-rf", path], check=False)


@pytest.fixture
def victim_dir(user, user_tmp):
    """A dir of the test user with files of the names a run writes and removes."""
    target = os.path.join(user_tmp, "precious")
    os.mkdir(target, 0o700)
    for name in ("hosts", "resolv.conf", "child_pid", "namespaces", "notes"):
        with open(os.path.join(target, name), "w") as f:
            f.write(f"the user's own {name}\n")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", target], check=True)
    return target


# -- item 18: symlinks and dirs another user controls ----------------------------------------

def test_symlink_planted_by_another_user_is_not_followed(user, nosub_user, rootless_run,
                                                         victim_dir, shared_tmp):
    """The other user plants /tmp/NAME -> a dir of the victim; the victim's run with
    --state-dir /tmp/NAME refuses in one line and changes nothing there."""
    planted = shared_tmp("plant")
    r = nosub_user.run(["ln", "-s", victim_dir, planted])
    assert r.returncode == 0, r.stderr
    before = snapshot(victim_dir)

    r = user.run([rootless_run, "--net=slirp4netns", "--state-dir", planted, "--",
                  "echo", "ran"])
    assert r.returncode == 1
    assert "ran" not in r.stdout
    one_line(r, planted, "symlink", f"uid {nosub_user.uid}")
    assert snapshot(victim_dir) == before


def test_symlink_in_another_users_dir_is_not_followed(user, nosub_user, rootless_run,
                                                      victim_dir, shared_tmp):
    """The same through a dir of the other user's, which they can swap at will."""
    theirs = shared_tmp("theirs")
    r = nosub_user.run(["sh", "-c", f"mkdir -m 755 {theirs} && ln -s {victim_dir} "
                                    f"{theirs}/state"])
    assert r.returncode == 0, r.stderr
    before = snapshot(victim_dir)

    r = user.run([rootless_run, "--net=slirp4netns", "--state-dir", f"{theirs}/state", "--",
                  "echo", "ran"])
    assert r.returncode == 1
    assert "ran" not in r.stdout
    one_line(r, theirs, f"belongs to uid {nosub_user.uid}")
    assert snapshot(victim_dir) == before


def test_dir_below_a_dir_others_can_write_is_refused(user, rootless_run, shared_tmp):
    """In a world-writable dir without the sticky bit, anyone may rename the user's dir
    away and put a symlink in its place between the check and a use."""
    open_dir = shared_tmp("open")
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o777)
    mine = os.path.join(open_dir, "mine")
    os.mkdir(mine, 0o700)
    os.chown(mine, user.uid, user.gid)

    r = user.run([rootless_run, "--net=none", "--state-dir", f"{mine}/state", "--",
                  "echo", "ran"])
    assert r.returncode == 1
    assert "ran" not in r.stdout
    one_line(r, open_dir, "writable by other users")
    assert os.listdir(mine) == []


def test_own_symlink_is_followed_to_the_real_path(user, rootless_run, user_tmp):
    """The user's own symlink is theirs to follow; the run then names the real dir."""
    real = os.path.join(user_tmp, "real")
    link = os.path.join(user_tmp, "link")
    r = user.run(["sh", "-c", f"mkdir {real} && ln -s {real} {link}"])
    assert r.returncode == 0, r.stderr
    r = user.run([rootless_run, "--net=none", "--state-dir", link, "--", "sh", "-c",
                  'echo "$ROOTLESSKIT_STATE_DIR"'])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == real


# -- item 19: a state dir open to others, and the umask -------------------------------------

ATTACK = r'''
import json, os, socket, sys
state, results = sys.argv[1], {}
try:
    with open(os.path.join(state, "resolv.conf"), "a") as f:
        f.write("nameserver 6.6.6.6\n")
    results["resolv.conf"] = "written"
except OSError as exc:
    results["resolv.conf"] = exc.strerror
for name, request in (("slirp4netns.sock", b'{"execute": "list_hostfwd"}'),
                      ("api.sock", b"GET /v1/info HTTP/1.0\r\n\r\n")):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(os.path.join(state, name))
        s.sendall(request)
        results[name] = "answered: " + s.recv(4096).decode(errors="replace")
    except OSError as exc:
        results[name] = exc.strerror
    finally:
        s.close()
print(json.dumps(results))
'''


def test_state_dir_open_to_others_is_closed_before_use(user, nosub_user, rootless_run,
                                                       shared_tmp, spawned):
    """umask 000 and a state dir the user made 0755 in /tmp: the other user can neither
    rewrite the instance's resolv.conf nor talk to its slirp4netns or REST API."""
    state_dir = shared_tmp("state")
    os.mkdir(state_dir, 0o755)
    os.chown(state_dir, user.uid, user.gid)
    go = os.path.join(state_dir, "go")
    script = (f'touch "$ROOTLESSKIT_STATE_DIR/ready"; while [ ! -e {go} ]; do sleep 0.05; '
              f'done; cat /etc/resolv.conf')
    proc = user.popen(["sh", "-c", 'umask 000; exec "$@"', "sh", rootless_run,
                       "--net=slirp4netns", "--port-driver=slirp4netns",
                       "--state-dir", state_dir, "--", "sh", "-c", script])
    spawned.append(proc)
    wait_for_api(proc, state_dir)
    assert os.path.exists(os.path.join(state_dir, "slirp4netns.sock"))

    r = nosub_user.run([sys.executable, "-c", ATTACK, state_dir])
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert results == {"resolv.conf": "Permission denied",
                       "slirp4netns.sock": "Permission denied",
                       "api.sock": "Permission denied"}, results

    # The run's own files have their modes whatever the umask: 0644 for what the
    # command's processes read as any id through the bind mounts, else 0600.
    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    for name, mode in (("resolv.conf", 0o644), ("hosts", 0o644), ("child_pid", 0o600),
                       ("namespaces", 0o600), ("lock", 0o600), ("slirp4netns.log", 0o600),
                       ("api.sock", 0o600)):
        assert stat.S_IMODE(os.stat(os.path.join(state_dir, name)).st_mode) == mode, name

    with open(go, "w"):
        pass
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out == "nameserver 10.0.2.3\n"
    assert err.splitlines() == [
        f"rootless-run: warning: state dir {state_dir} was open to other users (mode 0755): "
        f"made it 0700"]


def test_state_dir_writable_by_others_is_refused(user, rootless_run, state_dir):
    """Files may have been planted in it, which closing it now would not remove."""
    os.mkdir(state_dir)
    os.chmod(state_dir, 0o777)
    os.chown(state_dir, user.uid, user.gid)
    r = user.run([rootless_run, "--net=none", "--state-dir", state_dir, "--", "echo", "ran"])
    assert r.returncode == 1
    assert "ran" not in r.stdout
    one_line(r, state_dir, "writable by other users", "0777")
    assert os.listdir(state_dir) == []


# -- item 20: the temp state dir's removal -------------------------------------------------

# The command's rm may race the parent's last write (the namespaces record, just after
# the command starts) and find the dir not empty: rm once more, as a script would.
RM_STATE = 'rm -rf "$ROOTLESSKIT_STATE_DIR" 2>/dev/null || rm -rf "$ROOTLESSKIT_STATE_DIR"'


@pytest.mark.parametrize("script", [
    RM_STATE,
    # root in the namespace: a subordinate id's dir, with a file, closed to its owner's
    # user outside (0700)
    'mkdir "$ROOTLESSKIT_STATE_DIR/x" && echo data > "$ROOTLESSKIT_STATE_DIR/x/f" && '
    'mkdir "$ROOTLESSKIT_STATE_DIR/x/y" && chown -R 1000:1000 "$ROOTLESSKIT_STATE_DIR/x" && '
    'chmod 700 "$ROOTLESSKIT_STATE_DIR/x"',
], ids=["removed-by-the-command", "subuid-owned-subdir"])
def test_temp_state_dir_cleanup_keeps_the_status_and_leaves_nothing(user, rootless_run,
                                                                    user_tmp, script):
    r = user.run([rootless_run, "--net=slirp4netns", "--", "sh", "-c", f"{script}; exit 3"],
                 env={"TMPDIR": user_tmp})
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr == ""
    assert os.listdir(user_tmp) == []


def test_a_command_that_removes_the_state_dir_at_once_keeps_its_status(user, rootless_run,
                                                                      user_tmp):
    """The parent writes the namespaces record just after the command starts; a command
    that removes the temp state dir at once raced it, and the run ended with "state
    dir ... was removed while the run was starting" (6 runs in 30 here). Twenty runs:
    each keeps the command's status and says nothing."""
    for _ in range(20):
        r = user.run([rootless_run, "--net=slirp4netns", "--", "sh", "-c",
                      f"{RM_STATE}; exit 3"], env={"TMPDIR": user_tmp})
        assert r.returncode == 3, r.stderr
        assert r.stderr == ""
    assert os.listdir(user_tmp) == []


# -- item 21: disk full ----------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(user):
    """A 64 KiB tmpfs of the user's (mounted as root), and fill(free_kib)."""
    path = f"/tmp/rlt-full-{uuid.uuid4().hex[:8]}"
    os.mkdir(path, 0o700)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o",
                        f"size=64k,mode=0700,uid={user.uid},gid={user.gid}", "tmpfs", path],
                       check=True)

        def fill(free_kib: int = 0) -> None:
            filler = os.path.join(path, "filler")
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass  # full
            finally:
                os.close(fd)
            assert os.statvfs(path).f_bavail == 0
            if free_kib:
                os.truncate(filler, os.path.getsize(filler) - free_kib * 1024)

        yield path, fill
    finally:
        deadline = time.monotonic() + 10
        while subprocess.run(["umount", path], capture_output=True).returncode != 0:
            # a SIGKILLed helper may hold it for a moment
            assert time.monotonic() < deadline, f"cannot unmount {path}"
            time.sleep(0.1)
        os.rmdir(path)


@pytest.mark.parametrize("free_kib", [0, 12], ids=["full", "room-for-a-few-files"])
def test_disk_full_is_one_line_and_the_dir_starts_once_freed(user, rootless_run,
                                                              small_tmpfs, free_kib):
    """Full: the parent cannot write child_pid. With 3 pages free, whichever write comes
    first after them fails (in the parent, or the child's resolv.conf or hosts)."""
    path, fill = small_tmpfs
    state = os.path.join(path, "state")
    fill(free_kib)
    r = user.run([rootless_run, "--net=slirp4netns", "--state-dir", state, "--",
                  "echo", "ran"])
    assert r.returncode == 1
    assert "ran" not in r.stdout
    line = one_line(r, state, "No space left on device", "free space")
    assert "internal error" not in line
    assert not [name for name in os.listdir(state) if name.endswith(".tmp")], \
        os.listdir(state)

    os.unlink(os.path.join(path, "filler"))
    r = user.run([rootless_run, "--net=slirp4netns", "--state-dir", state, "--",
                  "echo", "ran"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ran\n"
    assert r.stderr == ""


# -- item 22: paths the sockets or the API cannot take ---------------------------------------

NOT_UTF8 = os.fsdecode(b"st-\xff")


def test_state_dir_not_utf8_is_refused_before_anything_starts(user, rootless_run, request):
    path = os.path.join(user.runtime_dir, NOT_UTF8)
    request.node.user_dirs.append(path)  # removed at teardown, should a run make it
    r = user.run([rootless_run, "--net=slirp4netns", "--state-dir", path, "--",
                  "echo", "ran"])
    assert r.returncode == 1
    assert "ran" not in r.stdout
    one_line(r, "not valid UTF-8", "--state-dir", "\\xff")
    assert not os.path.lexists(path)


def test_state_dir_too_long_for_a_socket_is_refused_before_anything_starts(
        user, rootless_run, state_dir):
    path = state_dir + "/" + "d" * (100 - len(state_dir))
    r = user.run([rootless_run, "--net=slirp4netns", "--state-dir", path, "--",
                  "echo", "ran"])
    assert r.returncode == 1
    assert "ran" not in r.stdout
    one_line(r, "too long", "shorter --state-dir", "at most 90 bytes")
    assert not os.path.lexists(state_dir)  # nothing made


@pytest.mark.parametrize("name", [NOT_UTF8, "t" * 90], ids=["not-utf8", "too-long"])
def test_tmpdir_unusable_for_the_temp_state_dir_is_refused(user, rootless_run, user_tmp,
                                                           name):
    tmpdir = os.path.join(user_tmp, name)
    os.mkdir(tmpdir, 0o700)
    os.chown(tmpdir, user.uid, user.gid)
    r = user.run([rootless_run, "--net=slirp4netns", "--", "echo", "ran"],
                 env={"TMPDIR": tmpdir})
    assert r.returncode == 1
    assert "ran" not in r.stdout
    line = one_line(r, "TMPDIR")
    assert ("not valid UTF-8" in line) if name == NOT_UTF8 else ("too long" in line)
    assert os.listdir(tmpdir) == []


# -- item 26: a failing helper's log ----------------------------------------------------------

FAKE_SLIRP = """#!/bin/sh
echo "fake-slirp4netns: starting"
echo "fake-slirp4netns: cannot open /dev/net/tun: Operation not permitted" >&2
echo "fake-slirp4netns: giving up"
exit 1
"""


@pytest.fixture
def fake_slirp(shared_tmp):
    directory = shared_tmp("fake")
    os.mkdir(directory, 0o755)
    path = os.path.join(directory, "slirp4netns")
    with open(path, "w") as f:
        f.write(FAKE_SLIRP)
    os.chmod(path, 0o755)
    return path


def test_failed_helper_is_quoted_and_no_gone_path_is_named(user, rootless_run, user_tmp,
                                                           fake_slirp):
    r = user.run([rootless_run, "--net=slirp4netns", f"--slirp4netns-binary={fake_slirp}",
                  "--", "echo", "ran"], env={"TMPDIR": user_tmp})
    assert r.returncode == 1
    assert "ran" not in r.stdout
    line = one_line(r, "slirp4netns", "cannot open /dev/net/tun: Operation not permitted",
                    "giving up")
    assert user_tmp not in line and "log:" not in line, line
    assert os.listdir(user_tmp) == []


def test_failed_helper_names_the_log_that_stays(user, rootless_run, state_dir, fake_slirp):
    r = user.run([rootless_run, "--net=slirp4netns", f"--slirp4netns-binary={fake_slirp}",
                  "--state-dir", state_dir, "--", "echo", "ran"])
    assert r.returncode == 1
    log = os.path.join(state_dir, "slirp4netns.log")
    one_line(r, "cannot open /dev/net/tun", f"(log: {log})")
    with open(log) as f:
        assert "giving up" in f.read()


# -- joiners: rootless-ctl enter and --reuse on a hostile state dir ----------------------------

def test_enter_through_a_planted_symlink_is_refused(user, nosub_user, rootless_run,
                                                    state_dir, spawned, shared_tmp):
    proc = user.popen([rootless_run, "--net=none", "--state-dir", state_dir, "--",
                       "sleep", "60"])
    spawned.append(proc)
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(state_dir, "namespaces")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    planted = shared_tmp("plant")
    assert nosub_user.run(["ln", "-s", state_dir, planted]).returncode == 0
    for argv in ([CTL, "enter", "--state-dir", planted, "--", "true"],
                 [rootless_run, "--reuse", "--state-dir", planted, "--", "true"]):
        r = user.run(argv)
        assert r.returncode == 1
        one_line(r, planted, "symlink", f"uid {nosub_user.uid}")


@pytest.mark.parametrize("garbage", ["binary-record", "record-is-a-dir", "lock-is-a-fifo",
                                     "pid-garbage"])
def test_enter_on_garbage_is_one_line(user, user_tmp, spawned, garbage):
    """A dir of the user's that looks like a state dir (a held lock) but holds junk."""
    state = os.path.join(user_tmp, "junk")
    setup = {
        "binary-record": 'printf "user \\377\\376 12\\n" > namespaces; echo 1 > child_pid',
        "record-is-a-dir": "mkdir namespaces; echo 1 > child_pid",
        "lock-is-a-fifo": "rm lock; mkfifo lock",
        "pid-garbage": f"echo 'user {'9' * 30} 1' > namespaces; "
                       f"printf '\\377\\377' > child_pid",
    }[garbage]
    r = user.run(["sh", "-c", f"mkdir -m 700 {state} && cd {state} && touch lock && {setup}"])
    assert r.returncode == 0, r.stderr
    if garbage != "lock-is-a-fifo":
        holder = user.popen(["flock", "-n", os.path.join(state, "lock"), "sh", "-c",
                             "echo locked; exec sleep 60"])
        spawned.append(holder)
        assert holder.stdout.readline() == "locked\n"
    r = user.run([CTL, "enter", "--state-dir", state, "--", "echo", "joined"], timeout=30)
    assert r.returncode == 1
    assert "joined" not in r.stdout
    one_line(r, state)


# -- inside an instance: ids not mapped there show as nobody -------------------------------

def test_nested_run_and_enter_work_and_still_refuse_a_planted_symlink(
        user, nosub_user, rootless_run, victim_dir, shared_tmp):
    """Inside a user namespace / and /tmp show as owned by nobody (the overflow id):
    taken as root's, so rootless-run and rootless-ctl enter work in an instance; a
    symlink of an unmapped id in sticky /tmp is still not followed."""
    planted = shared_tmp("plant")
    assert nosub_user.run(["ln", "-s", victim_dir, planted]).returncode == 0
    before = snapshot(victim_dir)
    inner = (f"{rootless_run} --net=none -- echo nested-ok; "
             f"{CTL} enter -- echo entered; "
             f"{rootless_run} --net=none --state-dir {planted} -- echo ran; echo rc=$?")
    r = user.run([rootless_run, "--net=none", "--", "sh", "-c", inner])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "nested-ok\nentered\nrc=1\n", r.stderr
    assert "Traceback" not in r.stderr
    refusals = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(refusals) == 1 and planted in refusals[0] and "symlink" in refusals[0], \
        r.stderr
    assert snapshot(victim_dir) == before
