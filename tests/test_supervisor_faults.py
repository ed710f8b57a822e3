"""The supervisor when parts of a run fail, through the real thing: rootless-run as the
unprivileged test user, real slirp4netns and pasta, real sockets and signals.

What ends a run: the child, a network helper, the socket factory or the API listener
dying; it is noticed at once, said in one line, and the command's whole tree is
stopped. What does not: the state dir removed under it, nobody reading its stderr.
What never starts one: a -p port that cannot be had.
"""
import ctypes
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import free_port, wait_for_api, write_user_files
from test_ports import HTTP, NOTHING, api, http_get, tmp, until, wait_http  # noqa: F401

STOP_GRACE = 10  # rootless.parent.supervise.STOP_GRACE: the command's time to stop on SIGTERM
HANG = 30        # seconds after which a run that should have ended is stuck


# -- processes ------------------------------------------------------------------------

def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (state, ppid, ...)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = stat_fields(int(entry))
            except OSError:
                continue
            if fields[1] == str(pid) and fields[0] != "Z":
                found.append(int(entry))
    return found


def exe(pid: int) -> str:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return ""


def is_python(pid: int) -> bool:
    return exe(pid).startswith("python")


def fd_targets(pid: int) -> dict[int, str]:
    """fd -> what it refers to ('pipe:[123]', 'socket:[456]', a path...)."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def child_pid(state_dir: str, timeout: float = 20) -> int:
    path = os.path.join(state_dir, "child_pid")
    until("child_pid", lambda: os.path.exists(path), timeout=timeout)
    with open(path) as f:
        return int(f.read())


def factory_fd(anchor: int) -> int:
    """The fd of the child that is the socket factory's end of the parent's socket pair
    (the factory is a thread of the child): its only socket, beside the command."""
    found = until("the socket factory's socket", lambda: [
        fd for fd, target in fd_targets(anchor).items() if target.startswith("socket:[")])
    assert len(found) == 1, (found, fd_targets(anchor))
    return found[0]


def slirp4netns_of(supervisor: int) -> int:
    found = until("slirp4netns", lambda: [p for p in children(supervisor)
                                          if exe(p) == "slirp4netns"])
    assert len(found) == 1, found
    return found[0]


def ended(proc: subprocess.Popen, timeout: float = HANG) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run still runs {timeout} s later")


def stderr_of(proc: subprocess.Popen, timeout: float = 10) -> str:
    """All the run wrote on stderr (once it has ended)."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        pytest.fail("the run's stderr is still open: a process of the run lives on")


def one_error_line(proc: subprocess.Popen, *needles: str) -> str:
    stderr = stderr_of(proc)
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], stderr
    for needle in needles:
        assert needle in lines[0], stderr
    return lines[0]


def nothing_left(user, timeout: float = 5) -> None:
    """No process of the test user is left (once those exiting are gone)."""
    deadline = time.monotonic() + timeout
    while (left := user.processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"left running: {left}"


# -- fail before the command starts ---------------------------------------------------

BAD_P = {  # case -> (specs with {port}, what the line must say)
    "taken": ([f"127.0.0.1:{{port}}:{HTTP}/tcp"],
              ["127.0.0.1:{port}/tcp is in use on the host", "pick another parent port"]),
    "privileged": ([f"127.0.0.1:80:{HTTP}/tcp"],
                   ["port 80 is privileged", "net.ipv4.ip_unprivileged_port_start"]),
    "not-local": ([f"192.0.2.1:{{port}}:{HTTP}/tcp"],
                  ["192.0.2.1 is not an address of this host"]),
    "duplicate": ([f"127.0.0.1:{{port}}:{HTTP}/tcp", "127.0.0.1:{port}:9000/tcp"],
                  [f"already published by -p 127.0.0.1:{{port}}:{HTTP}/tcp"]),
    "duplicate-udp": (["127.0.0.1:{port}:53/udp", "127.0.0.1:{port}:53/udp"],
                      ["already published by -p 127.0.0.1:{port}:53/udp"]),
}


@pytest.mark.parametrize("case", list(BAD_P))
def test_a_p_port_that_cannot_be_had_fails_before_the_command(user, rootless_run, user_tmp,
                                                              case):
    """Nothing runs: one line naming the -p and the fix, exit 1, no command."""
    port = free_port()
    specs, needles = ([s.format(port=port) for s in x] for x in BAD_P[case])
    marker = os.path.join(user_tmp, "ran")
    with socket.socket() as taken:
        if case == "taken":
            taken.bind(("127.0.0.1", port))
            taken.listen()
        r = user.run([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                      *[a for spec in specs for a in ("-p", spec)], "--", "touch", marker],
                     env={"TMPDIR": user_tmp})
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"rootless-run: error: -p {specs[-1]}: "), r.stderr
    for needle in needles:
        assert needle in lines[0], r.stderr
    assert os.listdir(user_tmp) == [], "the command ran (or a temp state dir was left)"


# -- the socket factory and the API listener: parts the run cannot live without --------

@pytest.mark.parametrize("flags", [[], ["--pidns"]], ids=["no-pidns", "pidns"])
def test_socket_factory_death_ends_the_run(user, rootless_run, start, state_dir, flags):
    port = free_port()
    proc = start([rootless_run, "--net=slirp4netns", "--port-driver=builtin", *flags,
                  f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:{HTTP}/tcp", "--",
                  "sleep", "1000"])
    # Serving (the services loaded, the factory in use): a client has come and gone.
    assert api(user, wait_for_api(proc, state_dir), "GET", "/v1/info")[0] == 200
    # The factory, a thread of the child, cannot be killed alone: its socket is shut
    # down under it, as its end would be (it reads EOF and ends, closing it).
    anchor = child_pid(state_dir)
    _shut_down_in(anchor, factory_fd(anchor))
    assert ended(proc) == 1
    one_error_line(proc, "socket factory", "stopping the command")
    nothing_left(user)


@pytest.mark.parametrize("flags", [[], ["--pidns"], ["--detach-netns"]],
                         ids=["no-pidns", "pidns", "detach-netns"])
def test_the_socket_factory_is_a_thread_of_the_child(user, rootless_run, start, state_dir,
                                                     flags):
    """Two Python processes, not three (docs/memory.md): after a first client through a
    published port the child's only child is the command, and the child has a second
    thread, the factory, which served that client's socket from the child's netns (the
    detached one, which only that thread enters, with --detach-netns)."""
    port = free_port()
    server = f"python3 -m http.server -b 127.0.0.1 {HTTP}"
    if "--detach-netns" in flags:  # the command keeps the host's network
        server = f'nsenter --net="$ROOTLESSKIT_STATE_DIR/netns" {server}'
    proc = start([rootless_run, "--net=slirp4netns", "--port-driver=builtin", *flags,
                  f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:{HTTP}/tcp", "--",
                  "sh", "-c", f"exec {server}"])
    until("a first client's answer", lambda: b"Directory listing" in http_get(port, "/"),
          timeout=20)
    anchor = child_pid(state_dir)
    commands = children(anchor)
    assert len(commands) == 1 and is_python(commands[0]), commands
    assert "http.server" in open(f"/proc/{commands[0]}/cmdline").read()
    assert stat_fields(anchor)[17] == "2", "the child's threads"  # num_threads
    factory_fd(anchor)  # its socket to the parent: the child's only one
    proc.terminate()
    assert ended(proc) == 128 + signal.SIGTERM
    nothing_left(user)


def _listener_fd(pid: int, path: str) -> int:
    """The fd of process `pid` that is the unix socket listening at `path`."""
    with open("/proc/net/unix") as f:
        inodes = {line.split()[6] for line in f.read().splitlines()[1:]
                  if line.split()[-1] == path and line.split()[5] == "01"}
    fds = [fd for fd, target in fd_targets(pid).items()
           if target.startswith("socket:[") and target[8:-1] in inodes]
    assert fds, (path, inodes, fd_targets(pid))
    return fds[0]


def _shut_down_in(pid: int, fd: int) -> None:
    """shutdown(2) the socket behind fd `fd` of process `pid`, as that process would
    (root takes a copy of it with pidfd_getfd)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
        assert copy >= 0, os.strerror(ctypes.get_errno())
    finally:
        os.close(pidfd)
    with socket.socket(fileno=copy) as sock:
        sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("loaded", [False, True], ids=["before-a-client", "serving"])
def test_api_listener_failure_ends_the_run(user, rootless_run, start, state_dir, loaded):
    proc = start([rootless_run, "--net=slirp4netns", f"--state-dir={state_dir}", "--",
                  "sleep", "1000"])
    child_pid(state_dir)
    sock = os.path.join(state_dir, "api.sock")
    until("api.sock", lambda: os.path.exists(sock), timeout=20)
    if loaded:
        assert api(user, wait_for_api(proc, state_dir), "GET", "/v1/info")[0] == 200
    _shut_down_in(proc.pid, _listener_fd(proc.pid, sock))
    assert ended(proc) == 1
    one_error_line(proc, "api.sock")
    nothing_left(user)


# -- the state dir removed under a live run (item 10) ---------------------------------

def test_removing_the_state_dir_leaves_ports_working(user, rootless_run, start, state_dir,
                                                     tmp):
    """logind cleaning $XDG_RUNTIME_DIR, tmpfiles aging /tmp: the published ports go on,
    and the run ends as the command does. Nothing but the state dir's files tells the
    run is up here: no client before the removal (the factory is not connected lazily)."""
    port, stop = free_port(), os.path.join(tmp, "stop")
    proc = start([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                  f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:{HTTP}/tcp", "--",
                  "sh", "-c", f"busybox httpd -f -p 127.0.0.1:{HTTP} -h {tmp}/www & "
                  f"while [ ! -e {stop} ]; do sleep 0.1; done; exit 7"])
    until("the command", lambda: os.path.exists(os.path.join(state_dir, "namespaces")),
          timeout=20)
    assert user.run(["rm", "-rf", state_dir]).returncode == 0
    assert not os.path.exists(state_dir)
    wait_http(port)
    assert http_get(port) == b"the file's content\n"
    assert proc.poll() is None
    user.run(["touch", stop])
    assert ended(proc) == 7
    assert stderr_of(proc) == ""
    nothing_left(user)


# -- nobody reads stderr (item 11) ----------------------------------------------------

@pytest.mark.parametrize("when", ["from-the-start", "while-serving"])
@pytest.mark.parametrize("broken", ["epipe", "eio"])
def test_a_broken_stderr_does_not_end_the_run(user, rootless_run, spawned, state_dir, tmp,
                                              broken, when):
    """--debug, clients, API requests and a port add make log lines; none can be
    written (the log's reader is gone: EPIPE; the terminal hung up: EIO), and the run
    serves on and ends with the command's status."""
    port, other, refused = free_port(), free_port(), free_port()
    stop = os.path.join(tmp, "stop")
    if broken == "epipe":
        reader, stderr = os.pipe()
    else:
        reader, stderr = os.openpty()  # closing the terminal's side hangs it up
    if when == "from-the-start":
        os.close(reader)
    try:
        proc = subprocess.Popen(
            user.argv([rootless_run, "--debug", "--net=slirp4netns", "--port-driver=builtin",
                       f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:{HTTP}/tcp",
                       "-p", f"127.0.0.1:{refused}:{NOTHING}/tcp", "--",
                       "sh", "-c", f"exec 2>/dev/null; busybox httpd -f -p 127.0.0.1:{HTTP} "
                       f"-h {tmp}/www & while [ ! -e {stop} ]; do sleep 0.1; done; exit 7"]),
            env=user.env(), cwd="/tmp", stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)
    finally:
        os.close(stderr)
    spawned.append(proc)
    sock = os.path.join(state_dir, "api.sock")

    def serving():
        assert proc.poll() is None, f"the run ended with status {proc.returncode}"
        return api(user, sock, "GET", "/v1/info")[0] == 200

    until("the API", serving, timeout=20)
    if when == "while-serving":
        os.close(reader)
    wait_http(port)
    for _ in range(5):  # "connecting to ... in the child: Connection refused", each
        with pytest.raises(OSError):
            http_get(refused)
    status, body = api(user, sock, "POST", "/v1/ports", {
        "proto": "tcp", "parentIP": "127.0.0.1", "parentPort": other, "childPort": HTTP})
    assert status == 201, body
    wait_http(other)
    assert serving()
    user.run(["touch", stop])
    assert ended(proc) == 7
    nothing_left(user)


# -- more than 1024 fds in the supervisor (item 12) -----------------------------------

HOLD_PY = '''
import socket, time
listener = socket.create_server(("127.0.0.1", 9000), backlog=1024)  # never accepts
time.sleep(1e6)
'''


@pytest.mark.parametrize("how", ["helper-died", "command-exits"])
def test_over_1024_fds_in_the_supervisor(user, rootless_run, start, state_dir, tmp, how):
    """600 connections held through a port: the supervisor has ~1,300 fds. A stop then
    is still graceful (SIGTERM, the command's trap runs to its end), and so is the end
    of the command."""
    write_user_files(user, tmp, {"hold.py": HOLD_PY})
    port = free_port()
    stop, termed = os.path.join(tmp, "stop"), os.path.join(tmp, "termed")
    proc = start([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                  f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:9000/tcp", "--",
                  "sh", "-c", f"trap 'sleep 0.5; echo done > {termed}; exit 0' TERM; "
                  f"python3 {tmp}/hold.py & "
                  f"while [ ! -e {stop} ]; do sleep 0.1; done; exit 5"])
    wait_for_api(proc, state_dir)
    clients = []
    try:
        for _ in range(600):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        until("the supervisor's fds", lambda: len(fd_targets(proc.pid)) > 1100, timeout=20)
        if how == "helper-died":
            os.kill(slirp4netns_of(proc.pid), signal.SIGKILL)
            assert ended(proc) == 1
            one_error_line(proc, "slirp4netns")
            with open(termed) as f:
                assert f.read() == "done\n", "the command's SIGTERM trap did not finish"
        else:
            user.run(["touch", stop])
            assert ended(proc) == 5
            assert stderr_of(proc) == ""
    finally:
        for client in clients:
            client.close()
    nothing_left(user)


# -- the command's whole tree goes when the supervisor gives up (item 13) ----------------

def test_giving_up_stops_the_whole_tree(user, rootless_run, start, state_dir):
    """Without --pidns: a command that ignores SIGTERM, and a grandchild that does too.
    slirp4netns dies: after the grace, not one of them is left."""
    proc = start([rootless_run, "--net=slirp4netns", f"--state-dir={state_dir}", "--",
                  "sh", "-c", "trap '' TERM; sleep 1000 & sleep 1001"])

    def sleeps():
        return {p[2] for p in user.processes() if p[2].startswith("sleep 100")}

    until("the command's tree", lambda: sleeps() == {"sleep 1000", "sleep 1001"}, timeout=20)
    os.kill(slirp4netns_of(proc.pid), signal.SIGKILL)
    assert ended(proc, STOP_GRACE + HANG) == 1
    one_error_line(proc, "slirp4netns")
    nothing_left(user)


# -- a signal during set-up (item 14) -------------------------------------------------

@pytest.fixture
def slow_slirp4netns(user, user_tmp):
    """A slirp4netns that takes 2 s to start; `starting` appears as it begins."""
    directory = os.path.join(user_tmp, "bin")
    starting = os.path.join(user_tmp, "starting")
    write_user_files(user, directory, {"slirp4netns": (
        f'#!/bin/sh\n[ "$1" = --help ] || {{ touch {starting}; sleep 2; }}\n'
        f'exec /usr/bin/slirp4netns "$@"\n')})
    os.chmod(os.path.join(directory, "slirp4netns"), 0o755)
    return os.path.join(directory, "slirp4netns"), starting


@pytest.mark.parametrize("flags", [["--pidns"], []], ids=["pidns", "no-pidns"])
def test_a_signal_during_set_up_reaches_the_command(rootless_run, start, user_tmp,
                                                    slow_slirp4netns, flags):
    binary, starting = slow_slirp4netns
    done = os.path.join(user_tmp, "done")
    proc = start([rootless_run, "--net=slirp4netns", f"--slirp4netns-binary={binary}",
                  *flags, "--", "sh", "-c", f"sleep 2; touch {done}"])
    until("slirp4netns starting", lambda: os.path.exists(starting), timeout=20)
    proc.send_signal(signal.SIGTERM)
    assert ended(proc) == 128 + signal.SIGTERM, stderr_of(proc)
    assert not os.path.exists(done), "the command ran to completion"
    # The run was sent it: no news (a stop by systemd as the unit starts). Before, the
    # child often heard of it after the command had died of it, and said so.
    assert stderr_of(proc) == ""


# -- the command killed by a signal (item 15) -----------------------------------------

PID_MODES = pytest.mark.parametrize("flags", [
    ["--pidns=false"], ["--pidns=true", "--reaper=auto"], ["--pidns=true", "--reaper=true"],
    ["--pidns=true", "--reaper=false"]], ids=lambda f: ",".join(f))


@PID_MODES
@pytest.mark.parametrize("code", [0, 42])
def test_exit_status_passes_through(user, rootlesskit_link, flags, code):
    """The first half of rootlesskit's exit-code scenario: `sh -exc "exit N"`."""
    r = user.run([rootlesskit_link, *flags, "sh", "-exc", f"exit {code}"])
    assert r.returncode == code, r.stderr


@PID_MODES
def test_death_by_signal_is_said_as_rootlesskit_says_it(user, rootlesskit_link, start,
                                                        state_dir, flags):
    """rootlesskit's hack/integration-exit-code.sh: SIGUSR1 to STATE/child_pid running
    `sleep infinity`, then its output must say `user defined signal 1`. Ours exits
    128+10 (the shell's convention; rootlesskit exits 255)."""
    proc = start([rootlesskit_link, f"--state-dir={state_dir}", *flags, "sleep", "infinity"])
    pid = child_pid(state_dir)
    until("the command", lambda: any(p[2] == "sleep infinity" for p in user.processes()),
          timeout=20)
    os.kill(pid, signal.SIGUSR1)
    assert ended(proc) == 128 + signal.SIGUSR1
    assert one_error_line(proc) == ("rootlesskit[child]: error: command [sleep infinity] "
                                    "exited: signal: user defined signal 1")


def test_ctrl_c_ends_the_run_quietly(rootless_run, start, state_dir):
    """A Ctrl-C reaches the whole process group (the supervisor, the child, the socket
    factory, the command): the command ends with 130, and nothing is said (the factory
    is not taken for a part that died, nor the command's death for news)."""
    proc = start([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                  f"--state-dir={state_dir}", "--", "sleep", "1000"])
    until("the command", lambda: os.path.exists(os.path.join(state_dir, "namespaces")),
          timeout=20)
    os.killpg(proc.pid, signal.SIGINT)
    assert ended(proc) == 128 + signal.SIGINT
    assert stderr_of(proc) == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_to_the_process_group_is_no_news(rootless_run, start, state_dir, request,
                                                  sig):
    """A signal to the run's whole process group (Ctrl-C; `kill -TERM -PGID`) reaches
    the command twice: from the kernel, and forwarded by the child. When the command
    died of it before the parent's word that the run was sent it reached the child,
    the child said so as news ("command [sleep 1000] exited: signal: terminated"): in
    about one run in two. Ten runs of each, all quiet."""
    for run in range(10):
        here = f"{state_dir}-{run}"
        request.node.user_dirs.append(here)
        proc = start([rootless_run, "--net=slirp4netns", f"--state-dir={here}", "--",
                      "sleep", "1000"])
        until("the command", lambda: os.path.exists(os.path.join(here, "namespaces")),
              timeout=20)
        time.sleep(0.1)
        os.killpg(proc.pid, sig)
        assert ended(proc) == 128 + sig
        assert stderr_of(proc) == "", f"run {run + 1}"


# -- what long-lived helpers hold (item 16) -------------------------------------------

def test_long_lived_helpers_hold_nothing_of_ours(user, rootless_run, start, state_dir):
    """pasta's watchdog, the pid-ns shim and pasta itself hold none of the supervisor's
    fds (its sockets, pipes, the state dir's lock), only what they need. (The socket
    factory is a thread of the child.)"""
    port = free_port()
    proc = start([rootless_run, "--pidns", "--net=pasta", "--port-driver=builtin",
                  f"--state-dir={state_dir}", "-p", f"127.0.0.1:{port}:{HTTP}/tcp", "--",
                  "sleep", "1000"])
    wait_for_api(proc, state_dir)
    init = child_pid(state_dir)
    shim = int(stat_fields(init)[1])
    watchdogs = [p for p in children(proc.pid) if is_python(p) and p != shim]
    assert len(watchdogs) == 1, (children(proc.pid), shim)
    with open(os.path.join(state_dir, "pasta.pid")) as f:
        pasta = int(f.read())

    def beyond_stdio(pid):
        return sorted(target for fd, target in fd_targets(pid).items() if fd > 2)

    # The shim's own: the wake-up pipe of its wait (both ends), shared with no one.
    shim_fds = beyond_stdio(shim)
    assert len(shim_fds) == 2 and len(set(shim_fds)) == 1 and shim_fds[0].startswith("pipe:"), \
        shim_fds
    assert shim_fds[0] not in beyond_stdio(proc.pid) + beyond_stdio(init)
    assert sorted(re.sub(r"\[\d+\]", "", t) for t in beyond_stdio(watchdogs[0])) == \
        ["anon_inode:[pidfd]", "pipe:"], beyond_stdio(watchdogs[0])
    ours = set(beyond_stdio(proc.pid))
    assert not ours & set(beyond_stdio(pasta)), (ours, beyond_stdio(pasta))
    assert not any(t.endswith("/lock") for t in beyond_stdio(pasta))
    proc.terminate()
    assert ended(proc) == 128 + signal.SIGTERM


def test_slirp4netns_holds_nothing_of_ours(user, rootless_run, start, state_dir):
    proc = start([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                  f"--state-dir={state_dir}", "--", "sleep", "1000"])
    wait_for_api(proc, state_dir)
    helper = slirp4netns_of(proc.pid)
    ours = {t for fd, t in fd_targets(proc.pid).items() if fd > 2}
    theirs = {t for fd, t in fd_targets(helper).items() if fd > 2}
    assert not ours & theirs, (ours, theirs)
    proc.terminate()
    assert ended(proc) == 128 + signal.SIGTERM


# -- pasta is signalled through a pidfd (item 17) -------------------------------------

def _process_with_pid(user, pid: int, tries: int = 200) -> subprocess.Popen | None:
    """A `sleep` of the test user that gets pid `pid` (through ns_last_pid; other
    processes of the machine may take it first: then try again)."""
    for _ in range(tries):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = user.popen(["sleep", "60"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
        if os.path.exists(f"/proc/{pid}"):
            return None  # someone else's now
    return None


def test_pasta_gone_its_pid_reused_is_not_signalled(user, rootless_run, start, spawned,
                                                    state_dir):
    """pasta dies; by the time the run stops it, its pid is another process of the
    user's: that one must not get pasta's SIGTERM."""
    proc = start([rootless_run, "--net=pasta", f"--state-dir={state_dir}", "--",
                  "sh", "-c", "trap 'sleep 3; exit 0' TERM; while :; do sleep 0.1; done"])
    wait_for_api(proc, state_dir)
    with open(os.path.join(state_dir, "pasta.pid")) as f:
        pasta = int(f.read())
    os.kill(pasta, signal.SIGKILL)
    until("pasta reaped", lambda: not os.path.exists(f"/proc/{pasta}"), timeout=10)
    other = _process_with_pid(user, pasta)
    if other is None:
        pytest.skip(f"pid {pasta} could not be had again")
    spawned.append(other)
    assert ended(proc) == 1
    one_error_line(proc, "pasta")
    assert other.poll() is None, f"pid {pasta}, now another process, was signalled"
