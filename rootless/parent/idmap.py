"""Write the child's uid/gid maps: newuidmap/newgidmap with the user's subordinate
ranges, or, for a user without any, a single-id map written directly."""
import os

from .. import _log
from .._paths import which
from .._process import PYTHON_IGNORED_SIGNALS
from ..errors import IdmapError, OutOfProcesses
from ..subid import Range, Subids, add_command


def map_args(host_id: int, ranges: list[Range]) -> list[str]:
    """0 -> the user's own id, then 1.. -> the subordinate ranges in order, each id
    once: the kernel refuses a map whose extents overlap (a line written twice in
    /etc/subuid, ranges that overlap, a range holding the user's own id)."""
    args = ["0", str(host_id), "1"]
    inside = 1
    taken = [(host_id, host_id + 1)]
    for r in ranges:
        for start, end in _untaken(r.start, r.start + r.count, taken):
            args += [str(inside), str(start), str(end - start)]
            inside += end - start
            taken.append((start, end))
    return args


def _untaken(start: int, end: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) outside every [first, last) of `taken`."""
    parts = [(start, end)]
    for first, last in taken:
        parts = [piece for s, e in parts for piece in ((s, min(e, first)), (max(s, last), e))
                 if piece[0] < piece[1]]
    return parts


def _spawn(helper: str, pid: int, args: list[str]) -> tuple[int, int]:
    """Start a setuid map helper with stderr on a pipe; returns (pid, read fd)."""
    exe = which(helper)
    if exe is None:
        raise IdmapError(f"{helper} not found in PATH: install the uidmap package "
                         f"(as root: apt-get install uidmap)")
    rfd, wfd = os.pipe()
    try:
        child = os.posix_spawn(exe, [helper, str(pid), *args], os.environ,
                               setsigdef=PYTHON_IGNORED_SIGNALS,
                               file_actions=[(os.POSIX_SPAWN_DUP2, wfd, 2)])
    except OSError as exc:
        os.close(rfd)
        raise OutOfProcesses.check(exc, exe) or IdmapError(
            f"cannot run {exe}: {exc.strerror}") from None
    finally:
        os.close(wfd)
    return child, rfd


def _finish(helper: str, child: int, rfd: int) -> None:
    chunks = []
    while chunk := os.read(rfd, 4096):
        chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        text = b"".join(chunks).decode(errors="replace").strip().replace("\n", "; ")
        hint = ""
        if not os.stat(which(helper)).st_mode & 0o4000 and "Operation not permitted" in text:
            hint = f"; {helper} must be setuid root (as root: chmod u+s $(command -v {helper}))"
        raise IdmapError(f"{helper} failed (exit {code}): {text or 'no message'}{hint}")


def write_subid_maps(pid: int, uid: int, gid: int, subids: Subids) -> None:
    """Run newuidmap and newgidmap side by side: each is a setuid exec of its own."""
    uidmap = _spawn("newuidmap", pid, map_args(uid, subids.uids))
    try:
        gidmap = _spawn("newgidmap", pid, map_args(gid, subids.gids))
    except BaseException:
        _finish("newuidmap", *uidmap)
        raise
    errors = []
    for helper, started in (("newuidmap", uidmap), ("newgidmap", gidmap)):
        try:
            _finish(helper, *started)
        except IdmapError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def write_single_maps(pid: int, uid: int, gid: int) -> None:
    """Map only the user's own ids: allowed to the namespace's owner without any helper,
    once setgroups is denied (otherwise dropping groups could bypass negative ACLs)."""
    try:
        for name, text in (("uid_map", f"0 {uid} 1\n"), ("setgroups", "deny\n"),
                           ("gid_map", f"0 {gid} 1\n")):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(text)
    except OSError as exc:
        raise IdmapError(f"cannot write /proc/{pid}/{name}: {exc.strerror}") from None


def write_maps(pid: int, uid: int, gid: int, subids: Subids, user: str) -> None:
    if subids.uids and subids.gids:
        _log.debug(f"newuidmap {pid} {' '.join(map_args(uid, subids.uids))}")
        write_subid_maps(pid, uid, gid, subids)
        return
    missing = " and ".join(f for f, r in (("/etc/subuid", subids.uids), ("/etc/subgid", subids.gids))
                           if not r)
    _log.warning(f"no subordinate ids for {user} in {missing}: only root (0) is mapped inside, "
                 f"as your uid {uid}; tools that switch users will fail; to add ranges, "
                 + add_command(user, uids=not subids.uids, gids=not subids.gids))
    write_single_maps(pid, uid, gid)
