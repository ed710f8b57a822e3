"""The fault-injection matrix (issue 17): each fault at each phase of a real run.

Every cell is a real instance: rootless-run as the unprivileged test user,
--net=slirp4netns (pasta for pasta's rows) and --port-driver=builtin, an echo server
in the namespace and clients moving data through a port published on the host's
loopback. The fault is injected at the phase, then the outcome is checked:

- the run goes on serving (after SIGCONT; for exhaustion, once the pressure is gone,
  by itself): a client moves data, the API answers, data in flight arrives whole, and
  the run then stops on SIGTERM with the command's status and no error line; or
- it ends with exactly one error line and a non-zero status (the command's status
  where the command's own end is the fault; in the shutdown phase a fault that does
  not end the run leaves it to end as asked, with the command's status, silently);
- and always: no traceback on stderr, no process of the run left (the command's
  grandchild ignores SIGTERM), and a new instance on the same --state-dir serves at
  once.

The expected outcome of every cell is written in EXPECTED below, decided before the
cell was ever run, from what a user of rootlesskit/slirp4netns would expect. The
matrix (fault x phase -> outcome, with the time to it) is printed in the terminal
summary and is docs/reliability.md's "Fault matrix".

Phases, each reached for real with hooks that live in this file only:
- handshake, before the id maps: newuidmap, found first in PATH, is a wrapper that
  says so and waits before it execs the real setuid /usr/bin/newuidmap;
- handshake, after the id maps: --slirp4netns-binary (--pasta-binary) is a wrapper
  that waits before it execs the real helper (the maps are written, the child's
  mounts are done, the network is being started);
- network up, before the command: the command is a wrapper that waits before it
  execs the server (the parent is done with the set-up: `namespaces` is written);
- serving: a client streams data through the port while the fault hits;
- during an API port add: a POST /v1/ports whose head and part of its body the API
  has read; the rest is sent once the fault is in place;
- shutdown: the run was sent SIGTERM, and the command, trapping it, takes 3 s to stop.

The cells of a phase run in parallel (RLT_FAULT_WORKERS threads, 4 by default), each
with its own instance, state dir and ports; a cell's processes are told apart by a
variable in their environment. A fault on the user as a whole (the pipe budget) runs
alone. RLT_FAULT_ONLY=TEXT keeps the rows whose fault contains TEXT.
"""
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import free_port, write_user_files
from test_ports import exchange, read_to_eof
from test_ports_hardening import HOG_ALL_PY
from test_ports_reliability import nofile_limits
from test_supervisor_faults import children

ECHO = 9000          # the echo server's port in the namespace
SHUTDOWN = 3.0       # s the command takes to stop on SIGTERM in the shutdown phase
HELD = 2.0           # s a process stays stopped, or a pressure lasts
STOP_GRACE = 10.0    # rootless.parent.supervise.STOP_GRACE
HANG = 30.0          # s after which a run that should have done something is stuck
SETTLE = 1.0         # s after the fault: a run that serves then has not just not noticed
WORKERS = int(os.environ.get("RLT_FAULT_WORKERS", "4"))
TAG = "RLT_FAULT_CELL"  # in the environment of every process of a cell's run

# -- the matrix's axes ------------------------------------------------------------------

BEFORE_MAPS = "handshake, before the id maps"
AFTER_MAPS = "handshake, after the id maps"
BEFORE_COMMAND = "network up, before the command"
SERVING = "serving traffic"
PORT_ADD = "during an API port add"
SHUTTING_DOWN = "shutdown"
PHASES = (BEFORE_MAPS, AFTER_MAPS, BEFORE_COMMAND, SERVING, PORT_ADD, SHUTTING_DOWN)
SETUP = (BEFORE_MAPS, AFTER_MAPS)

FAULTS = (
    "SIGKILL slirp4netns", "SIGSTOP slirp4netns",
    "SIGKILL child", "SIGSTOP child",
    "SIGKILL command", "SIGSTOP command",
    "SIGKILL rootless-run",
    "RLIMIT_NOFILE lowered", "RLIMIT_NPROC lowered", "pipe budget used up",
    "state dir's fs full", "state dir removed", "stderr closed",
    "SIGKILL pasta", "SIGSTOP pasta",
)


class Expect:
    """What a cell must end in. kind: serves (goes on serving), ends (one error line
    with `needle`, exit `status`, or any non-zero when None), stops (the shutdown
    ends as asked: the command's status 7, no line), killed (rootless-run died by
    SIGKILL: nobody is left to say anything), n/a (`why` it cannot apply)."""

    def __init__(self, kind: str, status: int | None = None, needle: str = "", why: str = ""):
        self.kind, self.status, self.needle, self.why = kind, status, needle, why


SERVES = Expect("serves")
STOPS = Expect("stops", 7)
KILLED = Expect("killed", -signal.SIGKILL)


def ENDS(needle: str, status: int | None = 1) -> Expect:
    return Expect("ends", status, needle)


def NA(why: str) -> Expect:
    return Expect("n/a", why=why)


NO_NET = NA("slirp4netns/pasta start after the id maps")
NO_COMMAND = NA("the command does not exist yet")
# Death by SIGKILL as rootlesskit says it; the command's own status, 128+9.
COMMAND_KILLED = ENDS("exited: signal: killed", 128 + signal.SIGKILL)
CHILD_KILLED = ENDS("the child was killed by signal 9")
SLIRP_KILLED = ENDS("slirp4netns was killed by signal 9")
OUT_OF_FDS = ENDS("Too many open files")  # set-up cannot go on: refused, in one line
OUT_OF_PROCESSES = ENDS("limit of processes")  # the same, for a process or thread


def _running(expect: Expect) -> dict:
    """The same outcome from the network's start until the shutdown."""
    return {BEFORE_COMMAND: expect, SERVING: expect, PORT_ADD: expect}


# Decided before the cells were run (the first runs then showed lines that named the
# wrong cause, so the needles now ask for the right one). A component's death ends the
# run in one line (docs/reliability.md, Failure behaviour), during set-up as after it; a stop of any
# process of the run is a pause (SIGCONT comes within every timeout); exhaustion
# refuses the work that needs what ran out and recovers by itself; during the set-up,
# where the work that needs it is the run itself, it is refused in one line naming the
# cause. In the shutdown phase a stop or a pressure lasts until the run has ended (but
# a stop of the child or the command: that pauses the shutdown itself).
EXPECTED: dict[str, dict[str, Expect]] = {
    "SIGKILL slirp4netns": {BEFORE_MAPS: NO_NET, AFTER_MAPS: SLIRP_KILLED,
                            **_running(SLIRP_KILLED), SHUTTING_DOWN: SLIRP_KILLED},
    "SIGSTOP slirp4netns": {BEFORE_MAPS: NO_NET, AFTER_MAPS: SERVES, **_running(SERVES),
                            SHUTTING_DOWN: STOPS},
    # The child dies: one line saying so, not what failed after it (newuidmap or
    # slirp4netns on a pid that is gone), and the command's whole tree goes.
    "SIGKILL child": {BEFORE_MAPS: CHILD_KILLED, AFTER_MAPS: CHILD_KILLED,
                      **_running(CHILD_KILLED), SHUTTING_DOWN: CHILD_KILLED},
    "SIGSTOP child": {BEFORE_MAPS: SERVES, AFTER_MAPS: SERVES, **_running(SERVES),
                      SHUTTING_DOWN: STOPS},
    "SIGKILL command": {BEFORE_MAPS: NO_COMMAND, AFTER_MAPS: NO_COMMAND,
                        **_running(COMMAND_KILLED), SHUTTING_DOWN: COMMAND_KILLED},
    "SIGSTOP command": {BEFORE_MAPS: NO_COMMAND, AFTER_MAPS: NO_COMMAND,
                        **_running(SERVES), SHUTTING_DOWN: STOPS},
    "SIGKILL rootless-run": {phase: KILLED for phase in PHASES},
    "RLIMIT_NOFILE lowered": {BEFORE_MAPS: OUT_OF_FDS, AFTER_MAPS: OUT_OF_FDS,
                              **_running(SERVES), SHUTTING_DOWN: STOPS},
    # The user's limit of processes (which counts threads) on the run's own processes:
    # during the set-up, the next process it starts (slirp4netns, the command) cannot
    # be. Once the command runs, the first client's thread (the ports' loop, held
    # back until now) waits for the limit to lift, and a bulk stream's worker does
    # without.
    "RLIMIT_NPROC lowered": {BEFORE_MAPS: OUT_OF_PROCESSES, AFTER_MAPS: OUT_OF_PROCESSES,
                             **_running(SERVES), SHUTTING_DOWN: STOPS},
    "pipe budget used up": {**{phase: SERVES for phase in PHASES},
                            SHUTTING_DOWN: STOPS},
    # Full during the set-up: the next file the run writes fails (resolv.conf,
    # namespaces), in one line with the fix. Later nothing more is written.
    "state dir's fs full": {BEFORE_MAPS: ENDS("No space left on device"),
                            AFTER_MAPS: ENDS("No space left on device"),
                            **_running(SERVES), SHUTTING_DOWN: STOPS},
    # Removed during the set-up: what the run still has to create there cannot be
    # (one line); once it runs, ports and the API keep working (docs/reliability.md).
    "state dir removed": {BEFORE_MAPS: ENDS("was removed"), AFTER_MAPS: ENDS("was removed"),
                          **_running(SERVES), SHUTTING_DOWN: STOPS},
    "stderr closed": {**{phase: SERVES for phase in PHASES}, SHUTTING_DOWN: STOPS},
    # pasta daemonizes: how the daemon died is not ours to know, only that it did.
    "SIGKILL pasta": {BEFORE_MAPS: NO_NET, AFTER_MAPS: ENDS("pasta was killed by signal 9"),
                      **_running(ENDS("pasta")), SHUTTING_DOWN: ENDS("pasta")},
    "SIGSTOP pasta": {BEFORE_MAPS: NO_NET, AFTER_MAPS: SERVES, **_running(SERVES),
                      SHUTTING_DOWN: STOPS},
}

# -- what runs in the namespace, and the hooks ------------------------------------------

SERVER_PY = f'''
import os, signal, socket, sys, threading, time
stopping, delay = sys.argv[1], float(sys.argv[2])
term = []
signal.signal(signal.SIGTERM, lambda *_: term.append(1))

def echo(conn):
    try:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass

def serve():
    listener = socket.create_server(("127.0.0.1", {ECHO}), backlog=128)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()

def serve_udp():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", {ECHO}))
    while True:
        data, peer = sock.recvfrom(65536)
        sock.sendto(data, peer)

threading.Thread(target=serve, daemon=True).start()
threading.Thread(target=serve_udp, daemon=True).start()
while not term:
    time.sleep(0.05)
open(stopping, "w").close()
time.sleep(delay)  # a daemon that takes a while to stop
os._exit(7)
'''


def hold(directory: str, name: str) -> str:
    """Shell: say `name` is reached (a file), then wait for the test's go."""
    return (f"touch {directory}/held-{name}; "
            f"while [ ! -e {directory}/go ]; do sleep 0.02; done")


def hook(directory: str, name: str, real: str) -> tuple[str, str]:
    """A wrapper for the helper `real` that holds (not for its --help probe), then
    execs it: the same process, setuid kept for newuidmap."""
    path = os.path.join(directory, "hooks", name)
    return path, (f'#!/bin/sh\n[ "$1" = --help ] || {{ {hold(directory, name)}; }}\n'
                  f'exec {real} "$@"\n')


def command(directory: str, delay: float, held: bool) -> list[str]:
    """The command: a grandchild that ignores SIGTERM and runs as another uid in the
    namespace (a subordinate id on the host), then (held: after the test's go) the
    echo server, which takes `delay` s to stop on SIGTERM and exits 7."""
    wait = f"{hold(directory, 'command')}; " if held else ""
    grandchild = "setpriv --reuid=1000 --regid=1000 --clear-groups sleep 1000"
    return ["sh", "-c", f"(trap '' TERM; exec {grandchild}) & {wait}"
            f"exec python3 {directory}/server.py {directory}/stopping {delay} "
            f"2>{directory}/server.log"]


# -- processes of a cell ----------------------------------------------------------------

def clip(text: str, limit: int = 400) -> str:
    """The end of a long text (a traceback's last lines say most)."""
    return text if len(text) <= limit else "..." + text[-limit:]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def tagged(tag: str) -> list[tuple[int, str]]:
    """Live processes whose environment carries `tag`: the user's, and those of its
    subordinate ids (the command's grandchild)."""
    marker = f"{TAG}={tag}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or exited(int(entry)):
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read():
                    found.append((int(entry), cmdline(int(entry))))
        except OSError:
            pass
    return found


def left_behind(tag: str, timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    while (left := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def exited(pid: int) -> bool:
    """Whether `pid` has exited (a zombie, or reaped already)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):  # gone (ENOENT, or ESRCH as it goes)
        return True


def signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_until(what: str, check, timeout: float = HANG, proc=None):
    """Poll `check` until true; fails early if `proc` (the run) exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise CellError(f"the run exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise CellError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.02)


class CellError(Exception):
    """The cell could not be carried out as designed (a phase not reached...)."""


# -- clients ----------------------------------------------------------------------------

def api_request(sock: str, method: str, path: str, body: bytes = b"",
                timeout: float = 5) -> int:
    """The HTTP status of one request to the API (as root, who may connect)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall(_request_head(method, path, len(body)) + body)
        return _status(read_to_eof(s))


def _request_head(method: str, path: str, length: int) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


def _status(answer: bytes) -> int:
    line = answer.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) > 1 and line[1].isdigit() else 0


def _port_body(port: int) -> bytes:
    """The port the API adds: UDP, whose flows (and whose routing rule, made at the
    add) come from the socket factory."""
    return json.dumps({"proto": "udp", "parentIP": "127.0.0.1", "parentPort": port,
                       "childPort": ECHO}).encode()


def udp_echoes(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        payload = os.urandom(1000)
        s.sendto(payload, ("127.0.0.1", port))
        try:
            return s.recv(2000) == payload
        except OSError:
            return False


def echoes(port: int, size: int, timeout: float) -> bool:
    """Whether `size` bytes sent through `port` come back whole."""
    payload = os.urandom(size)
    try:
        return exchange(port, payload, timeout=timeout) == payload
    except (OSError, AssertionError):  # exchange() asserts its sender had no error
        return False


def serves(port: int, sock: str | None) -> bool:
    """A client's data comes back through `port`, and the API at `sock` answers."""
    return echoes(port, 64 << 10, 3) and (sock is None or
                                          api_request(sock, "GET", "/v1/info") == 200)


def poke(port: int) -> None:
    """A client that comes while the fault holds (it loads the services if nobody
    did yet); whatever it gets, the run must not end for it."""
    threading.Thread(target=echoes, args=(port, 4096, HELD), daemon=True).start()


class Stream:
    """A client moving data through `port` while faults hit: chunks sent at a steady
    pace, their echo checked; `finish()` half-closes and says whether everything
    came back whole (None) or what went wrong."""

    CHUNK = 32 << 10

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=HANG)
        self.sent = self.received = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _chunk(i: int) -> bytes:
        return (i % 251).to_bytes(1, "big") * Stream.CHUNK

    def _send(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                self.sock.sendall(self._chunk(i))
                self.sent += Stream.CHUNK
                i += 1
                time.sleep(0.01)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = self.error or f"sending: {exc}"

    def _receive(self) -> None:
        expected, got = b"", 0
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                while len(expected) < len(data):
                    expected += self._chunk((got + len(expected)) // Stream.CHUNK)
                if data != expected[:len(data)]:
                    raise ValueError(f"corrupt data at byte {got}")
                expected = expected[len(data):]
                got += len(data)
                self.received = got
        except (OSError, ValueError) as exc:
            self.error = self.error or f"receiving: {exc}"

    def moving(self, more_than: int) -> bool:
        return self.received > more_than

    def finish(self) -> str | None:
        self._stop.set()
        for t in self._threads:
            t.join(HANG)
        self.sock.close()
        if self.error is None and self.received != self.sent:
            self.error = f"{self.received} of {self.sent} bytes came back"
        return self.error


class PendingAdd:
    """POST /v1/ports whose head and first bytes of body the API has read; `finish()`
    sends the rest and returns the answer's status (0: the connection closed)."""

    def __init__(self, sock_path: str, port: int):
        body = _port_body(port)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(HANG)
        self.sock.connect(sock_path)
        self.sock.sendall(_request_head("POST", "/v1/ports", len(body)) + body[:8])
        self.rest = body[8:]
        inode = os.fstat(self.sock.fileno()).st_ino
        wait_until("the API reading the request", lambda: _read_by_peer(sock_path, inode),
                   timeout=10)

    def send_rest(self) -> None:
        try:
            self.sock.sendall(self.rest)
        except OSError:
            pass

    def answer(self) -> int:
        try:
            return _status(read_to_eof(self.sock))
        except OSError:
            return 0
        finally:
            self.sock.close()


def _read_by_peer(path: str, inode: int) -> bool:
    """Whether the API's end of our connection (inode `inode`) has an empty receive
    queue: it has read what we sent."""
    out = subprocess.run(["ss", "-xn"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        fields = line.split()
        # u_str ESTAB Recv-Q Send-Q LOCAL LOCAL-INODE PEER PEER-INODE
        if len(fields) >= 8 and fields[4] == path and fields[7] == str(inode):
            return fields[2] == "0"
    return False


# -- ports, dirs, locks -----------------------------------------------------------------

_ports_lock = threading.Lock()
_ports_taken: set[int] = set()


def new_port(kind: int = socket.SOCK_STREAM) -> int:
    """A free loopback port no other cell of this session was given."""
    with _ports_lock:
        while (port := free_port(kind=kind)) in _ports_taken:
            pass
        _ports_taken.add(port)
        return port


class SharedLock:
    """Cells share the machine; a fault on the user as a whole runs alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._alone = False

    def acquire(self, alone: bool) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and (not alone or not self._shared))
            if alone:
                self._alone = True
            else:
                self._shared += 1

    def release(self, alone: bool) -> None:
        with self._cond:
            if alone:
                self._alone = False
            else:
                self._shared -= 1
            self._cond.notify_all()


_machine = SharedLock()
USER_WIDE = {"pipe budget used up"}
PAUSES_THE_RUN = {"SIGSTOP child", "SIGSTOP command"}


# -- one cell ---------------------------------------------------------------------------

class Cell:
    def __init__(self, user, rootless_run: str, fault: str, phase: str):
        self.user, self.run_binary, self.fault, self.phase = user, rootless_run, fault, phase
        self.tag = uuid.uuid4().hex[:8]
        self.net = "pasta" if fault.endswith("pasta") else "slirp4netns"
        self.dir = f"/tmp/rlt-fm-{self.tag}"  # the user's: hooks, server, markers
        self.root_dir = ""  # ours (root's): the run's stderr, made by prepare()
        self.state = os.path.join(user.runtime_dir, f"fm-{self.tag}")
        self.mount = None  # the tmpfs of "state dir's fs full"
        self.port = new_port()
        self.proc = None
        self.stderr_path = ""
        self.stderr_read = None  # the read end, for "stderr closed"
        self.stderr_seen = ""    # what was read of it before it was closed
        self.pids: dict[str, int] = {}
        self.lowered: dict[int, tuple[int, int]] = {}  # pid -> its nofile limits
        self.hog = None
        self.stream = None
        self.pending = None
        self.add_status = None
        self.observed = ""   # serves / ends / stops / killed / hung
        self.status = None
        self.seconds = 0.0
        self.problems: list[str] = []

    # -- set-up ------------------------------------------------------------------------

    def prepare(self) -> None:
        self.root_dir = tempfile.mkdtemp(prefix="rlt-fm-")
        self.stderr_path = os.path.join(self.root_dir, "stderr")
        os.mkdir(self.dir, 0o700)
        os.chown(self.dir, self.user.uid, self.user.gid)
        files = {"server.py": SERVER_PY}
        hooks = []
        if self.phase == BEFORE_MAPS:
            hooks.append(hook(self.dir, "newuidmap", "/usr/bin/newuidmap"))
        if self.phase == AFTER_MAPS:
            hooks.append(hook(self.dir, self.net, f"/usr/bin/{self.net}"))
        for path, text in hooks:
            files[os.path.relpath(path, self.dir)] = text
        write_user_files(self.user, self.dir, files)
        for path, _ in hooks:
            os.chmod(path, 0o755)
        if self.fault == "state dir's fs full":
            self.mount = os.path.join(self.root_dir, "fs")
            os.mkdir(self.mount)
            os.chmod(self.root_dir, 0o755)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=128k,mode=0700,uid="
                            f"{self.user.uid},gid={self.user.gid}", "tmpfs", self.mount],
                           check=True)
            self.state = os.path.join(self.mount, "state")

    def start(self, tag: str | None = None, held: bool = True, port: int | None = None,
              stderr=None) -> subprocess.Popen:
        """rootless-run as the user, publishing `port` to the echo server."""
        env = {TAG: tag or self.tag}
        args = [self.run_binary, f"--net={self.net}", "--port-driver=builtin",
                f"--state-dir={self.state}", "-p",
                f"127.0.0.1:{port or self.port}:{ECHO}/tcp"]
        if held and self.phase == BEFORE_MAPS:
            env["PATH"] = f"{self.dir}/hooks:{self.user.env()['PATH']}"
        if held and self.phase == AFTER_MAPS:
            args.append(f"--{self.net}-binary={self.dir}/hooks/{self.net}")
        delay = SHUTDOWN if held and self.phase == SHUTTING_DOWN else 0
        args += ["--", *command(self.dir, delay, held and self.phase == BEFORE_COMMAND)]
        return subprocess.Popen(self.user.argv(args), env=self.user.env(env), cwd="/tmp",
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=stderr, start_new_session=True)

    def launch(self) -> None:
        if self.fault == "stderr closed":
            self.stderr_read, write_end = os.pipe()
            os.set_blocking(self.stderr_read, False)
        else:
            write_end = os.open(self.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                0o600)
        try:
            self.proc = self.start(stderr=write_end)
        finally:
            os.close(write_end)

    @property
    def sock(self) -> str:
        return os.path.join(self.state, "api.sock")

    @property
    def api(self) -> str | None:
        """api.sock to check the API on; None once the state dir is gone: the API
        still serves, but no client can find it any more."""
        return None if self.fault == "state dir removed" else self.sock

    def reach(self) -> None:
        """Bring the run to the phase, and note its processes there."""
        proc = self.proc
        if self.phase in SETUP:
            name = "newuidmap" if self.phase == BEFORE_MAPS else self.net
            wait_until(f"{name} held", lambda: os.path.exists(f"{self.dir}/held-{name}"),
                       proc=proc)
        elif self.phase == BEFORE_COMMAND:
            # Not a client of api.sock: the services load at the first one.
            wait_until("the command held", lambda: os.path.exists(f"{self.dir}/held-command")
                       and os.path.exists(os.path.join(self.state, "namespaces"))
                       and os.path.exists(self.sock), proc=proc)
        else:
            wait_until("the run serving", lambda: serves(self.port, self.sock), proc=proc)
        if self.phase == SERVING:
            self.stream = Stream(self.port)
            wait_until("the stream moving", lambda: self.stream.moving(1 << 20), proc=proc)
        if self.phase == PORT_ADD:
            self.added_port = new_port(socket.SOCK_DGRAM)
            self.pending = PendingAdd(self.sock, self.added_port)
        if self.phase == SHUTTING_DOWN:
            proc.send_signal(signal.SIGTERM)
            wait_until("the command stopping", lambda: os.path.exists(f"{self.dir}/stopping"),
                       proc=proc)
        self.note_processes()

    def note_processes(self) -> None:
        sup = self.proc.pid
        self.pids["rootless-run"] = sup
        with open(os.path.join(self.state, "child_pid")) as f:
            child = self.pids["child"] = int(f.read())
        for pid in children(sup):
            line = cmdline(pid)
            if "rootless-run" in line:
                continue  # the child (or pasta's watchdog): forked, not exec'd
            if "slirp4netns" in line:
                self.pids["slirp4netns"] = pid
            elif "pasta" in line:
                self.pids["pasta"] = pid  # its starter, held before it execs
        if self.phase not in SETUP:
            if self.net == "pasta":
                with open(os.path.join(self.state, "pasta.pid")) as f:
                    self.pids["pasta"] = int(f.read())
            for pid in children(child):  # the socket factory is a thread of the child
                self.pids["command"] = pid

    # -- the fault ---------------------------------------------------------------------

    def target(self) -> int:
        name = self.fault.split(" ", 1)[1]
        if name not in self.pids:
            raise CellError(f"no {name} at this phase: {self.pids}")
        return self.pids[name]

    def inject(self) -> bool:
        """Inject the fault; True if it is held until remove()."""
        fault = self.fault
        if fault.startswith("SIGKILL"):
            pid = self.target()
            os.kill(pid, signal.SIGKILL)
            # Dead before anything goes on (a hold released): the phase is then the
            # same whatever the machine's load.
            wait_until("the killed process to exit", lambda: exited(pid), timeout=10)
            return False
        if fault.startswith("SIGSTOP"):
            os.kill(self.target(), signal.SIGSTOP)
            return True
        if fault == "RLIMIT_NOFILE lowered":
            for name in ("rootless-run", "child"):
                if name in self.pids:
                    self.lower_nofile(self.pids[name])
            return True
        if fault == "RLIMIT_NPROC lowered":
            for name in ("rootless-run", "child"):
                if name in self.pids:
                    self.lower_nproc(self.pids[name])
            return True
        if fault == "pipe budget used up":
            self.hog = self.user.popen(["python3", "-c", HOG_ALL_PY],
                                       env={TAG: self.tag + "-hog"})
            size = int(self.hog.stdout.readline() or 0)
            if not 0 < size < 64 << 10:
                raise CellError(f"the user's pipe budget is not used up (pipes: {size})")
            return True
        if fault == "state dir's fs full":
            self.fill()
            return True
        if fault == "state dir removed":
            r = self.user.run(["rm", "-rf", self.state])
            if r.returncode != 0 or os.path.exists(self.state):
                raise CellError(f"cannot remove the state dir: {r.stderr}")
            return False
        if fault == "stderr closed":
            self.stderr_seen = self.read_pipe()
            os.close(self.stderr_read)
            self.stderr_read = None
            return False
        raise AssertionError(fault)

    def remove(self) -> None:
        """The fault held since inject() goes: SIGCONT, the pressure gone."""
        fault = self.fault
        if fault.startswith("SIGSTOP"):
            signal_all([self.target()], signal.SIGCONT)  # it may be gone with the run
        elif fault == "RLIMIT_NOFILE lowered":
            for pid, (soft, hard) in self.lowered.items():
                self.user.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"])
        elif fault == "RLIMIT_NPROC lowered":
            for pid, (soft, _) in self.lowered.items():
                self.user.run(["prlimit", f"--pid={pid}", f"--nproc={soft}:"])
        elif fault == "pipe budget used up":
            self.hog.kill()
            self.hog.wait()
        elif fault == "state dir's fs full":
            os.unlink(os.path.join(self.mount, "filler"))

    def lower_nofile(self, pid: int) -> None:
        """No fd can be had: the soft limit below every free fd number. As the
        user (root here lacks CAP_SYS_RESOURCE), who may lower its own limits."""
        soft, hard = nofile_limits(pid)
        r = self.user.run(["prlimit", f"--pid={pid}", f"--nofile=3:{hard}"])
        if r.returncode != 0:
            raise CellError(f"prlimit on {pid}: {r.stderr}")
        self.lowered[pid] = (soft, hard)

    def lower_nproc(self, pid: int) -> None:
        """No process or thread can be started (the user has more than one): the soft
        limit of processes to 1, as the user."""
        with open(f"/proc/{pid}/limits") as f:
            soft = next(line.split()[2] for line in f if line.startswith("Max processes"))
        r = self.user.run(["prlimit", f"--pid={pid}", "--nproc=1:"])
        if r.returncode != 0:
            raise CellError(f"prlimit on {pid}: {r.stderr}")
        self.lowered[pid] = (soft, None)

    def fill(self) -> None:
        fd = os.open(os.path.join(self.mount, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        finally:
            os.close(fd)

    def read_pipe(self) -> str:
        data = b""
        try:
            while chunk := os.read(self.stderr_read, 65536):
                data += chunk
        except BlockingIOError:
            pass
        return data.decode(errors="replace")

    # -- the outcome -------------------------------------------------------------------

    def observe(self, start: float) -> None:
        """Wait for the run to end, or (but in the shutdown phase) to serve, still,
        SETTLE s after the fault; the time is counted from the fault (`start`)."""
        limit = start + HANG + STOP_GRACE + SHUTDOWN
        first = None  # when it first served after the fault
        while True:
            now = time.monotonic()
            if self.proc.poll() is not None:
                self.status = self.proc.returncode
                self.observed = "killed" if self.fault == "SIGKILL rootless-run" else "ends"
                self.seconds = now - start
                return
            if self.phase != SHUTTING_DOWN and self._serving():
                first = first or now
                if now - start >= SETTLE and self.proc.poll() is None:
                    self.observed, self.seconds = "serves", first - start
                    return
            if now > limit:
                self.observed, self.seconds = "hung", now - start
                return
            time.sleep(0.05)

    def _serving(self) -> bool:
        try:
            return serves(self.port, self.api)
        except OSError:
            return False

    def check_serving(self) -> None:
        """Served after the fault: what was in flight too; then it stops as asked."""
        if self.stream is not None:
            error = self.stream.finish()
            if error:
                self.problems.append(f"the stream in flight: {error}")
        if self.pending is not None:
            if self.add_status not in (201, 503):
                self.problems.append(f"the port add in flight got {self.add_status}")
            if self.add_status != 201:  # refused for now: it works once the pressure is gone
                status = api_request(self.sock, "POST", "/v1/ports",
                                     _port_body(self.added_port))
                if status != 201:
                    self.problems.append(f"the port add, again: {status}")
            try:
                wait_until("the added UDP port serving",
                           lambda: udp_echoes(self.added_port), timeout=10)
            except CellError as exc:
                self.problems.append(str(exc))
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.status = self.proc.wait(HANG)
        except subprocess.TimeoutExpired:
            self.problems.append("the run did not stop on SIGTERM")
            return
        if self.status != 7:
            self.problems.append(f"stopped with status {self.status}, not the command's 7")

    def stderr_text(self) -> str:
        """All the run wrote on stderr (for "stderr closed": until it was closed)."""
        if self.fault != "stderr closed" and self.stderr_path and \
                os.path.exists(self.stderr_path):
            with open(self.stderr_path, errors="replace") as f:
                self.stderr_seen = f.read()
        return self.stderr_seen

    def check_lines(self, expect: Expect) -> None:
        text = self.stderr_text()
        if "Traceback" in text:
            self.problems.append(f"a traceback: {clip(text)!r}")
            return
        lines = text.splitlines()
        errors = [line for line in lines if ": error: " in line]
        if self.observed == "serves" or expect.kind == "stops" or self.observed == "killed":
            if errors:
                self.problems.append(f"error lines: {errors}")
        elif self.observed == "ends" and self.fault != "stderr closed":
            if len(lines) != 1 or len(errors) != 1:
                self.problems.append(f"not exactly one error line: {lines}")
            elif expect.needle and expect.needle not in lines[0]:
                self.problems.append(f"the line does not say {expect.needle!r}: {lines[0]}")

    def check_reusable(self) -> None:
        """A new instance on the same state dir serves at once."""
        tag, port = self.tag + "-again", new_port()
        with open(os.path.join(self.root_dir, "stderr-again"), "w+") as err:
            proc = self.start(tag=tag, held=False, port=port, stderr=err)
            try:
                wait_until("the next instance serving", lambda: serves(port, self.sock),
                           timeout=HANG, proc=proc)
                proc.send_signal(signal.SIGTERM)
                status = proc.wait(HANG)
                if status != 7:
                    self.problems.append(f"the next instance stopped with {status}")
            except (CellError, subprocess.TimeoutExpired) as exc:
                self.problems.append(f"the state dir is not reusable: {exc}")
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                err.seek(0)
                text = err.read()
            if [line for line in text.splitlines() if ": error: " in line] or \
                    "Traceback" in text:
                self.problems.append(f"the next instance said: {clip(text)!r}")
        left = left_behind(tag)
        if left:
            self.problems.append(f"the next instance left {left}")

    def verdict(self, expect: Expect) -> None:
        wanted = {"serves": "serves", "stops": "ends", "ends": "ends", "killed": "killed"}
        if self.observed != wanted[expect.kind]:
            self.problems.insert(0, f"expected it to {expect.kind}, it {self.observed}")
        elif expect.kind in ("ends", "stops", "killed"):
            ok = self.status != 0 if expect.status is None else self.status == expect.status
            if not ok:
                self.problems.insert(0, f"status {self.status}, expected "
                                        f"{expect.status or 'non-zero'}")

    # -- the whole cell ----------------------------------------------------------------

    def run(self) -> None:
        expect = EXPECTED[self.fault][self.phase]
        alone = self.fault in USER_WIDE
        _machine.acquire(alone)
        try:
            self.prepare()
            self.launch()
            self.reach()
            start = time.monotonic()
            held = self.inject()
            self.go()
            if self.pending is not None:
                self.pending.send_rest()
            if held:
                self.hold()
                self.remove()
            if self.pending is not None:
                self.add_status = self.pending.answer()
            self.observe(start)
            if self.observed == "serves":
                self.check_serving()
            self.check_lines(expect)
            left = left_behind(self.tag)
            if left:
                self.problems.append(f"left running: {left}")
            self.clean_up_processes()
            self.check_reusable()
            self.verdict(expect)
        except CellError as exc:
            self.observed = self.observed or "?"
            self.problems.append(f"{exc}; stderr: {clip(self.stderr_text())!r}")
        finally:
            try:
                self.clean_up()
            finally:  # whatever the clean-up raised: a cell alone waits for this one
                _machine.release(alone)

    def hold(self) -> None:
        """While the fault holds, a client comes (under the pipe budget, once the run
        serves, it must be served: through a buffer). In the shutdown phase the fault
        lasts until the run has ended, which it must under it too: all but a stop of
        the child or the command, whose pause is the run's."""
        poke(self.port)
        if self.fault == "pipe budget used up" and self.phase in (SERVING, PORT_ADD):
            if not echoes(self.port, 1 << 20, HANG):
                self.problems.append("a client was not served under the pipe budget")
        if self.phase == SHUTTING_DOWN and self.fault not in PAUSES_THE_RUN:
            try:
                self.proc.wait(HANG + SHUTDOWN)
            except subprocess.TimeoutExpired:
                return
            left = left_behind(self.tag)  # before a SIGCONT lets a stopped one go
            if left:
                self.problems.append(f"left running when the run ended: {left}")
        else:
            time.sleep(HELD)

    def go(self) -> None:
        write_user_files(self.user, self.dir, {"go": ""})

    def clean_up_processes(self) -> None:
        if os.path.isdir(self.dir):
            self.go()
        pids = [pid for pid, _ in tagged(self.tag)]
        signal_all(pids, signal.SIGKILL)
        signal_all(pids, signal.SIGCONT)
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(HANG)
        if self.hog is not None and self.hog.poll() is None:
            self.hog.kill()
            self.hog.wait()

    def clean_up(self) -> None:
        if self.stream is not None:
            self.stream.sock.close()
        if self.pending is not None:
            self.pending.sock.close()
        if self.stderr_read is not None:
            os.close(self.stderr_read)
        self.clean_up_processes()
        for tag in (self.tag, self.tag + "-again"):
            signal_all([pid for pid, _ in tagged(tag)], signal.SIGKILL)
        if self.mount:
            deadline = time.monotonic() + 10
            while subprocess.run(["umount", self.mount], capture_output=True).returncode:
                if time.monotonic() > deadline:
                    self.problems.append(f"cannot unmount {self.mount}")
                    break
                time.sleep(0.1)
        self.stderr_text()  # kept for the report: its file goes now
        paths = [p for p in (self.dir, self.state, self.root_dir) if p]
        subprocess.run(["rm", "-rf", *paths], check=False)

    def text(self) -> str:
        """The cell as the matrix shows it."""
        if self.observed == "ends":
            stops = EXPECTED[self.fault][self.phase].kind == "stops"
            what = f"{'stops' if stops else 'ends'} {self.status}"
        elif self.observed == "killed":
            what = "killed"
        else:
            what = self.observed
        mark = " ✗" if self.problems else ""
        return f"{what}{mark} ({self.seconds:.1f} s)"


# -- the matrix -------------------------------------------------------------------------

class Matrix:
    """The cells run this session; printed in the terminal summary."""

    def __init__(self):
        self.cells: dict[tuple[str, str], Cell] = {}
        self.seconds: dict[str, float] = {}

    def table(self) -> str:
        phases = [p for p in PHASES if any(ph == p for _, ph in self.cells)]
        rows = ["| fault | " + " | ".join(phases) + " |",
                "|---|" + "---|" * len(phases)]
        notes: dict[str, int] = {}
        for fault in FAULTS:
            texts = []
            for phase in phases:
                expect = EXPECTED[fault][phase]
                if expect.kind == "n/a":
                    n = notes.setdefault(expect.why, len(notes) + 1)
                    texts.append(f"n/a ({n})")
                elif (fault, phase) in self.cells:
                    texts.append(self.cells[fault, phase].text())
                else:
                    texts.append("")
            rows.append(f"| {fault} | " + " | ".join(texts) + " |")
        rows += [""] + [f"({n}) n/a: {why}" for why, n in notes.items()]
        said = [c for c in self.cells.values() if c.observed == "ends" and c.stderr_seen]
        if said:
            rows += ["", "what the runs that ended said:"]
        for cell in said:
            rows.append(f"  {cell.fault} / {cell.phase}: {clip(cell.stderr_seen.strip(), 300)}")
        failed = [c for c in self.cells.values() if c.problems]
        for cell in failed:
            rows.append(f"✗ {cell.fault} / {cell.phase}: {'; '.join(cell.problems)}")
        rows.append("time per phase: " + ", ".join(f"{p}: {s:.0f} s"
                                                   for p, s in self.seconds.items()) +
                    f"; in all {sum(self.seconds.values()):.0f} s")
        return "\n".join(rows)


class _Summary:
    def __init__(self, matrix: Matrix):
        self.matrix = matrix

    def pytest_terminal_summary(self, terminalreporter):
        if self.matrix.cells:
            terminalreporter.section("fault matrix (fault x phase -> outcome, time to it)")
            terminalreporter.write_line(self.matrix.table())


@pytest.fixture(scope="session")
def matrix(request):
    m = Matrix()
    request.config.pluginmanager.register(_Summary(m), "rootless-fault-matrix")
    return m


@pytest.mark.parametrize("phase", PHASES)
def test_fault_matrix(user, rootless_run, matrix, phase):
    """Every fault at `phase`, each cell an instance of its own, several at once."""
    cells = [Cell(user, rootless_run, fault, phase) for fault in FAULTS
             if EXPECTED[fault][phase].kind != "n/a"]
    only = os.environ.get("RLT_FAULT_ONLY")  # e.g. "SIGKILL child": one row
    if only:
        cells = [c for c in cells if only in c.fault]
    start = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(Cell.run, cells))
    matrix.seconds[phase] = time.monotonic() - start
    for cell in cells:
        matrix.cells[cell.fault, cell.phase] = cell
    failed = [f"{c.fault}: {'; '.join(c.problems)}" for c in cells if c.problems]
    for cell in cells:  # shown with the failure: all the run said
        if cell.problems:
            print(f"--- {cell.fault} / {phase}: stderr:\n{cell.stderr_text()}")
    assert not failed, "\n".join(failed)
