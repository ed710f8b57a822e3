"""At the user's limit of processes (RLIMIT_NPROC, `ulimit -u`, which counts threads; a
systemd unit's TasksMax fails the same way): a run that cannot start says so in one
line, and a run that is up waits for the limit to lift rather than ending.

The parent starts threads after the command runs: the ports' loop at a -p port's first
client, the API's worker at its first request. Once, either failing ("can't start new
thread") ended the run: a rootless dockerd died because the user's build had used up
its processes. At start-up, the same limit gave a traceback, or "internal error in the
child".

Real instances as the test user; the limit is lowered on the instance's parent alone,
from outside (`prlimit --pid`, as the user: root here lacks CAP_SYS_RESOURCE), soft only,
so that the user can raise it back.
"""
import os
import socket
import time
from types import SimpleNamespace

import pytest

from conftest import free_port, thread_names, wait_for_api, write_user_files
from test_ports import api, connect, recv_exactly, until
from test_ports_hardening import ECHO, SERVER_PY, UECHO

LIMIT_WORDS = "limit of processes"


def soft_nproc(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max processes"):
                return line.split()[2]
    raise AssertionError(f"no 'Max processes' in /proc/{pid}/limits")


def set_soft_nproc(user, pid: int, value: str) -> None:
    r = user.run(["prlimit", f"--pid={pid}", f"--nproc={value}:"])
    assert r.returncode == 0, r.stderr


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def listens_inside(pid: int, port: int, udp: bool = False) -> bool:
    """Whether the instance `pid`'s command listens on `port` in its netns (read from
    the command's /proc: no client comes near the published port)."""
    for each in descendants(pid):
        try:
            with open(f"/proc/{each}/cmdline", "rb") as f:
                if b"server.py" not in f.read():
                    continue
            with open(f"/proc/{each}/net/{'udp' if udp else 'tcp'}") as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        state = "07" if udp else "0A"
        if any(row[1].endswith(f":{port:04X}") and row[3] == state for row in rows):
            return True
    return False


@pytest.fixture
def instance(user, rootless_run, state_dir, spawned, user_tmp):
    """start(spec, udp): an instance publishing `spec`, its command test_ports_hardening's
    server, up (the command listening, the services' thread waiting) with neither its
    port nor its API touched yet: .proc, .pid."""
    write_user_files(user, user_tmp, {"server.py": SERVER_PY})

    def start(spec: str, udp: bool):
        proc = user.popen([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                           f"--state-dir={state_dir}", "-p", spec, "--",
                           "python3", os.path.join(user_tmp, "server.py")])
        spawned.append(proc)
        until("the command listening", lambda: proc.poll() is None and listens_inside(
            proc.pid, UECHO if udp else ECHO, udp), 20)
        until("the services' thread", lambda: "rootless api" in thread_names(proc.pid), 20)
        return SimpleNamespace(proc=proc, pid=proc.pid)
    return start


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_ports_first_client_at_the_process_limit_waits_for_it_to_lift(user, instance,
                                                                          proto):
    """The first client of a -p port comes while the parent cannot start a thread: the
    ports' loop cannot start. The run goes on, says so once, and the client is answered
    once the limit lifts."""
    udp = proto == "udp"
    port = free_port(kind=socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    inst = instance(f"127.0.0.1:{port}:{UECHO if udp else ECHO}/{proto}", udp)
    threads = thread_count(inst.pid)
    soft = soft_nproc(inst.pid)
    set_soft_nproc(user, inst.pid, "1")
    if udp:
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(30)
        client.sendto(b"ping", ("127.0.0.1", port))
    else:
        client = connect(port, timeout=30)
        client.sendall(b"ping")
    try:
        time.sleep(1.5)  # the services try, fail, and try again meanwhile
        assert inst.proc.poll() is None, inst.proc.stderr.read()
        assert thread_count(inst.pid) == threads  # nothing started: the limit holds
        set_soft_nproc(user, inst.pid, soft)
        answer = client.recv(100) if udp else recv_exactly(client, 4)
        assert answer.startswith(b"ping"), answer
    finally:
        client.close()
    assert inst.proc.poll() is None
    inst.proc.terminate()
    _, err = inst.proc.communicate(timeout=30)
    lines = [line for line in err.splitlines() if LIMIT_WORDS in line]
    assert len(lines) == 1 and "trying again" in lines[0], err


def test_the_apis_first_request_at_the_process_limit_waits_for_it_to_lift(
        user, rootless_run, state_dir, spawned):
    """The API's first request comes while the parent cannot start a thread: its
    worker cannot start. The run goes on, and the request is answered once the limit
    lifts."""
    proc = user.popen([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                       f"--state-dir={state_dir}", "--", "sleep", "600"])
    spawned.append(proc)
    sock = os.path.join(state_dir, "api.sock")
    until("api.sock", lambda: os.path.exists(sock), 20)  # bound: the backlog holds us
    # the services' thread is up (it starts once the command runs)
    until("the services' thread", lambda: "rootless api" in thread_names(proc.pid), 20)
    soft = soft_nproc(proc.pid)
    set_soft_nproc(user, proc.pid, "1")
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(30)
    try:
        client.connect(sock)
        client.sendall(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(1.5)
        assert proc.poll() is None, proc.stderr.read()
        set_soft_nproc(user, proc.pid, soft)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 200") and b'"apiVersion"' in answer, answer
    assert proc.poll() is None
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    lines = [line for line in err.splitlines() if LIMIT_WORDS in line]
    assert len(lines) == 1 and "trying again" in lines[0], err


@pytest.mark.parametrize("net", ["none", "slirp4netns"])
def test_a_run_at_the_process_limit_starts_or_says_why_in_one_line(user, rootless_run,
                                                                   user_tmp, net):
    """rootless-run under ever lower limits of processes: each run either works (the
    command's output, exit 0) or fails with one line that names the limit: never a
    traceback, an "internal error", or a bare "Resource temporarily unavailable". Each
    process and thread it starts (the child, newuidmap, newgidmap, slirp4netns, the
    services' thread, the socket factory's, the command) meets the limit at one of
    them."""
    write_user_files(user, user_tmp, {"server.py": SERVER_PY})
    outcomes = {}
    for limit in range(1, 25):
        r = user.run(["prlimit", f"--nproc={limit}:", rootless_run, f"--net={net}",
                      "--port-driver=builtin", "-p", f"127.0.0.1:{free_port()}:80/tcp",
                      "--", "sh", "-c", "echo command ran"], timeout=60)
        err = r.stderr.strip()
        if r.returncode == 0:
            assert r.stdout == "command ran\n" and not err, (limit, r.stdout, err)
            outcomes[limit] = "ran"
            continue
        assert r.returncode == 1, (limit, r.returncode, err)
        assert len(err.splitlines()) == 1, (limit, err)
        assert LIMIT_WORDS in err and "Traceback" not in err, (limit, err)
        outcomes[limit] = err
        # what it started is gone by the time it exits (slirp4netns may take a moment)
        until("nothing of the run left", lambda: not user.processes(), 5)
    said = [text for text in outcomes.values() if text != "ran"]
    assert said and "ran" in outcomes.values(), outcomes


@pytest.mark.parametrize("how", ["rootless-ctl enter", "rootless-run --reuse"])
def test_joining_an_instance_at_the_process_limit_says_why(user, rootless_run, state_dir,
                                                           spawned, how):
    """`rootless-ctl enter` (and `--reuse`) at the limit: the command cannot start in
    the instance; one line naming the limit, nsenter's status 126, and the instance
    goes on. Once, the line said only "Resource temporarily unavailable"."""
    proc = user.popen([rootless_run, f"--state-dir={state_dir}", "--", "sleep", "600"])
    spawned.append(proc)
    until("the instance", lambda: os.path.exists(os.path.join(state_dir, "namespaces")), 20)
    ctl = os.path.join(os.path.dirname(rootless_run), "rootless-ctl")
    join = [ctl, "enter", "--state-dir", state_dir, "--"] if how.startswith("rootless-ctl") \
        else [rootless_run, "--reuse", f"--state-dir={state_dir}", "--"]
    r = user.run(["prlimit", "--nproc=1:", *join, "true"])
    assert r.returncode == 126, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and LIMIT_WORDS in lines[0] and "'true'" in lines[0], r.stderr
    assert user.run([*join, "true"]).returncode == 0
    assert proc.poll() is None


def test_an_api_port_add_at_the_process_limit_is_refused_for_now(user, rootless_run,
                                                                  state_dir, spawned):
    """The API adds the first port of a run without -p while the parent cannot start a
    thread (the ports' loop starts with it): 503, "try again later", not the 400 of a
    bad request; the same add works once the limit lifts, and the run went on."""
    proc = user.popen([rootless_run, "--net=slirp4netns", "--port-driver=builtin",
                       f"--state-dir={state_dir}", "--", "sleep", "600"])
    spawned.append(proc)
    sock = wait_for_api(proc, state_dir)
    assert api(user, sock, "GET", "/v1/info")[0] == 200  # the API and its worker run
    soft = soft_nproc(proc.pid)
    body = {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": free_port(),
            "childPort": 80}
    set_soft_nproc(user, proc.pid, "1")
    status, answer = api(user, sock, "POST", "/v1/ports", body)
    assert status == 503 and LIMIT_WORDS in answer and "try again" in answer, answer
    assert proc.poll() is None
    set_soft_nproc(user, proc.pid, soft)
    status, answer = api(user, sock, "POST", "/v1/ports", body)
    assert status == 201, answer
    assert proc.poll() is None
