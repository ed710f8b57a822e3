"""Subordinate ids: the /etc/subuid parser, getsubids' output, the newuidmap arguments
made from the ranges (without namespaces), and the range suggested to a user without
any (also through a real run)."""
import re

import pytest

from rootless.errors import SubidError
from rootless.parent.idmap import map_args
from rootless.subid import Range, first_free_range, parse_getsubids, parse_subid_file

FILE = """\
# subordinate ids
alice:100000:65536

bob:165536:65536
rlt:231072:65536
  # indented comment
1001:400000:1000
rlt:500000:10
"""


def test_parse_several_lines_name_and_uid_keys_in_order():
    assert parse_subid_file(FILE, "rlt", 1001) == [(231072, 65536), (400000, 1000), (500000, 10)]


def test_parse_other_users():
    assert parse_subid_file(FILE, "alice", 1000) == [(100000, 65536)]
    assert parse_subid_file(FILE, "nobody-here", 4242) == []


def test_parse_ignores_garbage_of_other_users():
    text = "bob:abc\nbob:1:2:3:4\n::\ngarbage\nrlt:100000:65536\ncarol:-5:x\n"
    assert parse_subid_file(text, "rlt", 1001) == [(100000, 65536)]


def test_parse_comments_and_blank_lines_only():
    assert parse_subid_file("# rlt:1:2\n\n   \n", "rlt", 1001) == []


def test_range_fields():
    r = parse_subid_file("rlt:100000:65536\n", "rlt", 1001)[0]
    assert isinstance(r, Range) and (r.start, r.count) == (100000, 65536)


@pytest.mark.parametrize("line", [
    "rlt:100000:abc",      # not a number
    "rlt:100000",          # missing field
    "rlt:100000:065536x",  # not a number as newuidmap reads one (octal)
    "1001:x:1",            # keyed by uid: still ours
    "rlt:100000:0",        # empty range
    "rlt:4294967295:10",   # beyond 32-bit ids
])
def test_parse_malformed_own_line_names_file_and_line(line):
    text = f"# header\nbob:1:2\n{line}\n"
    with pytest.raises(SubidError) as info:
        parse_subid_file(text, "rlt", 1001, "/etc/subgid")
    message = str(info.value)
    assert "/etc/subgid" in message and "line 3" in message and line in message
    assert "\n" not in message


def test_parse_getsubids_output():
    out = "0: rlt 100000 65536\n1: rlt 300000 1000\n"
    assert parse_getsubids(out) == [(100000, 65536), (300000, 1000)]
    assert parse_getsubids("") == []


def test_parse_getsubids_unreadable_line():
    with pytest.raises(SubidError, match="cannot read"):
        parse_getsubids("0: rlt 100000 lots\n")


def test_map_args_single_range():
    assert map_args(1001, [Range(100000, 65536)]) == ["0", "1001", "1", "1", "100000", "65536"]


def test_map_args_several_ranges_are_contiguous_inside():
    args = map_args(1001, [Range(100000, 65536), Range(300000, 1000), Range(500000, 10)])
    assert args == ["0", "1001", "1",
                    "1", "100000", "65536",
                    "65537", "300000", "1000",
                    "66537", "500000", "10"]


def test_map_args_no_ranges():
    assert map_args(1002, []) == ["0", "1002", "1"]


# -- the range suggested to a user without subordinate ids (issue 16 item 23) ----------

def test_first_free_range_skips_every_users_lines():
    subuid = "alice:100000:65536\nbob:165536:1000\n"
    subgid = "carol:166536:65536\n"  # only in subgid: the range must be free in both
    assert first_free_range(subuid, subgid) == (232072, 65536)


def test_first_free_range_fits_a_gap():
    text = "a:100000:65536\nb:300000:65536\n"
    assert first_free_range(text, text) == (165536, 65536)  # up to 231071 < 300000
    assert first_free_range("a:100000:65536\nb:200000:65536\n", "") == (265536, 65536)


def test_first_free_range_with_malformed_lines_of_other_users():
    text = ("# a:100000:65536\nbob:abc\nbob:1:2:3:4\n::\ngarbage\ncarol:-5:x\n"
            "dave:100000:0\neve:" + "9" * 5000 + ":1\nfrank:100010:10\n")
    # shadow has no comments: "# a:100000:65536" is a range of user "# a", taken to it
    assert first_free_range(text, text) == (165536, 65536)
    assert first_free_range(text.replace("# a:", "#"), text.replace("# a:", "#")) == \
        (100020, 65536)


def test_first_free_range_follows_login_defs():
    defs = ("# comment\nSUB_UID_MIN\t200000\nSUB_UID_COUNT 1000\nSUB_GID_MIN 150000\n"
            "SUB_GID_COUNT 2000\nSUB_GID_MAX bogus\n")
    assert first_free_range("", "", defs) == (200000, 2000)
    assert first_free_range("a:200000:1500\n", "", defs) == (201500, 2000)
    # nothing fits below SUB_UID_MAX: no range to suggest
    assert first_free_range("a:100000:600000000\n", "") is None
    assert first_free_range("", "", "SUB_UID_MAX 150000\n") is None


def _ranges_in(path: str) -> list[tuple[int, int]]:
    out = []
    with open(path) as f:
        for line in f:
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                out.append((int(fields[1]), int(fields[2])))
    return out


def _assert_free(first: int, last: int) -> None:
    assert last - first + 1 == 65536  # SUB_UID_COUNT, here as useradd's default
    assert first >= 100000 and last <= 600100000
    for path in ("/etc/subuid", "/etc/subgid"):
        for start, count in _ranges_in(path):
            assert last < start or first >= start + count, \
                f"{first}-{last} overlaps {start}:{count} in {path}"


def test_single_id_warning_suggests_a_free_range(nosub_user, rootless_run):
    """It suggested 100000-165535 to everyone, a range another user already had."""
    r = nosub_user.run([rootless_run, "--net=host", "--", "true"])
    assert r.returncode == 0, r.stderr
    [line] = [x for x in r.stderr.splitlines() if "warning" in x]
    assert "sudo" not in line, line
    found = re.search(r"as root, run: usermod --add-subuids (\d+)-(\d+) "
                      r"--add-subgids (\d+)-(\d+) (\S+)$", line)
    assert found, line
    assert found[5] == nosub_user.name
    assert found.group(1, 2) == found.group(3, 4)
    _assert_free(int(found[1]), int(found[2]))
