"""Harness: pytest runs as root (to set things up); every namespace test runs
rootless-run as an unprivileged user through setpriv, as a real user would.

contrib/test.sh prepares the users: rlt-test (uid 1001, subordinate ids
100000:65536) and rlt-nosub (uid 1002, none). With RLT_SLOT=N (N > 0) it prepares
rlt-testN and rlt-nosubN instead, and the tests use those: several checkouts can then
be tested at once without killing each other's processes.
"""
import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

VENV_BIN = os.path.dirname(sys.executable)
TEST_USER = os.environ.get("RLT_TEST_USER", "rlt-test")
NOSUB_USER = os.environ.get("RLT_NOSUB_USER", "rlt-nosub")
RUN = os.path.join(VENV_BIN, "rootless-run")

# Property tests (tests/test_properties_*.py). "ci", the default: few examples, the same
# ones every run (derandomized: a CI failure is reproduced by running the test again),
# the whole property suite well under a minute. "fuzz" (pytest --hypothesis-profile=fuzz):
# at least 10,000 examples per property, random each run. No database, and hypothesis'
# own cache in a private temp dir of this session, removed at exit: nothing in the
# checkout, and no fixed name in /tmp for another user to plant a symlink at. No deadline: this machine's two CPUs are
# shared, and a slow example is not a failure (a hang is: every wait has a timeout).
FUZZ_EXAMPLES = 10_000
_PROPERTY_SETTINGS = dict(database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow])
settings.register_profile("ci", max_examples=100, derandomize=True, **_PROPERTY_SETTINGS)
settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, **_PROPERTY_SETTINGS)
settings.load_profile("ci")
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="rootless-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)


def _fuzzing() -> bool:
    return settings.default.max_examples >= FUZZ_EXAMPLES


def examples(ci: int) -> settings:
    """A property's number of examples: `ci` in the default profile (a costly property
    takes fewer), the profile's in any other."""
    return settings(max_examples=settings.default.max_examples if _fuzzing() else ci)


def sample(ci: int, fuzz: int) -> settings:
    """The number of examples of a check through a real entry point (a process per
    example), which shows that an in-process property stands for it: a sample."""
    return settings(max_examples=fuzz if _fuzzing() else ci)


class User:
    def __init__(self, name: str):
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid, self.home = pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir
        self.runtime_dir = f"/run/user/{self.uid}"
        self.subids = self._first_range("/etc/subuid")

    def _first_range(self, path: str) -> tuple[int, int] | None:
        """(start, count) of the user's first line in `path`, as the test set it up."""
        with open(path) as f:
            for line in f:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[0] in (self.name, str(self.uid)):
                    return int(fields[1]), int(fields[2])
        return None

    def host_maps(self) -> list[list[str]]:
        """The uid_map lines (as fields) the user gets from its subids."""
        start, count = self.subids
        return [["0", str(self.uid), "1"], ["1", str(start), str(count)]]

    def env(self, extra: dict | None = None) -> dict:
        env = {
            "HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": "/bin/sh",
            "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "XDG_RUNTIME_DIR": self.runtime_dir, "LANG": "C.UTF-8",
        }
        env.update(extra or {})
        return env

    def argv(self, args: list[str], outer: tuple = ()) -> list[str]:
        """`outer`: a command run as root that execs the rest (e.g. in a namespace)."""
        return [*outer, "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                "--init-groups", "--", *args]

    def run(self, args: list[str], *, env: dict | None = None, timeout: float = 60,
            input: str | None = None, cwd: str = "/tmp",
            outer: tuple = ()) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(args, outer), env=self.env(env), cwd=cwd, input=input,
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, args: list[str], *, env: dict | None = None, outer: tuple = (),
              **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.argv(args, outer), env=self.env(env), cwd="/tmp",
                                text=True, start_new_session=True, **kw)

    def processes(self) -> list[tuple[int, str, str]]:
        """Live (non-zombie) processes of this user: (pid, state, cmdline)."""
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            real_uid = int(status["Uid"].split()[0])
            state = status["State"].split()[0]
            if real_uid == self.uid and state != "Z":
                out.append((int(entry), state, cmd))
        return out


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free on `host` just now (loopback addresses only, in these tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def has_ipv6_loopback() -> bool:
    try:
        free_port("::1")
        return True
    except OSError:
        return False


def write_user_files(user, directory: str, files: dict[str, str]) -> None:
    """Write `files` (relative path -> text) under `directory`, with the directories
    they need, all owned by `user`: what its servers in the child read."""
    for relative, text in files.items():
        path = os.path.join(directory, relative)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent)
            os.chown(parent, user.uid, user.gid)
        with open(path, "w") as f:
            f.write(text)
        os.chown(path, user.uid, user.gid)


def rss_kib(pid: int) -> int:
    """The resident memory of process `pid`, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def thread_names(pid: int) -> list[str]:
    """The names of process `pid`'s threads (ours: "rootless ports", "rootless trio"...)."""
    names = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:
            pass  # the thread ended meanwhile
    return names


def answers(unix_socket: str) -> bool:
    """Whether something accepts connections on `unix_socket` (e.g. STATE/api.sock)."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(unix_socket)
            return True
        except OSError:
            return False


def wait_for_api(proc: subprocess.Popen, state_dir: str, timeout: float = 20) -> str:
    """Wait until the instance `proc` serves STATE/api.sock (its -p ports are up by
    then); returns the socket's path. Fails at once if the instance exits."""
    sock = os.path.join(state_dir, "api.sock")
    deadline = time.monotonic() + timeout
    while not answers(sock):
        assert proc.poll() is None, f"the instance exited: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{sock} did not answer within {timeout} s"
        time.sleep(0.05)
    return sock


@pytest.fixture(scope="session")
def user() -> User:
    return User(TEST_USER)


@pytest.fixture(scope="session")
def nosub_user() -> User:
    return User(NOSUB_USER)


def _kill_all(u: User) -> list:
    left = u.processes()
    for pid, _, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


@pytest.fixture(scope="session", autouse=True)
def registry_pruned():
    """Instances the tests killed (SIGKILL: no chance to unregister) leave their
    entries in the test users' registries ($XDG_RUNTIME_DIR/rootless/.registry):
    `rootless-ctl ps`, which prunes the stale ones, runs once at the end."""
    yield
    for name in (TEST_USER, NOSUB_USER):
        User(name).run([os.path.join(VENV_BIN, "rootless-ctl"), "ps"])


@pytest.fixture(autouse=True)
def nothing_left_behind(request):
    """Each test must leave no process of the test users running."""
    users = [User(TEST_USER), User(NOSUB_USER)]
    for u in users:
        _kill_all(u)
    # The test users' dirs (user_tmp, state_dir): removed last, once none of their
    # processes is left to write there (a dying one could keep a dir from going).
    request.node.user_dirs = []
    yield
    deadline = time.monotonic() + 3
    left = []
    while time.monotonic() < deadline:
        left = [p for u in users for p in u.processes()]
        if not left:
            break
        time.sleep(0.05)
    for u in users:
        _kill_all(u)
    for path in request.node.user_dirs:
        subprocess.run(["rm", "-rf", path], check=False)
    assert not left, f"processes left running: {left}"


@pytest.fixture
def state_dir(user, request):
    """A path (not yet created) for --state-dir, under the user's runtime dir."""
    path = os.path.join(user.runtime_dir, "state-" + uuid.uuid4().hex[:8])
    request.node.user_dirs.append(path)
    return path


@pytest.fixture
def rootless_run():
    return RUN


@pytest.fixture
def rootlesskit_link(rootless_run):
    """rootless-run under the name rootlesskit (so: rootlesskit's defaults), in a dir
    the test user can read."""
    directory = tempfile.mkdtemp(prefix="rlt-names-")
    os.chmod(directory, 0o755)
    link = os.path.join(directory, "rootlesskit")
    os.symlink(rootless_run, link)
    yield link
    shutil.rmtree(directory)


@pytest.fixture
def user_tmp(user, request):
    """A private dir of the test user, for TMPDIR: whatever a run leaves there shows."""
    path = f"/tmp/rlt-tmp-{uuid.uuid4().hex[:8]}"
    os.mkdir(path, 0o700)
    os.chown(path, user.uid, user.gid)
    request.node.user_dirs.append(path)
    return path


@pytest.fixture
def start(user, spawned, user_tmp):
    """start(args): rootless-run in the background, as the user. TMPDIR is private to
    the test: a supervisor killed at teardown cannot remove its temp state dir."""
    def start(args, **kw):
        proc = user.popen(args, env={"TMPDIR": user_tmp}, **kw)
        spawned.append(proc)
        return proc
    return start


@pytest.fixture
def subid_files(user, nosub_user):
    """Rewrite /etc/subuid and /etc/subgid for one test: `write(text)` puts `text` in
    both, followed by the lines of other users (those of other test slots, which
    may be running). The original content (or absence) is restored whatever happens."""
    if os.environ.get("RLT_SLOT", "0") != "0":
        # Two runs saving and restoring the files at once could lose the other's users.
        pytest.skip("rewrites /etc/subuid: only in the main test slot (RLT_SLOT unset)")
    paths = ("/etc/subuid", "/etc/subgid")
    saved = {}
    for path in paths:
        try:
            with open(path) as f:
                saved[path] = f.read()
        except FileNotFoundError:
            saved[path] = None

    ours = {user.name, str(user.uid), nosub_user.name, str(nosub_user.uid)}

    def write(text: str) -> None:
        for path in paths:
            others = [line for line in (saved[path] or "").splitlines(keepends=True)
                      if line.split(":", 1)[0] not in ours]
            with open(path, "w") as f:
                f.write(text + "".join(others))

    try:
        yield write
    finally:
        for path, text in saved.items():
            if text is None:
                if os.path.exists(path):
                    os.unlink(path)
            else:
                with open(path, "w") as f:
                    f.write(text)


@pytest.fixture
def spawned():
    """Popen objects a test starts: killed (whole session) and reaped at teardown."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the session may outlive its leader
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()
