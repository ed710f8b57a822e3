"""Subordinate id ranges of the invoking user: /etc/subuid + /etc/subgid, or getsubids."""
import os

from ._paths import which
from .errors import SubidError


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
    """Ranges of `user` (by name or numeric id) in subuid/subgid `text`, in file order.

    Lines of other users are not ours to judge (newuidmap skips what it cannot parse);
    a malformed line of ours is an error, so a typo is not silently a missing range.
    """
    keys = {user, str(uid)}
    ranges = []
    for lineno, line, fields in _lines(text):
        if fields[0].strip() not in keys:
            continue
        where = f"{path} line {lineno} ({line!r})"
        fix = f"write it as {user}:START:COUNT, e.g. {user}:100000:65536"
        if len(fields) != 3:
            raise SubidError(f"{where}: expected 3 colon-separated fields; {fix}")
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            raise SubidError(f"{where}: START and COUNT must be numbers; {fix}") from None
        if start < 0 or count <= 0 or start + count > 2**32 - 1:
            raise SubidError(f"{where}: range out of bounds; {fix}")
        ranges.append(Range(start, count))
    return ranges


def _lines(text: str):
    """(line number, line, its fields) of the lines that are not blank or comments."""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield lineno, line, line.split(":")


def read_subid_file(path: str, user: str, uid: int) -> list[Range]:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SubidError(f"cannot read {path}: {exc.strerror}") from None
    return parse_subid_file(text, user, uid, path)


def parse_getsubids(text: str) -> list[Range]:
    """getsubids prints one range a line: 'N: USER START COUNT'."""
    ranges = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[0].endswith(":"):
            try:
                ranges.append(Range(int(fields[2]), int(fields[3])))
                continue
            except ValueError:
                pass
        if line.strip():
            raise SubidError(f"getsubids printed a line we cannot read: {line!r}")
    return ranges


def run_getsubids(user: str, group: bool) -> list[Range]:
    import subprocess

    exe = which("getsubids")
    if exe is None:
        raise SubidError("--subid-source=dynamic needs getsubids: install the uidmap package "
                         "(apt-get install uidmap) or use --subid-source=static")
    args = [exe] + (["-g"] if group else []) + [user]
    proc = subprocess.run(args, capture_output=True, text=True)
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
    """Every range of every user in subuid/subgid `text`; what cannot be read is
    skipped (it is not ours to judge, and newuidmap skips it too)."""
    ranges = []
    for _, _, fields in _lines(text):
        if len(fields) != 3:
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            ranges.append(Range(start, count))
    return ranges


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


def add_command(user: str, uids: bool = True, gids: bool = True) -> str:
    """What to run, as root, to give `user` the subordinate ids it lacks."""
    free = first_free_range(_read(SUBUID_FILE), _read(SUBGID_FILE), _read(LOGIN_DEFS))
    ids = f"{free.start}-{free.start + free.count - 1}" if free else "FIRST-LAST"
    options = [f"--add-sub{kind}s {ids}" for kind, wanted in (("uid", uids), ("gid", gids))
               if wanted]
    command = f"usermod {' '.join(options)} {user}"
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
