"""Subordinate ids, without namespaces: the /etc/subuid parser, getsubids' output, and
the newuidmap arguments made from the ranges."""
import pytest

from rootless.errors import SubidError
from rootless.idmap import map_args
from rootless.subid import Range, parse_getsubids, parse_subid_file

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
    "rlt:100000:65536:9",  # extra field
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
