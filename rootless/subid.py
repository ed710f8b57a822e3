"""Subordinate id ranges of the invoking user: /etc/subuid + /etc/subgid, or getsubids."""
import os

from ._paths import which
from .errors import OutOfProcesses, SubidError


class Range(tuple):
    """(start, count) of a subordinate id range."""

    __slots__ = ()

    def __new__(cls, start: int, count: int):
        return super().__new__(cls, (start, count))

    start = property(lambda self: self[0])
    count = property(lambda self: self[1])


SUBUID_FILE = "/etc/subuid"
SUBGID_FILE = "/etc/subgid"


def parse_subid_file(text: str, user: str, uid: int, path: str = SUBUID_FILE) -> list[Range]:
    """Ranges of `user` (by name or numeric id) in subuid/subgid `text`, in file order,
    read as newuidmap reads them (shadow's lib/subordinateio.c): the owner exactly as
    written, numbers as C's strtoul (base 0: 0x hex, a leading 0 octal), a fourth
    field ignored.

    Lines of other users are not ours to judge (newuidmap skips what it cannot parse);
    a line of ours that newuidmap cannot read, or whose range the kernel cannot map,
    is an error, so a typo is not silently a missing range.
    """
    if "\0" in text:
        # shadow's reader runs the lines about a NUL together: it may lose any of them
        line = text[:text.index("\0")].count("\n") + 1
        raise SubidError(f"{path} line {line} has a NUL byte, which makes newuidmap "
                         f"misread the file: remove it")
    keys = {user, str(uid)}
    ranges = []
    for lineno, line, owner, found in _entries(text):
        if owner not in keys:
            continue
        where = f"{path} line {lineno} ({_shown(line)})"
        fix = f"write it as {user}:START:COUNT, e.g. {user}:100000:65536"
        if isinstance(found, str):
            raise SubidError(f"{where}: {found}; {fix}")
        ranges.append(_checked(*found, where, fix))
    return ranges


_SPACE = " \t\n\v\f\r"  # what strtoul skips (isspace in the C locale)
_LINE_MAX = 1023  # bytes: a longer line does not fit shadow's buffer, which skips it
_ULONG = 2**64
_DIGITS = {8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def _entries(text: str):
    """(line number, line, owner, (start, count)) for each line, as shadow's parser
    reads it; a line it cannot read has, instead of the numbers, why not. Lines are
    split at \n only, and kept whole: blanks and \r are part of the fields."""
    for lineno, line in enumerate(text.split("\n"), 1):
        fields = line.split(":")
        owner = fields[0]
        if len(line.encode("utf-8", "surrogateescape")) > _LINE_MAX:
            yield lineno, line, owner, f"longer than the {_LINE_MAX} bytes newuidmap reads"
        elif len(fields) < 3 or "" in fields[:3]:
            yield lineno, line, owner, "expected 3 colon-separated fields"
        else:
            start, count = _strtoul(fields[1]), _strtoul(fields[2])
            if start is None or count is None:
                yield lineno, line, owner, ("START and COUNT must be numbers (decimal, or "
                                            "0x hex; a leading 0 means octal)")
            else:
                yield lineno, line, owner, (start, count)


def _strtoul(text: str) -> int | None:
    """`text` as C's strtoul(text, &end, 0) reads it when it must end at the end (shadow's
    getulong): blanks, a sign (a negative wraps, as in C), then decimal, 0x hex or 0
    octal digits. None if it is not such a number, or beyond an unsigned long."""
    body = text.lstrip(_SPACE)
    negative = body.startswith("-")
    if body.startswith(("-", "+")):
        body = body[1:]
    if body[:2] in ("0x", "0X") and body[2:3] and body[2] in _DIGITS[16]:
        base, body = 16, body[2:]
    else:
        base = 8 if body.startswith("0") else 10
    if not body or body.strip(_DIGITS[base]):
        return None
    significant = body.lstrip("0")
    if len(significant) > 22:  # beyond 2**64 in any base (and int()'s digit limit)
        return None
    value = int(significant or "0", base)
    if value >= _ULONG:
        return None
    return -value % _ULONG if negative else value


def _checked(start: int, count: int, where: str, fix: str) -> Range:
    """The range, if the kernel can map it (32-bit ids, 4294967295 being none)."""
    if count <= 0 or start < 0 or start + count > 2**32 - 1:
        raise SubidError(f"{where}: range out of bounds; {fix}")
    return Range(start, count)


def _shown(line: str, limit: int = 80) -> str:
    """A line for a message: quoted, escaped, cut."""
    shown = repr(line[:limit])
    return shown + "..." if len(line) > limit else shown


def read_subid_file(path: str, user: str, uid: int) -> list[Range]:
    """The ranges of `user` in the file at `path` (bytes: not all lines need be UTF-8,
    nor are they to newuidmap)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SubidError(f"cannot read {path}: {exc.strerror}") from None
    return parse_subid_file(text, user, uid, path)


def parse_getsubids(text: str) -> list[Range]:
    """getsubids prints one range a line: 'N: USER START COUNT' (%lu: ASCII digits)."""
    ranges = []
    for line in text.splitlines():
        fields = line.split()
        where = f"getsubids printed {_shown(line)}"
        if len(fields) == 4 and fields[0].endswith(":") and all(
                f.isascii() and f.isdigit() and len(f) <= 20 for f in fields[2:]):
            ranges.append(_checked(int(fields[2]), int(fields[3]), where,
                                   "fix the subordinate ids of this user"))
        elif line.strip():
            raise SubidError(f"{where}, a line we cannot read")
    return ranges


def run_getsubids(user: str, group: bool) -> list[Range]:
    import subprocess

    exe = which("getsubids")
    if exe is None:
        raise SubidError("--subid-source=dynamic needs getsubids: install the uidmap package "
                         "(apt-get install uidmap) or use --subid-source=static")
    args = [exe] + (["-g"] if group else []) + [user]
    try:
        proc = subprocess.run(args, capture_output=True, text=True)
    except OSError as exc:
        raise OutOfProcesses.check(exc, exe) or SubidError(
            f"cannot run {exe}: {exc.strerror}") from None
    if proc.returncode != 0:
        # getsubids exits 1 with "Error fetching ranges" when the user has none.
        if "Error fetching ranges" in proc.stderr:
            return []
        raise SubidError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    return parse_getsubids(proc.stdout)


class Subids:
    __slots__ = ("uids", "gids", "source")

    def __init__(self, uids: list[Range], gids: list[Range], source: str):
        self.uids, self.gids, self.source = uids, gids, source


def lookup(user: str, uid: int, source: str) -> Subids:
    """The user's ranges from `source` ('static', 'dynamic' or 'auto').

    auto: getsubids when nsswitch.conf names a `subid` source other than files
    (only then can it differ from the files), else the files, read directly: the
    answer is the same and no process is spawned on the way to the command.
    """
    if source == "dynamic" or (source == "auto" and _nsswitch_has_subid_service()):
        try:
            return Subids(run_getsubids(user, False), run_getsubids(user, True), "getsubids")
        except SubidError:
            if source == "dynamic":
                raise
    return Subids(read_subid_file(SUBUID_FILE, user, uid),
                  read_subid_file(SUBGID_FILE, user, uid), "static")


def _nsswitch_has_subid_service(path: str = "/etc/nsswitch.conf") -> bool:
    try:
        with open(path) as f:
            for line in f:
                key, _, services = line.partition("#")[0].partition(":")
                if key.strip() == "subid":
                    return services.split() not in ([], ["files"])
    except OSError:
        pass
    return False


# useradd's defaults for the ranges it gives new users (login.defs(5))
_USERADD_DEFAULTS = {"MIN": 100000, "MAX": 600100000, "COUNT": 65536}
LOGIN_DEFS = "/etc/login.defs"


def _occupied(text: str) -> list[Range]:
    """Every range of every user in subuid/subgid `text`, as shadow reads them; what it
    cannot read is skipped (it is not ours to judge, and newuidmap skips it too)."""
    return [Range(*found) for _, _, _, found in _entries(text)
            if not isinstance(found, str) and found[1] > 0]


def _useradd_setting(defs: str, kind: str, name: str) -> int:
    """SUB_{kind}_{name} from login.defs text (its last line wins, as in shadow's
    parser), else useradd's default."""
    value = _USERADD_DEFAULTS[name]
    for line in defs.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == f"SUB_{kind}_{name}" and \
                fields[1].isascii() and fields[1].isdigit():
            value = int(fields[1])
    return value


def first_free_range(subuid: str, subgid: str, defs: str = "") -> Range | None:
    """The first range free in both subuid and subgid texts, within the bounds useradd
    gives new users (SUB_UID_MIN/MAX/COUNT and SUB_GID_* in login.defs): the range to
    suggest to a user without any. A range overlapping another user's would let each
    reach the other's files. None if no range fits."""
    lo = max(_useradd_setting(defs, "UID", "MIN"), _useradd_setting(defs, "GID", "MIN"))
    hi = min(_useradd_setting(defs, "UID", "MAX"), _useradd_setting(defs, "GID", "MAX"))
    count = max(_useradd_setting(defs, "UID", "COUNT"), _useradd_setting(defs, "GID", "COUNT"))
    taken = _occupied(subuid) + _occupied(subgid)
    # The first fit starts at `lo` or right after a taken range.
    for start in sorted({lo, *(r.start + r.count for r in taken)}):
        end = start + count  # exclusive
        if start < lo or end - 1 > hi or count <= 0:
            continue
        if all(end <= r.start or start >= r.start + r.count for r in taken):
            return Range(start, count)
    return None


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def add_command(user: str, uids: bool = True, gids: bool = True, fenced: bool = False) -> str:
    """What to run, as root, to give `user` the subordinate ids it lacks. `fenced`: the
    command in backticks, for a message where a sentence follows it."""
    free = first_free_range(_read(SUBUID_FILE), _read(SUBGID_FILE), _read(LOGIN_DEFS))
    ids = f"{free.start}-{free.start + free.count - 1}" if free else "FIRST-LAST"
    options = [f"--add-sub{kind}s {ids}" for kind, wanted in (("uid", uids), ("gid", gids))
               if wanted]
    command = f"usermod {' '.join(options)} {user}"
    if fenced:
        command = f"`{command}`"
    if free is None:
        return (f"as root, run {command} with a range free in {SUBUID_FILE} and "
                f"{SUBGID_FILE}")
    return f"as root, run: {command}"


def current_user() -> str:
    import pwd
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
