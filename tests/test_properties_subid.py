"""Properties of the subordinate-id readers (rootless.subid) against shadow's own
parser: generated /etc/subuid and /etc/subgid files are bind-mounted over the real
ones in a private mount namespace (the host's files are never touched), where
Debian's getsubids (shadow's lib/subordinateio.c, as newuidmap reads the files)
lists the test user's ranges. Ours, from the same file, must be those ranges, or
one SubidError line when newuidmap could not use them: a line of the user's that
shadow cannot read (ours says which instead of leaving a range out), a range the
kernel cannot map, a NUL byte (shadow's reader then runs lines together). Never a
traceback. The getsubids path (`--subid-source=dynamic`) runs in that namespace too."""
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest
from hypothesis import example, given, strategies as st

from conftest import RUN, TEST_USER, examples, sample
from hostile import NUMBERS, any_text, pieces, to_bytes
from rootless.errors import SubidError
from rootless.subid import parse_getsubids, parse_subid_file, read_subid_file

_PW = pwd.getpwnam(TEST_USER)
NAME, UID = _PW.pw_name, str(_PW.pw_uid)
assert _PW.pw_gid == _PW.pw_uid  # newgidmap matches the uid, getsubids -g the gid

# -- the oracle: getsubids in a mount namespace of its own ------------------------------

# The bind mounts go when the host replaces its /etc/subuid (another test slot's
# contrib/test.sh edits it with sed -i): they are checked, and made again, around each
# answer.
HELPER = r'''
import json, os, subprocess, sys, traceback
files = sys.argv[1]

def bound():
    return all(os.stat(f"/etc/{name}").st_ino == os.stat(f"{files}/{name}").st_ino
               for name in ("subuid", "subgid"))

def bind():
    for name in ("subuid", "subgid"):
        subprocess.run(["mount", "--bind", f"{files}/{name}", f"/etc/{name}"], check=True)

def answer(user, group):
    raw = subprocess.run(["getsubids", *(["-g"] if group else []), user],
                         capture_output=True)
    try:
        ours = [list(r) for r in run_getsubids(user, group)]
    except SubidError as exc:
        ours = {"error": str(exc)}
    except Exception:
        ours = {"crash": traceback.format_exc()}
    return {"rc": raw.returncode, "out": raw.stdout.decode("latin-1"),
            "err": raw.stderr.decode("latin-1"), "ours": ours}

bind()
from rootless.errors import SubidError
from rootless.subid import run_getsubids
print("ready", flush=True)
for request in sys.stdin:
    while True:
        if not bound():
            bind()
        result = answer(*json.loads(request))
        if bound():
            break
    print(json.dumps(result), flush=True)
'''


class Shadow:
    """Files in a private dir, seen as /etc/subuid and /etc/subgid by getsubids."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="rlt-subid-")
        for name in ("subuid", "subgid"):
            open(self.path(name == "subgid"), "wb").close()
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", sys.executable, "-c", HELPER,
             self.dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline() == "ready\n"

    def path(self, group: bool) -> str:
        return os.path.join(self.dir, "subgid" if group else "subuid")

    def write(self, content: bytes, group: bool) -> str:
        # In place: the bind mount holds this inode (a rename would not be seen).
        with open(self.path(group), "r+b") as f:
            f.truncate()
            f.write(content)
        return self.path(group)

    def ask(self, user: str, group: bool) -> dict:
        self.proc.stdin.write(json.dumps([user, group]) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the getsubids helper died"
        return json.loads(answer)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir)


@pytest.fixture(scope="module")
def shadow():
    oracle = Shadow()
    yield oracle
    oracle.close()


def listed(answer: dict) -> list[tuple[int, int]]:
    """getsubids' ranges, read here apart from our parser: 'N: USER START COUNT'."""
    if answer["rc"] != 0:
        assert answer["err"] == "Error fetching ranges\n", answer  # none, or unreadable
        return []
    ranges = []
    for line in answer["out"].splitlines():
        index, user, start, count = line.split(" ")
        ranges.append((int(start), int(count)))
    return ranges


# -- generated files ----------------------------------------------------------------------

_owner = st.sampled_from([NAME, UID, "other", "", " " + NAME, NAME + " ", "+" + NAME,
                          "#" + NAME, NAME.upper(), UID + " ", "0" + UID, "root"])
_number = st.one_of(st.integers(0, 300_000).map(str), st.integers(0, 2**33).map(str),
                    st.integers(0, 2**33).map(hex), st.integers(1, 2**20).map("0{:o}".format),
                    st.sampled_from(NUMBERS + ["0", "-0", "0x", "0X1F", "08", " 0x10",
                                               "\t5", "+5", "-5", "5 ", "5\r",
                                               "-18446744073709551615", "18446744073709551615",
                                               "0" * 30 + "7", "0x" + "f" * 17]),
                    pieces())
_tail = st.sampled_from(["", "", "", ":", ":x", ":1:2", " ", "\r", "\t# note"])
_entry = st.builds("{}:{}:{}{}".format, _owner, _number, _number, _tail)
_line = st.one_of(_entry, _entry, st.sampled_from(["", "#", f"# {NAME}:1:2", "x" * 1100,
                                                  f"{NAME}:1:{'0' * 1100}1", NAME]),
                  any_text(surrogates=False, max_size=40).map(lambda t: t.replace("\n", "")))


@st.composite
def files(draw) -> bytes:
    """A subuid file: lines, each a range of ours, someone else's or garbage, joined
    with \\n or \\r\\n, perhaps cut, perhaps with a stray byte (NUL, not UTF-8)."""
    lines = draw(st.lists(_line, max_size=8))
    newline = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    data = to_bytes(newline.join(lines) + draw(st.sampled_from([newline, ""])))
    how = draw(st.sampled_from(["as is", "as is", "cut", "byte"]))
    if how == "cut" and data:
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "byte":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + bytes([draw(st.sampled_from([0, 0xFF, 0x80, 0xC3, 10]))]) + data[at:]
    return data


def _justified(data: bytes, theirs: list[tuple[int, int]], message: str) -> bool:
    """Whether SubidError was our due: newuidmap could not have used the ranges."""
    if b"\0" in data:
        return "NUL" in message
    if any(count == 0 or start + count > 2**32 - 1 for start, count in theirs):
        return True  # shadow lists it; the kernel cannot map it
    keys = {NAME.encode(), UID.encode()}
    ours = [line for line in data.split(b"\n") if line.split(b":", 1)[0] in keys]
    return len(ours) > len(theirs)  # a line of ours that shadow cannot read


# -- properties ----------------------------------------------------------------------------

@examples(300)
@given(files(), st.booleans())
@example(f"{NAME}:0100000:65536\n".encode(), False)
@example(f"{NAME}:0x186a0:65536\n".encode(), True)
@example(f"{NAME}:100000:65536\r\n".encode(), False)
@example(f" {NAME}:100000:65536\n".encode(), False)
@example(f"{NAME}:100000:65536:\n".encode(), False)
@example(f"{NAME}:1_00000:65536\n".encode(), False)
@example(f"{NAME}:100000:65536\nx:1:1\0z\n{NAME}:200000:1\n".encode(), False)
@example(f"{NAME}:100000:65536\n\xff\n".encode("latin-1"), True)
def test_our_ranges_are_those_newuidmap_reads(shadow, content, group):
    path = shadow.write(content, group)
    answer = shadow.ask(NAME, group)
    theirs = listed(answer)
    try:
        ours = read_subid_file(path, NAME, int(UID))
    except SubidError as exc:
        message = str(exc)
        assert message.isprintable(), message
        assert _justified(content, theirs, message), (message, theirs)
    else:
        assert [tuple(r) for r in ours] == theirs
    # --subid-source=dynamic: getsubids' own output, through our reader of it
    dynamic = answer["ours"]
    assert "crash" not in dynamic, dynamic["crash"]
    if "error" in dynamic:
        assert dynamic["error"].isprintable()
        assert any(count == 0 or start + count > 2**32 - 1 for start, count in theirs)
    else:
        assert [tuple(r) for r in dynamic] == theirs


_outputs = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                    max_size=5)


@examples(300)
@given(st.one_of(_outputs.map(lambda ranges: "".join(
    f"{i}: {NAME} {start} {count}\n" for i, (start, count) in enumerate(ranges))),
    any_text(surrogates=False), st.lists(st.sampled_from(
        ["0:", NAME, "1", "٣", "+1", "-1", "1_0", " ", "\t", "\n", "\x00"]), max_size=12).map(
        "".join)))
@example(f"0: {NAME} ١٠٠٠٠٠ 65536\n")
@example(f"0: {NAME} 4294967295 10\n")
def test_getsubids_output_gives_ranges_or_one_line(text):
    try:
        ranges = parse_getsubids(text)
    except SubidError as exc:
        assert str(exc).isprintable(), str(exc)
        return
    for start, count in ranges:
        assert 0 < count and start + count <= 2**32 - 1
        assert f" {start} {count}" in text


# -- the real rootless-run, on a sample ---------------------------------------------------

def merged(intervals) -> list[tuple[int, int]]:
    """[start, end) intervals, sorted and joined where they overlap or touch."""
    out: list[list[int]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [tuple(i) for i in out]


def check_uid_map(text: str, ranges) -> None:
    """The map maps 0 to the user, then 1.. to every id of the ranges, once each (the
    kernel refuses overlapping extents: a range written twice is mapped once)."""
    lines = [list(map(int, line.split())) for line in text.splitlines()]
    assert lines[0] == [0, int(UID), 1], text
    inside = 1
    for first, outside, count in lines[1:]:
        assert first == inside, text
        inside += count
    own = (int(UID), int(UID) + 1)
    mapped = [(outside, outside + count) for _, outside, count in lines[1:]]
    assert merged(mapped + [own]) == merged([(s, s + c) for s, c in ranges] + [own]), text


@sample(10, 200)
@given(files())
@example(f"{NAME}:0x286a0:65536\n".encode())
@example(f"{NAME}:165536:65536\nother\xff:1:1\n".encode("latin-1"))
@example(f"{NAME}:165536:65536\r\n".encode())
@example(f"{NAME}:165536:65536\n{NAME}:165536:65536\n".encode())
@example(f"{NAME}:165536:65536\n{NAME}:200000:65536\n".encode())
def test_real_run_maps_what_the_property_says(user, user_tmp, content):
    """rootless-run as the test user, with `content` as its /etc/subuid and
    /etc/subgid (bind-mounted in a mount namespace of its own, where newuidmap reads
    them): the uid map of our ranges, or our one error line; never newuidmap's."""
    files = {}
    for name in ("subuid", "subgid"):
        files[name] = os.path.join(user_tmp, name)
        with open(files[name], "wb") as f:
            f.write(content)
    outer = ("unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount --bind "$1" /etc/subuid && mount --bind "$2" /etc/subgid && shift 2 && '
             'exec "$@"', "sh", files["subuid"], files["subgid"])
    while True:
        host = os.stat("/etc/subuid").st_ino, os.stat("/etc/subgid").st_ino
        r = user.run([RUN, "--net=host", "--", "cat", "/proc/self/uid_map"], outer=outer)
        if host == (os.stat("/etc/subuid").st_ino, os.stat("/etc/subgid").st_ino):
            break  # else the host's files were replaced meanwhile, our bind mounts gone
    try:
        ranges = parse_subid_file(content.decode("utf-8", "surrogateescape"), NAME, int(UID))
    except SubidError as exc:
        assert (r.returncode, r.stderr) == (1, f"rootless-run: error: {exc}\n")
        return
    assert r.returncode == 0, r.stderr
    if not ranges:
        assert "warning: no subordinate ids" in r.stderr
    else:
        assert r.stderr == ""
    check_uid_map(r.stdout, ranges)
