"""The supervisor through the real thing: rootless-run started as the unprivileged test
user, real namespaces, newuidmap, signals and processes."""
import os
import queue
import signal
import socket
import stat
import subprocess
import threading
import time
import uuid

import pytest

from conftest import free_port


MAPS = "cat /proc/self/uid_map; echo --; cat /proc/self/gid_map"


def map_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def uid_gid_maps(stdout: str) -> tuple[list, list]:
    uid_map, _, gid_map = stdout.partition("--\n")
    return map_rows(uid_map), map_rows(gid_map)


def host_ns(kind: str) -> str:
    """The namespace of pytest (root, on the host) as `kind:[inode]`."""
    return os.readlink(f"/proc/self/ns/{kind}")


class Lines:
    """Lines of a pipe, read by a thread, so that a test waits with a timeout."""

    def __init__(self, stream):
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next(self, timeout: float = 10) -> str | None:
        """The next line; None at EOF. Fails the test after `timeout` s."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output within {timeout} s")


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# -- identity -------------------------------------------------------------------------

def test_runs_as_root_with_subid_maps(user, rootless_run):
    r = user.run([rootless_run, "--", "sh", "-c", "id -u; " + MAPS])
    assert r.returncode == 0, r.stderr
    first, _, maps = r.stdout.partition("\n")
    assert first == "0"
    assert uid_gid_maps(maps) == (user.host_maps(), user.host_maps())
    assert r.stderr == ""


# -- exit status ----------------------------------------------------------------------

def test_exit_status_passes_through(user, rootless_run):
    r = user.run([rootless_run, "--", "sh", "-c", "exit 42"])
    assert r.returncode == 42, r.stderr
    assert r.stderr == ""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_death_by_signal_is_128_plus_n(user, rootless_run, sig):
    r = user.run([rootless_run, "--", "sh", "-c", f"kill -{sig.name[3:]} $$"])
    assert r.returncode == 128 + sig, r.stderr


# -- signals --------------------------------------------------------------------------

FORWARDED = ["INT", "TERM", "HUP", "QUIT", "USR1", "USR2", "WINCH"]
TRAP_ALL = ("for s in " + " ".join(FORWARDED) + "; do trap \"echo got $s\" $s; done; "
            "echo ready; while :; do sleep 0.05; done")


@pytest.mark.parametrize("name", FORWARDED)
def test_signal_reaches_command(user, rootless_run, start, name):
    proc = start([rootless_run, "--", "sh", "-c", TRAP_ALL])
    lines = Lines(proc.stdout)
    assert lines.next() == "ready"
    # setpriv execs rootless-run: Popen's pid is the supervisor's.
    proc.send_signal(getattr(signal, "SIG" + name))
    assert lines.next() == f"got {name}"
    assert proc.poll() is None, "the supervisor must survive a forwarded signal"


@pytest.mark.parametrize("flags", [[], ["--pidns"], ["--net=pasta"], ["--net=pasta", "--pidns"],
                                   ["--net=slirp4netns", "--port-driver=builtin"],
                                   ["--net=slirp4netns", "--port-driver=slirp4netns"],
                                   ["--net=slirp4netns", "--detach-netns"]],
                         ids=["no-pidns", "pidns", "pasta", "pasta-pidns", "slirp4netns",
                              "slirp4netns-api", "slirp4netns-detached"])
def test_sigkill_of_supervisor_kills_everything(user, rootless_run, start, state_dir, flags):
    proc = start([rootless_run, f"--state-dir={state_dir}", *flags, "--",
                  "sh", "-c", "sleep 1000 & sleep 1000"])

    def sleeps():
        return [p for p in user.processes() if p[2] == "sleep 1000"]

    assert wait_until(lambda: len(sleeps()) == 2, 10), user.processes()
    # pasta daemonizes: no child of ours, and it holds the netns by itself
    proc.kill()
    proc.wait(timeout=10)
    assert wait_until(lambda: not user.processes(), 3), \
        f"still running after SIGKILL of the supervisor: {user.processes()}"


# -- state directory ------------------------------------------------------------------

def test_state_dir_created_private_and_owned(user, rootless_run, state_dir):
    r = user.run([rootless_run, f"--state-dir={state_dir}", "--", "true"])
    assert r.returncode == 0, r.stderr
    st = os.stat(state_dir)
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)


def test_state_dir_files_while_running(user, rootless_run, start, state_dir):
    proc = start([rootless_run, f"--state-dir={state_dir}", "--", "sh", "-c",
                  "echo ready; read line"], stdin=subprocess.PIPE)
    lines = Lines(proc.stdout)
    assert lines.next() == "ready"
    assert os.path.isfile(os.path.join(state_dir, "lock"))
    with open(os.path.join(state_dir, "child_pid")) as f:
        child_pid = int(f.read())
    assert os.path.exists(f"/proc/{child_pid}")
    assert os.readlink(f"/proc/{child_pid}/ns/user") != host_ns("user")
    proc.stdin.write("done\n")
    proc.stdin.flush()
    assert proc.wait(timeout=10) == 0
    assert not os.path.exists(os.path.join(state_dir, "child_pid"))


def test_second_instance_on_state_dir_refused(user, rootless_run, start, state_dir):
    proc = start([rootless_run, f"--state-dir={state_dir}", "--", "sh", "-c",
                  "echo ready; sleep 1000"])
    assert Lines(proc.stdout).next() == "ready"
    r = user.run([rootless_run, f"--state-dir={state_dir}", "--", "echo", "ran"], timeout=20)
    assert r.returncode == 1
    assert "ran" not in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and state_dir in lines[0], r.stderr
    assert proc.poll() is None, "the refused instance must not disturb the running one"


def test_state_dir_reusable_after_sigkill(user, rootless_run, start, state_dir):
    proc = start([rootless_run, f"--state-dir={state_dir}", "--", "sh", "-c",
                  "echo ready; sleep 1000"])
    assert Lines(proc.stdout).next() == "ready"
    proc.kill()
    proc.wait(timeout=10)
    assert wait_until(lambda: not user.processes(), 3), user.processes()
    with open(os.path.join(state_dir, "child_pid")) as f:  # SIGKILL cannot clean up
        stale = f.read()
    r = user.run([rootless_run, f"--state-dir={state_dir}", "--", "sh", "-c",
                  'cat "$ROOTLESSKIT_STATE_DIR/child_pid"'], timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert int(r.stdout) > 0 and r.stdout != stale


def test_temporary_state_dir_removed_after_run(user, rootless_run, user_tmp):
    r = user.run([rootless_run, "--", "sh", "-c",
                  'echo "$ROOTLESSKIT_STATE_DIR"; test -d "$ROOTLESSKIT_STATE_DIR" && echo exists'],
                 env={"TMPDIR": user_tmp})
    assert r.returncode == 0, r.stderr
    path, exists = r.stdout.splitlines()
    assert os.path.dirname(path) == user_tmp
    assert exists == "exists"
    assert not os.path.exists(path)
    assert os.listdir(user_tmp) == []


def test_parent_ids_in_environment(user, rootless_run):
    r = user.run([rootless_run, "--", "sh", "-c",
                  'echo "$ROOTLESSKIT_PARENT_EUID $ROOTLESSKIT_PARENT_EGID"'])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(user.uid), str(user.gid)]


# -- network --------------------------------------------------------------------------

def test_net_host_keeps_host_netns(user, rootless_run):
    r = user.run([rootless_run, "--net=host", "--", "readlink", "/proc/self/ns/net"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == host_ns("net")


def test_net_none_has_only_lo_up(user, rootless_run):
    r = user.run([rootless_run, "--net=none", "--", "sh", "-c",
                  "readlink /proc/self/ns/net; ls /sys/class/net; cat /sys/class/net/lo/flags"])
    assert r.returncode == 0, r.stderr
    netns, interfaces, flags = r.stdout.split("\n", 2)
    assert netns != host_ns("net")
    assert interfaces == "lo"
    assert int(flags.strip(), 16) & 1, "lo is not up"  # IFF_UP


# -- mounts ---------------------------------------------------------------------------

def test_copy_up_etc_writable_inside_only(user, rootless_run):
    name = f"/etc/rlt-copyup-{uuid.uuid4().hex[:8]}"
    try:
        r = user.run([rootless_run, "--copy-up=/etc", "--", "sh", "-c",
                      f"touch {name} && test -f {name} && cat /etc/passwd"])
        assert r.returncode == 0, r.stderr
        with open("/etc/passwd") as f:
            assert r.stdout == f.read()
        assert not os.path.exists(name), "the host's /etc was written"
    finally:
        if os.path.exists(name):
            os.unlink(name)


@pytest.fixture
def shared_mount():
    """A tmpfs made shared, under /tmp (where / is private): host mounts below it
    propagate to the mount namespaces that are its slaves."""
    top = f"/tmp/rlt-prop-{uuid.uuid4().hex[:8]}"
    os.mkdir(top)
    mounted = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "rlt-prop", top], check=True)
        mounted.append(top)
        subprocess.run(["mount", "--make-shared", top], check=True)
        os.mkdir(os.path.join(top, "sub"))
        yield top, mounted
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(top)


@pytest.mark.parametrize("mode,visible", [("rslave", True), ("rprivate", False)])
def test_propagation_of_host_mounts(user, rootless_run, start, shared_mount, mode, visible):
    top, mounted = shared_mount
    marker = os.path.join(top, "sub", "marker")
    proc = start([rootless_run, f"--propagation={mode}", "--", "sh", "-c",
                  f"echo ready; read line; test -e {marker} && echo seen || echo unseen"],
                 stdin=subprocess.PIPE)
    lines = Lines(proc.stdout)
    assert lines.next() == "ready"
    # Mounted after the instance started: only propagation can bring it in.
    subprocess.run(["mount", "-t", "tmpfs", "rlt-prop-sub", os.path.join(top, "sub")], check=True)
    mounted.append(os.path.join(top, "sub"))
    open(marker, "w").close()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert lines.next() == ("seen" if visible else "unseen")
    assert proc.wait(timeout=10) == 0


# -- extra namespaces -----------------------------------------------------------------

def test_pidns_shows_only_its_processes(user, rootless_run):
    r = user.run([rootless_run, "--pidns", "--", "sh", "-c",
                  "echo $$; ls /proc; ps -e -o pid="])
    assert r.returncode == 0, r.stderr
    first, *rest = r.stdout.split()
    assert 1 <= int(first) <= 3
    pids = {int(w) for w in rest if w.isdigit()}
    # pid 1 (the child, the port driver's socket factory a thread of it), the shell,
    # ls or ps: nothing of the host's hundreds
    assert 1 in pids and max(pids) < 12 and len(pids) <= 7, pids


ORPHAN = "(sleep 0.2 &) ; sleep 1; ps -e -o stat=,comm="


def test_pidns_reaps_orphans(user, rootless_run):
    r = user.run([rootless_run, "--pidns", "--", "sh", "-c", ORPHAN])
    assert r.returncode == 0, r.stderr
    states = [line.split()[0] for line in r.stdout.splitlines()]
    assert "ps" in r.stdout and not any(s.startswith("Z") for s in states), r.stdout


def test_pidns_reaper_false_leaves_zombies(user, rootless_run):
    # The other side of the test above: without a reaper the orphan stays a zombie.
    r = user.run([rootless_run, "--pidns", "--reaper=false", "--", "sh", "-c", ORPHAN])
    assert r.returncode == 0, r.stderr
    assert any(line.split() == ["Z", "sleep"] for line in r.stdout.splitlines()), r.stdout


def test_utsns_hostname_private(user, rootless_run):
    before = socket.gethostname()
    name = "rlt-" + uuid.uuid4().hex[:6]
    r = user.run([rootless_run, "--utsns", "--", "sh", "-c", f"hostname {name} && hostname"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name
    assert socket.gethostname() == before


@pytest.mark.parametrize("kind", ["ipc", "cgroup"])
def test_extra_namespace_differs_from_host(user, rootless_run, kind):
    r = user.run([rootless_run, f"--{kind}ns", "--", "readlink", f"/proc/self/ns/{kind}"])
    assert r.returncode == 0, r.stderr
    inside = r.stdout.strip()
    assert inside.startswith(f"{kind}:[") and inside != host_ns(kind)
    plain = user.run([rootless_run, "--", "readlink", f"/proc/self/ns/{kind}"])
    assert plain.stdout.strip() == host_ns(kind), "without the flag: the host's namespace"


# -- subordinate ids ------------------------------------------------------------------

@pytest.mark.parametrize("source", ["static", "dynamic"])
def test_subid_sources_map_the_range(user, rootless_run, source):
    r = user.run([rootless_run, f"--subid-source={source}", "--", "sh", "-c", MAPS])
    assert r.returncode == 0, r.stderr
    assert uid_gid_maps(r.stdout) == (user.host_maps(), user.host_maps())


def test_several_subid_ranges_mapped_in_order(user, rootless_run, subid_files):
    start, count = user.subids
    subid_files(f"{user.name}:{start}:{count}\nother:300000:65536\n{user.name}:400000:1000\n")
    r = user.run([rootless_run, "--", "sh", "-c", MAPS])
    assert r.returncode == 0, r.stderr
    expected = user.host_maps() + [[str(count + 1), "400000", "1000"]]
    assert uid_gid_maps(r.stdout) == (expected, expected)


def test_subid_line_keyed_by_uid(user, rootless_run, subid_files):
    subid_files(f"{user.uid}:200000:1000\n")
    r = user.run([rootless_run, "--", "sh", "-c", MAPS])
    assert r.returncode == 0, r.stderr
    expected = [["0", str(user.uid), "1"], ["1", "200000", "1000"]]
    assert uid_gid_maps(r.stdout) == (expected, expected)


def test_user_without_subids_runs_with_single_map(nosub_user, rootless_run):
    r = nosub_user.run([rootless_run, "--", "sh", "-c",
                        "id -u; " + MAPS + "; echo --; cat /proc/self/setgroups"])
    assert r.returncode == 0, r.stderr
    uid, _, rest = r.stdout.partition("\n")
    uid_map, gid_map, setgroups = rest.split("--\n")
    assert uid == "0"
    assert map_rows(uid_map) == [["0", str(nosub_user.uid), "1"]]
    assert map_rows(gid_map) == [["0", str(nosub_user.gid), "1"]]
    assert setgroups.strip() == "deny"
    warnings = r.stderr.splitlines()
    assert len(warnings) == 1, r.stderr
    assert "warning" in warnings[0] and "/etc/subuid" in warnings[0]
    assert "usermod" in warnings[0]


@pytest.mark.parametrize("flags", [
    [],  # rootless-run's defaults: --net=auto, --port-driver=auto
    ["--net=host"], ["--net=none"], ["--net=slirp4netns"], ["--net=pasta"],
    ["--net=slirp4netns", "--port-driver=builtin", "-p", "127.0.0.1:{port}:80/tcp"],
    ["--net=slirp4netns", "--port-driver=slirp4netns", "-p", "127.0.0.1:{port}:80/tcp"],
    ["--net=pasta", "--port-driver=implicit", "-p", "127.0.0.1:{port}:80/tcp"],
], ids=["auto", "host", "none", "slirp4netns", "pasta", "builtin-ports",
        "slirp4netns-ports", "implicit-ports"])
def test_a_successful_run_prints_nothing_of_ours(user, rootless_run, flags):
    """Nothing of ours on stderr unless asked (--debug): what --net=auto chose included.
    (--net=lxc-user-nic: test_lxc_user_nic.test_lease_address_route_and_resolver.)"""
    port = free_port()
    r = user.run([rootless_run, *(f.format(port=port) for f in flags), "--", "true"])
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")


def test_net_auto_choice_is_said_under_debug(user, rootless_run):
    """--debug says which driver --net=auto chose and why, once."""
    r = user.run([rootless_run, "--debug", "--", "true"])
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "--net=auto: using" in line]
    assert len(said) == 1 and ": debug: " in said[0], r.stderr
    assert "--net=auto: using slirp4netns (" in said[0] and "choose with --net=" in said[0]
