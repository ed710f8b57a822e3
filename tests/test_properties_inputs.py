"""Properties of the other readers of what a user, the kernel or a past run hands us:

- the flag parser: any argv gives a Config (or --help/--version's text) or one error
  line, as the run writes it; on a sample, the real rootless-run says the same;
- the /proc readers, fed generated content (truncated, garbage, not UTF-8): an
  answer, never an exception;
- the state dir's files a joiner reads (`namespaces`, `child_pid`), generated: the
  namespaces to join, or one error line; on a sample, the real `rootless-ctl enter`
  and `rootless-run --reuse` say the same."""
import errno
import fcntl
import os
import shutil
import stat
import subprocess
import tempfile
import uuid

import pytest
from hypothesis import example, given, strategies as st

from conftest import RUN, VENV_BIN, examples, sample
from hostile import NUMBERS, argv_able, argv_text, garbage_bytes, mangled, pieces, to_bytes
from rootless import _flags, _listen, _log, cli, enter
from rootless.integrations import cgroup
from rootless.child import mounts
from rootless.state.safewalk import _overflow_id
from rootless.child.run import _parent_in_stat, diagnose_unshare
from rootless.config import Config
from rootless.drivers.port._relay import _pipe_share
from rootless.drivers.port.base import unprivileged_port_start
from rootless.errors import EnterError, RootlessError
from rootless.state.statedir import NAMESPACE_KINDS

CTL = os.path.join(VENV_BIN, "rootless-ctl")


def logged(program: str, message: str) -> bytes:
    """What the run writes on stderr for `message` as its error (through _log)."""
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            _log.configure(debug=False, program=program)
            _log.error(message)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return f.read()


def one_line(data: bytes) -> bool:
    """One line of printable text."""
    text = data.decode()
    return text.endswith("\n") and text[:-1].isprintable()


# -- the flag parser -----------------------------------------------------------------------

_GOOD = {"net": ["auto", "host", "none", "slirp4netns", "pasta", "vpnkit"],
         "cidr": ["10.0.2.0/24", "10.0.2.0/33", "fd00::/64", "10.0.2.1"],
         "mtu": NUMBERS, "ifname": ["tap0", "eth0", "a" * 16, ".", "a/b", "a b"],
         "copy_up": ["/etc", "/run", "none", "etc", "/nonexistent"],
         "publish": ["127.0.0.1:8080:80/tcp", "8080:80/sctp", "80:80/tcp\n"],
         "state_dir": ["state", "/tmp/x" + "y" * 120],
         "evacuate_cgroup2": ["init", "", "..", "a/b", "\n"]}


@st.composite
def _flag(draw, real: bool) -> list[str]:
    """One flag of the table, in one of its spellings, with a value that fits it or
    not."""
    flags = [f for f in _flags.FLAGS if not (real and f.field in ("state_dir", "reuse"))]
    flag = draw(st.sampled_from(flags))
    name = draw(st.sampled_from(flag.names + tuple("-" + n.lstrip("-") for n in flag.names
                                                     if n.startswith("--"))))
    values = list(flag.choices) + _GOOD.get(flag.field, [])
    value = draw(st.one_of(st.sampled_from(values or ["x"]), pieces(), argv_text()))
    if flag.kind == _flags.BOOL:
        spelled = draw(st.sampled_from(["", "=true", "=false", "=1", "=yes", "=TRUE", "=maybe",
                                        "="]))
        return [name + spelled]
    return draw(st.sampled_from([[f"{name}={value}"], [name, value], [name]]))


def argvs(real: bool = False):
    """Flags, perhaps a stray argument, perhaps --help or --version; then nothing,
    or `-- true` (real runs always get `-- true`, and run nothing else)."""
    item = st.one_of(_flag(real), _flag(real),
                     st.sampled_from([["-h"], ["--version"], ["-"], ["--"], ["---x"]]),
                     argv_text().map(lambda t: [t]))
    flags = st.lists(item, max_size=6).map(lambda items: [a for i in items for a in i])
    if real:
        return flags
    return st.builds(lambda f, end: f + end, flags, st.sampled_from([[], ["--", "true"]]))


def config_of(program: str, argv: list[str]):
    """What rootless-run makes of `argv` before anything runs: (Config or text) or the
    line it writes."""
    try:
        return cli.build_config(program, argv), None
    except RootlessError as exc:
        line = logged(program, str(exc))
        assert one_line(line), line
        return exc, line


@examples(500)
@given(st.sampled_from(["rootless-run", "rootlesskit"]), argvs())
@example("rootless-run", ["--ifname=\udcff", "--", "true"])
@example("rootless-run", ["--net=a\nb"])
@example("rootless-run", ["--mtu=" + "9" * 5000])
@example("rootlesskit", ["--copy-up=etc\n\x1b[31m"])
def test_any_argv_gives_a_config_or_one_line(program, argv):
    result, _ = config_of(program, argv)
    assert isinstance(result, (Config, str, RootlessError))


@pytest.fixture(scope="module")
def netns():
    """A network namespace with only its loopback (what -p binds)."""
    name = f"rlt-i{os.environ.get('RLT_SLOT', '0')}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _runs_only_true(flags: list[str]) -> bool:
    """Whether a real process can have `flags`, and runs `true` with them."""
    if not all(map(argv_able, flags)):
        return False
    result, _ = config_of("rootless-run", flags + ["--", "true"])
    return not isinstance(result, Config) or result.command == ("true",)


@sample(15, 300)
@given(argvs(real=True).filter(_runs_only_true))
@example(["--ifname=\udcff"])
@example(["--copy-up=/\udcff"])
@example(["--net=a\nb"])
def test_real_rootless_run_says_what_the_flag_property_says(user, user_tmp, netns, flags):
    argv = flags + ["--", "true"]
    r = subprocess.run(user.argv([RUN, *argv], outer=("nsenter", f"--net=/run/netns/{netns}")),
                       env=user.env({"TMPDIR": user_tmp}), cwd=user_tmp, capture_output=True,
                       timeout=60)
    result, line = config_of("rootless-run", argv)
    if line is not None:
        assert (r.returncode, r.stdout, r.stderr) == (result.exit_code, b"", line)
    elif isinstance(result, str):
        assert (r.returncode, r.stdout, r.stderr) == (0, result.encode(), b"")
    else:
        lines = r.stderr.splitlines(keepends=True)
        assert all(one_line(x) and x.startswith(b"rootless-run") for x in lines), r.stderr
        errors = [x for x in lines if b": error: " in x]
        assert len(errors) == (r.returncode != 0), r.stderr
        # the child always says why it failed: this says its report was lost
        assert b"exited during set-up" not in r.stderr, r.stderr


# -- the /proc readers -----------------------------------------------------------------------

def _mountinfo_line(point: str, fstype: str) -> str:
    return f"36 25 0:32 / {point} rw,nosuid shared:9 - {fstype} {fstype} rw"


_point = st.sampled_from(["/etc", "/sys/fs/cgroup", "/", "/etc/x", "/a\\040b", "/\udcff",
                          "/sys/fs/cgroup/"])
_fstype = st.sampled_from(["tmpfs", "cgroup2", "cgroup", "ext4", "overlay", ""])
_mountinfo = st.lists(st.one_of(
    st.builds(_mountinfo_line, _point, _fstype),
    mangled(st.builds(_mountinfo_line, _point, _fstype)),
    st.sampled_from(["", "36 25 0:32 / /etc", "36 25 0:32 / /etc rw - ", "- - - - - -",
                     "36 25 0:32 / /etc rw master:1 - tmpfs"])), max_size=6).map(
    lambda lines: to_bytes("\n".join(lines)))
_contents = st.one_of(garbage_bytes(), _mountinfo)


@pytest.fixture
def scratch():
    """write(bytes) -> the path of a file holding them (a fresh file each time)."""
    directory = tempfile.mkdtemp(prefix="rlt-proc-")
    count = [0]

    def write(data: bytes, name: str = "") -> str:
        count[0] += 1
        path = os.path.join(directory, name or f"f{count[0]}")
        with open(path, "wb") as f:
            f.write(data)
        return path
    yield write
    shutil.rmtree(directory)


@examples(300)
@given(_contents)
@example(b"36 25 0:32 / /etc rw - tmpfs\n36 25 0:32 / /\xff rw - tmpfs tmpfs rw\n")
@example(b"36 25 0:32 / /etc\n")
@example(b"0::/user.slice/\xff\n")
def test_mountinfo_and_cgroup_readers_answer_whatever_they_read(scratch, content):
    path = scratch(content)
    assert mounts._on_tmpfs("/etc", mountinfo=path) in (True, False)
    assert cgroup._is_cgroup2("/sys/fs/cgroup", mountinfo=path) in (True, False)
    assert isinstance(cgroup._own_cgroup(path), str)


@examples(300)
@given(st.lists(st.sampled_from([f"{NAME} (x y) S 1 0" for NAME in ("7", "12")] + [
    "1 (a) b) S 42 1 1", "1 (x)", "1 (x) S", "", ")", "1 ((()) R 9", "\x00"]), max_size=3).map(
    " ".join) | st.text(max_size=60))
@example("1 (sh) S")
def test_the_parent_in_proc_stat_is_read_or_not_found(text):
    parent = _parent_in_stat(text)
    assert parent is None or isinstance(parent, str)


@examples(300)
@given(st.one_of(garbage_bytes(), st.sampled_from(NUMBERS).map(str.encode),
                 st.integers(-2**70, 2**70).map(lambda n: b"%d\n" % n)))
@example(b"99999999999999999999\n")
@example(b"\xff")
def test_sysctl_readers_answer_whatever_they_read(scratch, content):
    backlog = _listen.backlog(scratch(content))
    assert 1 <= backlog <= 2**31 - 1
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        s.bind("\0" + uuid.uuid4().hex)
        s.listen(backlog)  # the number it is for
    directory = os.path.dirname(scratch(content, "pipe-user-pages-soft"))
    scratch(content, "pipe-user-pages-hard")
    assert _pipe_share(directory) > 0
    start = unprivileged_port_start(scratch(content))
    assert start.isascii() and start.isdigit(), start
    assert isinstance(_overflow_id(scratch(content), scratch(content)), int)
    for name in ("kernel/unprivileged_userns_clone", "user/max_user_namespaces",
                 "kernel/apparmor_restrict_unprivileged_userns"):
        os.makedirs(os.path.dirname(os.path.join(directory, name)), exist_ok=True)
        scratch(content, name)
    assert diagnose_unshare(OSError(errno.EPERM, "Operation not permitted"), directory)


# -- the state dir's files, as a joiner reads them ---------------------------------------

_MINE = {kind: os.stat(f"/proc/self/ns/{kind}") for kind in NAMESPACE_KINDS}
_record_line = st.one_of(
    st.sampled_from([f"{k} {s.st_dev} {s.st_ino}" for k, s in _MINE.items()]),
    st.builds("{} {} {}".format, st.sampled_from(list(NAMESPACE_KINDS) + ["net6", "USER", ""]),
              st.sampled_from(NUMBERS), st.sampled_from(NUMBERS)),
    mangled(st.just("user 4 4026531837")), pieces())
records = st.one_of(st.lists(_record_line, max_size=8).map("\n".join).map(
    to_bytes), garbage_bytes(5000))
pids = st.one_of(st.sampled_from([b"1", b"%d" % os.getpid(), b"0", b"-1", b"", b" 1\n",
                                  b"4194305", b"9" * 5000, b"\xd9\xa1", b"1\x00"]),
                 st.integers(-2**40, 2**40).map(lambda n: b"%d" % n), garbage_bytes(40))
_kinds = st.sampled_from(["file", "file", "file", "file", "missing", "dir", "fifo", "link",
                          "huge"])


def make_state_dir(path: str, record: bytes, pid: bytes, kinds: tuple[str, str],
                   owner: tuple[int, int] | None = None) -> None:
    """A state dir at `path` with `namespaces` and `child_pid` of the given content,
    each a regular file, or missing, a dir, a FIFO, a symlink, or too long."""
    os.mkdir(path, 0o700)
    for name, data, kind in (("namespaces", record, kinds[0]), ("child_pid", pid, kinds[1])):
        target = os.path.join(path, name)
        if kind in ("file", "huge"):
            with open(target, "wb") as f:
                f.write(data + (b" " * 5000 if kind == "huge" else b""))
        elif kind == "dir":
            os.mkdir(target)
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "link":
            os.symlink("/etc/hostname", target)
    open(os.path.join(path, "lock"), "w").close()
    if owner:
        for entry in [path] + [os.path.join(path, e) for e in os.listdir(path)]:
            os.lchown(entry, *owner)


def held(path: str) -> int:
    """An fd holding the state dir's lock, as a running instance does."""
    fd = os.open(os.path.join(path, "lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def joined(path: str):
    """What `enter` finds on the state dir at `path` (locked): the namespaces to join
    (closed here), or the EnterError's line."""
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = enter._find(dir_fd, path, 0, patient=False)
    except EnterError as exc:
        line = logged("rootless-ctl", str(exc))
        assert one_line(line), line
        return line
    finally:
        os.close(dir_fd)
    for _, fd in found:
        os.close(fd)
    return [kind for kind, _ in found]


@examples(300)
@given(records, pids, st.tuples(_kinds, _kinds))
@example(b"user 4 4026531837\n", b"1", ("file", "file"))
@example(b"user 1 2\nnet 3", b"9" * 5000, ("file", "file"))
def test_state_dir_files_give_namespaces_or_one_line(tmp_path, record, pid, kinds):
    path = str(tmp_path / uuid.uuid4().hex[:8])
    make_state_dir(path, record, pid, kinds)
    fd = held(path)
    try:
        assert isinstance(joined(path), (list, bytes))
    finally:
        os.close(fd)
        shutil.rmtree(path)


@sample(10, 200)
@given(records, pids, st.tuples(_kinds.filter(lambda k: k != "missing"), _kinds))
@example(b"user 4 4026531837\n", b"1", ("file", "file"))
def test_real_enter_and_reuse_say_what_the_property_says(user, record, pid, kinds):
    """`rootless-ctl enter` on the state dir, as the test user: the in-process
    answer's line (run as root, a pid of root's may be joinable in process: then
    only one line is asked of the real one). `rootless-run --reuse` too, where the
    record is no record (other cases wait for a starting instance)."""
    path = os.path.join(user.runtime_dir, "joiner-" + uuid.uuid4().hex[:8])
    make_state_dir(path, record, pid, kinds, owner=(user.uid, user.gid))
    fd = held(path)
    try:
        expected = joined(path)
        r = user.run([CTL, "enter", "--state-dir", path, "--", "true"], timeout=30)
        if isinstance(expected, bytes) and b"pid" not in expected:
            assert (r.returncode, r.stderr.encode()) == (1, expected)
        elif r.returncode != 0:
            assert r.returncode == 1 and one_line(r.stderr.encode()), r.stderr
        if isinstance(expected, bytes) and b"not a namespace record" in expected:
            r = user.run([RUN, "--reuse", f"--state-dir={path}", "--", "true"], timeout=30)
            assert (r.returncode, r.stderr.encode()) == (1, expected.replace(
                b"rootless-ctl", b"rootless-run"))
    finally:
        os.close(fd)
        shutil.rmtree(path)


def test_a_mount_point_not_utf8_is_read_by_the_run(user, user_tmp):
    """--evacuate-cgroup2 reads mountinfo, where mount points need not be UTF-8: one
    was a traceback (UnicodeDecodeError). In a mount namespace of its own, with a
    tmpfs on such a dir; this host has cgroup v1, which the run must say."""
    point = os.path.join(os.fsencode(user_tmp), b"\xff")
    os.mkdir(point)
    outer = ("unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs none "$1" && shift && exec "$@"', "sh", point)
    r = user.run([RUN, "--net=host", "--pidns", "--cgroupns", "--evacuate-cgroup2=init",
                  "--", "true"], outer=outer)
    assert r.returncode == 1 and one_line(r.stderr.encode()), r.stderr
    assert "needs cgroup v2" in r.stderr, r.stderr
