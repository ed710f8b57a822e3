"""The state directory: created 0700, locked by the running parent, stale files cleared.

The lock (flock on STATE/lock) decides liveness: after a SIGKILL the kernel drops
it, so the next start on the same dir clears what the dead run left and goes on.

Other users must not be able to steer what a run writes or removes, even where
fs.protected_symlinks is 0 (a symlink planted at a predictable path in /tmp would
otherwise lead our run into a dir of the planter's choosing). So the dir is reached
by a walk from / that follows only root's and the user's symlinks, through dirs only
they can change (`safewalk.py`).

The state dir itself must be the user's. One writable by others is refused (files may
have been planted in it, which a chmod would not remove); one only readable or
searchable by others (rootlesskit creates its dirs 0755) is made 0700 on its fd: no
other user can then reach anything in it, whatever they opened before, since every
lookup checks the dir's mode. Everything is then done relative to the dir's fd.

Once the walk has checked the path, no other user can change what it leads to: the
paths handed to other processes (the child, slirp4netns' --api-socket, pasta's
--pid, the sockets clients connect to) are as safe as the fd, and only the user can
reach the sockets in it.
"""
import errno
import fcntl
import os
import stat

from .. import _log
from .safewalk import PATH_FLAGS, check_changeable, describe, walk
from ..errors import StateDirError, StateDirLocked, StateDirMissing

# The namespaces the instance created, as `KIND DEV INO` lines, written once the
# command runs (record_namespaces): joiners (enter.py) wait for it and check
# child_pid against it.
NAMESPACES = "namespaces"
# The kinds it may name, in the order a joiner joins them: the user namespace first
# (joining it gives the capabilities the others ask for), the mount namespace last
# (it resets the joiner's root and cwd).
NAMESPACE_KINDS = ("user", "cgroup", "ipc", "uts", "net", "pid", "mnt")

# The unix sockets a run binds in the dir (the API's, slirp4netns' API): their paths
# must fit in sun_path.
SOCKETS = ("api.sock", "slirp4netns.sock")
_SUN_PATH = 107  # bytes of a socket's path (108 with the NUL some binders add)

# What the instance says of itself, and the run's status at its end (see instances.py).
INSTANCE = "instance"
EXIT_STATUS = "exit_status"

# Files a run writes; cleared at start (a crashed run may have left them) and at exit
# (NAMESPACES first: joiners stop joining before the rest goes).
RUN_FILES = (NAMESPACES, INSTANCE, EXIT_STATUS, "child_pid", *SOCKETS, "resolv.conf", "hosts",
             "netns", "pasta.pid", f".{NAMESPACES}.tmp", f".{INSTANCE}.tmp", ".child_pid.tmp")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_LIMIT = 4096  # bytes: what child_pid or namespaces can hold

# The temp state dirs this process has open: removed at exit, so no message should
# name a file in them (see removed_at_exit).
_temporary: set[str] = set()


def record_namespaces(pid: int) -> str | None:
    """The text of STATE/namespaces for the instance whose child is `pid`: its
    namespaces that differ from ours (those the instance created), as `KIND DEV INO`
    lines. None if the child is already gone (a command that ended at once)."""
    lines = []
    for kind in NAMESPACE_KINDS:
        try:
            theirs = os.stat(f"/proc/{pid}/ns/{kind}")
            mine = os.stat(f"/proc/self/ns/{kind}")
        except FileNotFoundError:
            if os.path.exists(f"/proc/self/ns/{kind}"):
                return None  # the child has exited: nothing to join
            continue  # a namespace kind this kernel does not have
        if (theirs.st_dev, theirs.st_ino) != (mine.st_dev, mine.st_ino):
            lines.append(f"{kind} {theirs.st_dev} {theirs.st_ino}\n")
    return "".join(lines)


def parse_namespaces(text: str) -> dict[str, tuple[int, int]]:
    """STATE/namespaces as written by record_namespaces: kind -> (dev, ino).
    ValueError if it is not such a record (a line that is not `KIND DEV INO` of a
    known kind, or no user namespace, which every instance creates)."""
    record = {}
    for line in text.splitlines():
        kind, dev, ino = line.split()
        if kind not in NAMESPACE_KINDS:
            raise ValueError(f"unknown namespace kind {kind!r}")
        record[kind] = (int(dev), int(ino))
    if "user" not in record:
        raise ValueError("no user namespace")
    return record


class StateDir:
    def __init__(self, path: str, temporary: bool, lock_fd: int, dir_fd: int = -1,
                 parent_fd: int = -1, name: str = ""):
        self.path = path  # the real path: no symlink, every dir on the way checked
        self.temporary = temporary
        self._lock_fd = lock_fd
        self._fd = dir_fd  # the dir itself, opened O_NOFOLLOW|O_DIRECTORY
        self._parent_fd = parent_fd  # O_PATH of the dir that holds it, and its name there
        self._name = name
        self._userns_fd = -1  # see hold_userns

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @classmethod
    def open(cls, path: str) -> "StateDir":
        temporary = not path
        if temporary:
            parent_fd, name, real = _make_temp_dir()
        else:
            parent_fd, name, real = _open_parent(path)
        try:
            dir_fd = _open_own_dir(parent_fd, name, real)
        except BaseException:
            if temporary:
                os.rmdir(name, dir_fd=parent_fd)
            os.close(parent_fd)
            raise
        try:
            lock_fd = _lock(dir_fd, real)
        except BaseException:
            os.close(dir_fd)
            if temporary:
                os.rmdir(name, dir_fd=parent_fd)
            os.close(parent_fd)
            raise
        state = cls(real, temporary, lock_fd, dir_fd, parent_fd, name)
        if temporary:
            _temporary.add(real)
        state.clear()
        return state

    def write(self, name: str, text: str | bytes, mode: int = 0o600) -> None:
        """STATE/name holds `text`, whole or not at all (a reader never sees half of it);
        a failure (a full disk) is one StateDirError and leaves no temp file."""
        tmp = f".{name}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                         os.O_CLOEXEC, mode, dir_fd=self._fd)
            try:
                os.fchmod(fd, mode)  # whatever the umask
                write_all(fd, text if isinstance(text, bytes) else text.encode())
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError as exc:
            self._unlink(tmp)
            raise StateDirError(f"cannot write {self.file(name)}: "
                                f"{write_failure(exc)}") from None

    def create(self, name: str) -> int:
        """A new empty STATE/name (0600), open for writing: its fd. StateDirError if not."""
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600, dir_fd=self._fd)
        except OSError as exc:
            raise StateDirError(f"cannot create {self.file(name)}: "
                                f"{write_failure(exc)}") from None
        os.fchmod(fd, 0o600)  # whatever the umask
        return fd

    def removed(self) -> bool:
        """Whether the dir was removed under us (logind at logout, tmpfiles, the
        command)."""
        try:
            return os.fstat(self._fd).st_nlink == 0
        except OSError:
            return False

    def raise_if_removed(self) -> None:
        """A step of the set-up failed: if the dir was removed under us, that is the
        cause to report, not the path that failed."""
        if self.removed():
            raise StateDirError(f"state dir {self.path} was removed while the run was "
                                f"starting: start it again")

    def clear(self) -> None:
        for name in RUN_FILES:
            try:
                os.unlink(name, dir_fd=self._fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StateDirError(f"cannot remove stale {self.file(name)}: {exc.strerror}"
                                    ) from None

    def hold_userns(self, pid: int) -> None:
        """Keep the user namespace of process `pid` (the child, while it lives): a temp
        dir's removal may need it, for what the command left owned by subordinate
        ids (see _remove_inside). Only for a temp dir: a --state-dir is the user's
        own, and only the run's files are removed from it."""
        if self.temporary and self._userns_fd < 0:
            try:
                self._userns_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                _log.debug(f"cannot hold the child's user namespace: {exc.strerror}")

    def close_lock_in_child(self) -> None:
        """A forked child must not hold the lock: liveness is the parent's alone. Nor
        our other fds: the child reaches the dir by its (checked) path."""
        for fd in (self._lock_fd, self._fd, self._parent_fd, self._userns_fd):
            if fd >= 0:
                os.close(fd)

    def close(self) -> None:
        """Remove what this run wrote (the whole dir when it was a temp one), then unlock.
        Never raises: a failure here is one line, and the command's status stands."""
        try:
            if self.temporary:
                self._remove()
            else:
                self.clear()
        except Exception as exc:  # noqa: BLE001 - reported: the run is over either way
            what = "the temp state dir" if self.temporary else "the run's files from"
            why = exc if isinstance(exc, StateDirError) else describe(exc)
            _log.warning(f"cannot remove {what} {self.path}: {why}")
        finally:
            _temporary.discard(self.path)
            for fd in (self._userns_fd, self._lock_fd, self._fd, self._parent_fd):
                if fd >= 0:
                    os.close(fd)
            self._userns_fd = self._lock_fd = self._fd = self._parent_fd = -1

    def _unlink(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self._fd)
        except OSError:
            pass

    def _remove(self) -> None:
        """The temp dir and everything in it. The command may have removed it already,
        or left entries owned by subordinate ids, which only root in its user
        namespace can remove."""
        try:
            _remove_entries(self._fd)
        except PermissionError:
            if not self._remove_inside():
                raise
            _remove_entries(self._fd)
        try:
            st = os.stat(self._name, dir_fd=self._parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # the command removed it
        mine = os.fstat(self._fd)
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            os.rmdir(self._name, dir_fd=self._parent_fd)
        # else the command removed ours and made another in its place: its own business

    def _remove_inside(self) -> bool:
        """Remove the dir's entries from inside the run's user namespace (held since
        the child started), where we are root over the subordinate ids, in a forked
        process (setns needs one thread). Whether it succeeded."""
        if self._userns_fd < 0:
            return False
        from ..linux import CLONE_NEWUSER, setns

        try:
            pid = os.fork()
        except OSError:  # the user's limit of processes: the caller's error stands
            return False
        if pid == 0:
            code = 1
            try:
                setns(self._userns_fd, CLONE_NEWUSER)
                _remove_entries(self._fd)
                code = 0
            finally:
                os._exit(code)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# -- finding and opening the dir ------------------------------------------------------------

def _shown(path: str) -> str:
    """A path for a message: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _check_text(path: str, what: str, fix: str) -> None:
    """Paths reach the API's JSON (stateDir) and the command's environment as text:
    one that is not UTF-8 is refused, naming the fix."""
    try:
        path.encode()
    except UnicodeEncodeError:
        raise StateDirError(f"{what} is not valid UTF-8: {fix}") from None


def _check_socket_room(path: str, what: str, fix: str, below: str = "") -> None:
    """A unix socket's path holds 107 bytes: the state dir (`path`, or `path` + `below`)
    must leave room for the longest socket name."""
    longest = max(SOCKETS, key=len)
    room = _SUN_PATH - len(longest) - 1 - len(below)
    size = len(os.fsencode(path))
    if size > room:
        raise StateDirError(f"{what} is too long for the unix sockets in "
                            f"{'the state dir' if below else 'it'} "
                            f"({size} bytes; at most {room} bytes leave room for "
                            f"{below}/{longest} in a socket path's {_SUN_PATH}): {fix}")


def _open_parent(path: str) -> tuple[int, str, str]:
    """_walk to the --state-dir `path` (made if missing), whose real path must be text
    and short enough for the sockets in it."""
    fix = "pass a --state-dir whose path is UTF-8 text"
    _check_text(path, f"--state-dir {_shown(path)}", fix)

    def check(real: str) -> None:
        _check_text(real, f"state dir {_shown(real)}", fix)
        _check_socket_room(real, f"state dir {real}", "pass a shorter --state-dir")

    return walk(os.path.abspath(path), create=True, check=check)


def _make_temp_dir() -> tuple[int, str, str]:
    base = os.environ.get("TMPDIR") or "/tmp"
    fix = "set TMPDIR to a dir whose path is UTF-8 text, or pass --state-dir"
    _check_text(base, f"TMPDIR={_shown(base)}", fix)
    what = f"the temp state dir in TMPDIR={base}"
    try:
        parent_fd, name, real = walk(os.path.abspath(base), create=False, what=what)
    except StateDirMissing:
        raise StateDirError(f"TMPDIR={base} does not exist: set TMPDIR to an existing dir, or "
                            f"pass --state-dir") from None
    try:
        fd = os.open(name, PATH_FLAGS, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    try:
        _check_text(real, f"TMPDIR={_shown(real)}", fix)
        check_changeable(os.fstat(fd), real, what)
        _check_socket_room(real, f"TMPDIR={real}", "set TMPDIR to a shorter dir, or pass "
                           "a short --state-dir", below="/rootless-" + "0" * 12)
        # Not tempfile.mkdtemp: its import (shutil, random) costs more than this loop.
        while True:
            name = "rootless-" + os.urandom(6).hex()
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
                return fd, name, os.path.join(real, name)
            except FileExistsError:
                continue
            except OSError as exc:
                raise StateDirError(f"cannot create a temp state dir in {real}: "
                                    f"{exc.strerror}; set TMPDIR to a writable dir or pass "
                                    f"--state-dir") from None
    except BaseException:
        os.close(fd)
        raise


def _open_own_dir(parent_fd: int, name: str, real: str) -> int:
    """The state dir's fd, once it is known to be the user's and closed to others."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise StateDirError(f"cannot open state dir {real}: {describe(exc)}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise StateDirError(f"state dir {real} belongs to uid {st.st_uid}, not to you "
                                f"(uid {os.geteuid()}): pass --state-dir a dir of your own")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o022:
            raise StateDirError(f"state dir {real} is writable by other users (mode "
                                f"{mode:04o}): they could have put files in it; pass "
                                f"--state-dir a new dir (it is made 0700), or chmod 700 "
                                f"this one and remove what you did not put there")
        if mode != 0o700:
            os.fchmod(fd, 0o700)
            if mode & 0o077:
                _log.warning(f"state dir {real} was open to other users (mode {mode:04o}): "
                             f"made it 0700")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_existing(path: str) -> tuple[int, str]:
    """For joiners (`rootless-ctl enter`, `--reuse`): the fd and real path of the
    user's existing state dir at `path`, reached as StateDir.open does. Raises
    StateDirMissing, or StateDirError naming what is wrong."""
    fd, real, st = open_dir(os.path.abspath(path), create=False, label="state dir ")
    if st.st_uid != os.geteuid():
        os.close(fd)
        raise StateDirError(f"state dir {real} belongs to uid {st.st_uid}, not to you (uid "
                            f"{os.geteuid()}): you can use only your own instances")
    return fd, real


def open_dir(path: str, *, create: bool, what: str = "", label: str = ""
             ) -> tuple[int, str, os.stat_result]:
    """The dir at absolute `path`, reached without following a symlink an attacker
    could swap in (safewalk.walk, `create` and `what` as there): its fd, real path and
    stat, for the caller's check of whose it is. StateDirError (`label` + real path)
    if it cannot be opened."""
    parent_fd, name, real = walk(path, create=create, what=what)
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise StateDirError(f"cannot open {label}{real}: {describe(exc)}") from None
    finally:
        os.close(parent_fd)
    return fd, real, os.fstat(fd)


def read_small(dir_fd: int, name: str) -> str | None:
    """The text of a small file of the dir (child_pid, namespaces), None if missing.
    ValueError when it is no regular file, too long or not ASCII; OSError as it comes."""
    data = read_bytes(dir_fd, name, _READ_LIMIT)
    return None if data is None else data.decode("ascii")  # UnicodeDecodeError: ValueError


def read_bytes(dir_fd: int, name: str, limit: int) -> bytes | None:
    """What the file `name` of the dir holds, None if missing. ValueError when it is no
    regular file or longer than `limit`; OSError as it comes."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{name} is not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{name} is longer than {limit} bytes")
    return data


def _lock(dir_fd: int, real: str) -> int:
    lock = os.path.join(real, "lock")
    try:
        fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError as exc:
        raise StateDirError(f"cannot open {lock}: {exc.strerror}; pass --state-dir a dir "
                            f"you can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateDirLocked(f"another instance is running on state dir {real} (it holds "
                                 f"{lock}): stop it, or pass a different --state-dir") from None
        raise StateDirError(f"cannot lock {lock}: {exc.strerror}") from None
    return fd


def lock_held(path: str, dir_fd: int | None = None) -> bool:
    """Whether a running instance holds STATE/lock, by a non-blocking flock attempt
    (taken and dropped at once when free; the lock alone decides liveness). With
    `dir_fd` (the state dir's), `lock` is opened in it."""
    lock = "lock" if dir_fd is not None else os.path.join(path, "lock")
    try:
        # O_NONBLOCK: a FIFO in its place must not hang us
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # drops our lock, if we got it
    return False


# -- writing and removing -------------------------------------------------------------------

def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_failure(exc: OSError) -> str:
    """Why a write into the state dir failed, with the fix for a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"{exc.strerror}: free space on its file system, or pass --state-dir a dir "
                f"on another one")
    return describe(exc)


def _remove_entries(dir_fd: int) -> None:
    """Empty the dir `dir_fd`, through fds (no path is followed). The state dir is flat
    and small; shutil is not worth its import on the exit path."""
    try:
        entries = [(entry.name, entry.is_dir(follow_symlinks=False))
                   for entry in os.scandir(dir_fd)]
    except FileNotFoundError:
        return  # the dir itself was removed (by the command)
    for name, is_dir in entries:
        try:
            if is_dir:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    _remove_entries(sub)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass  # a helper winding down removed it first (slirp4netns its API socket)


def removed_at_exit(path: str) -> bool:
    """Whether `path` lies in a temp state dir of this run: a message read after the run
    should not name it."""
    return any(path == d or path.startswith(d + "/") for d in _temporary)
