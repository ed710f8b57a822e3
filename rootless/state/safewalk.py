"""Finding a dir by its path without letting other users steer the walk (the state
dir's, see statedir): names are looked up one at a time, each relative to the dir
before it, with O_NOFOLLOW;
- a symlink on the way is followed only when root or the user owns it (the rule
  fs.protected_symlinks applies in sticky dirs, here applied everywhere);
- names are looked up only in dirs that nobody but root and the user can change:
  owned by one of them, and not writable by group or others unless sticky (in a
  sticky dir such as /tmp others may add entries, but not rename or remove ours, and
  what they add is refused by the owner checks).
"""
import os
import stat

from ..errors import StateDirError, StateDirMissing

PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40  # as the kernel's path walk


def walk(path: str, create: bool, what: str = "", check=None) -> tuple[int, str, str]:
    """Find the dir at absolute `path` as the module's docstring says: returns an O_PATH
    fd of the dir that holds it, its name there and its real path. With `create`,
    missing dirs are made (0700); without, StateDirMissing. `check(real path)` may
    refuse the result: it is called before any dir is made, and at the end."""
    what = what or f"state dir {path}"
    pending = [part for part in reversed(path.split("/")) if part]
    stack = [(os.open("/", PATH_FLAGS), "")]  # (fd, name) of each dir from / down
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            fd = stack[-1][0]
            st = _lookup(fd, name, what, _real(stack))
            if st is None:
                if not create:
                    raise StateDirMissing(f"{what} does not exist "
                                          f"({_in(_real(stack), name)} is missing)")
                if check:  # what will be made from here on: nothing yet if refused
                    check(os.path.normpath(_in(_real(stack), "/".join([name, *pending[::-1]]))))
                st = _make(fd, name, what, _real(stack))
            if stat.S_ISLNK(st.st_mode):
                links += 1
                where = "" if not pending else f" (on the way to {what})"
                target = _follow(fd, name, st, links, _in(_real(stack), name) + where)
                if target.startswith("/"):
                    for old, _ in stack[1:]:
                        os.close(old)
                    del stack[1:]
                pending += [part for part in reversed(target.split("/")) if part]
            elif stat.S_ISDIR(st.st_mode):
                stack.append((os.open(name, PATH_FLAGS, dir_fd=fd), name))
            else:
                raise StateDirError(f"{what} is not a directory ({_in(_real(stack), name)} "
                                    f"is not): pass --state-dir a directory")
        if len(stack) < 2:
            raise StateDirError(f"{what} is /: pass --state-dir a dir of your own")
        real = _real(stack)
        if check:
            check(real)
        os.close(stack.pop()[0])
        parent_fd, name = stack.pop()[0], os.path.basename(real)
        return parent_fd, name, real
    except OSError as exc:  # what _lookup does not expect: one line all the same
        raise StateDirError(f"cannot reach {what}: {describe(exc)}") from None
    finally:
        for fd, _ in stack:
            os.close(fd)


def _real(stack: list[tuple[int, str]]) -> str:
    return "/" + "/".join(name for _, name in stack[1:])


def _in(where: str, name: str) -> str:
    return where.rstrip("/") + "/" + name


def _lookup(fd: int, name: str, what: str, where: str) -> os.stat_result | None:
    """lstat of `name` in the dir `fd` (at `where`), None if missing, once that dir is
    known to be one only root and the user can change."""
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    except PermissionError:
        raise StateDirError(f"cannot reach {what} (permission denied in {where}): it is "
                            f"another user's, or a dir on its way is closed to you") from None
    check_changeable(os.fstat(fd), where, what)
    return st


def _make(fd: int, name: str, what: str, where: str) -> os.stat_result:
    try:
        os.mkdir(name, 0o700, dir_fd=fd)
    except FileExistsError:
        pass  # made meanwhile: checked as anything found
    except OSError as exc:
        raise StateDirError(f"cannot create {what}: {exc.strerror} (at {_in(where, name)}); "
                            f"pass --state-dir a dir you can write (e.g. under "
                            f"$XDG_RUNTIME_DIR)") from None
    return os.stat(name, dir_fd=fd, follow_symlinks=False)


def check_changeable(st: os.stat_result, where: str, what: str) -> None:
    """The dir at `where` must be one nobody but root and the user can change."""
    fix = ("pass --state-dir a dir of your own, below dirs only you or root can change "
           "(e.g. under $XDG_RUNTIME_DIR)")
    if not _trusted(st.st_uid):
        raise StateDirError(f"{where} (on the way to {what}) belongs to uid {st.st_uid}, "
                            f"neither you nor root: its owner could swap what lies below "
                            f"it; {fix}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise StateDirError(f"{where} (on the way to {what}) is writable by other users "
                            f"(mode {mode:04o}, not sticky): they could swap what lies "
                            f"below it; {fix}")


def _follow(fd: int, name: str, st: os.stat_result, links: int, link: str) -> str:
    """The target of the symlink `name` (described as `link`), if we may follow it.
    One of an id unmapped here (see _trusted) not in a sticky world-writable dir, where
    anyone outside could have planted it (the kernel's protected_symlinks rule)."""
    mode = os.fstat(fd).st_mode
    planted_maybe = mode & stat.S_ISVTX and mode & 0o002 and st.st_uid == _unmapped_uid()
    if not _trusted(st.st_uid) or planted_maybe:
        raise StateDirError(f"{link} is a symlink of uid {st.st_uid}, another user's: not "
                            f"followed (anyone may plant one where others can write); pass "
                            f"--state-dir a dir of your own")
    if links > _MAX_LINKS:
        raise StateDirError(f"{link}: too many levels of symbolic links")
    return os.readlink(name, dir_fd=fd)


def _trusted(uid: int) -> bool:
    """Root, the user, or, when we run in a user namespace (rootless-run inside an
    instance), an id not mapped in it: the kernel shows the owner of such files as the
    overflow id (nobody), whoever it is; root's dirs (/, /tmp) look so. A weaker
    guarantee there: a dir of another user outside the namespace looks the same."""
    return uid in (0, os.geteuid()) or uid == _unmapped_uid()


_overflow: list[int] = []


def _unmapped_uid() -> int:
    """The id unmapped owners show as, in a user namespace other than the first; -1 in
    the first (there it is a real user's, nobody's)."""
    if not _overflow:
        _overflow.append(_overflow_id())
    return _overflow[0]


def _overflow_id(uid_map: str = "/proc/self/uid_map",
                 overflowuid: str = "/proc/sys/kernel/overflowuid") -> int:
    try:
        with open(uid_map) as f:
            initial = f.read().split() == ["0", "0", "4294967295"]
        if not initial:
            with open(overflowuid) as f:
                return int(f.read())
    except (OSError, ValueError):
        pass
    return -1


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"
