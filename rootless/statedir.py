"""The state directory: created 0700, locked by the running parent, stale files cleared.

The lock (flock on STATE/lock) decides liveness: after a SIGKILL the kernel drops
it, so the next start on the same dir clears what the dead run left and goes on.
"""
import errno
import fcntl
import os

from .errors import StateDirError, StateDirLocked

# The namespaces the instance created, as `KIND DEV INO` lines, written once the
# command runs (see enter.py): joiners wait for it and check child_pid against it.
NAMESPACES = "namespaces"

# Files a run writes; cleared at start (a crashed run may have left them) and at exit
# (NAMESPACES first: joiners stop joining before the rest goes).
RUN_FILES = (NAMESPACES, "child_pid", "api.sock", "resolv.conf", "hosts", "netns",
             ".ports.sock", "slirp4netns.sock", "pasta.pid")


class StateDir:
    def __init__(self, path: str, temporary: bool, lock_fd: int):
        self.path = path
        self.temporary = temporary
        self._lock_fd = lock_fd

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @classmethod
    def open(cls, path: str) -> "StateDir":
        temporary = not path
        if temporary:
            path = _make_temp_dir()
        else:
            path = os.path.abspath(path)
            _make_dir(path)
        try:
            fd = _lock(path)
        except BaseException:
            if temporary:
                os.rmdir(path)
            raise
        state = cls(path, temporary, fd)
        state.clear()
        return state

    def write(self, name: str, text: str) -> None:
        tmp = self.file(f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.file(name))

    def clear(self) -> None:
        for name in RUN_FILES:
            try:
                os.unlink(self.file(name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StateDirError(f"cannot remove stale {self.file(name)}: {exc.strerror}") from None

    def close_lock_in_child(self) -> None:
        """A forked child must not hold the lock: liveness is the parent's alone."""
        os.close(self._lock_fd)

    def close(self) -> None:
        """Remove what this run wrote (the whole dir when it was a temp one), then unlock."""
        try:
            if self.temporary:
                _remove_tree(self.path)
            else:
                self.clear()
        finally:
            os.close(self._lock_fd)


def _make_temp_dir() -> str:
    base = os.environ.get("TMPDIR") or "/tmp"
    # Not tempfile.mkdtemp: its import (shutil, random) costs more than this loop.
    while True:
        path = os.path.join(base, "rootless-" + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise StateDirError(f"cannot create a temp state dir in {base}: {exc.strerror}; "
                                f"set TMPDIR to a writable dir or pass --state-dir") from None


def _make_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StateDirError(f"cannot create state dir {path}: {exc.strerror}; pass --state-dir "
                            f"a dir you can write (e.g. under $XDG_RUNTIME_DIR)") from None
    st = os.stat(path)
    if st.st_uid != os.getuid():
        raise StateDirError(f"state dir {path} belongs to uid {st.st_uid}, not to you "
                            f"(uid {os.getuid()}): pass --state-dir a dir of your own")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateDirError(f"state dir {path} is not writable: chmod u+rwx it or pass "
                            f"another --state-dir")


def _lock(path: str) -> int:
    lock = os.path.join(path, "lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateDirError(f"cannot open {lock}: {exc.strerror}; pass --state-dir a dir "
                            f"you can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StateDirLocked(f"another instance is running on state dir {path} (it holds "
                                 f"{lock}): stop it, or pass a different --state-dir") from None
        raise StateDirError(f"cannot lock {lock}: {exc.strerror}") from None
    return fd


def lock_held(path: str) -> bool:
    """Whether a running instance holds STATE/lock, by a non-blocking flock attempt
    (taken and dropped at once when free; the lock alone decides liveness)."""
    try:
        fd = os.open(os.path.join(path, "lock"), os.O_RDONLY | os.O_CLOEXEC)
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


def _remove_tree(path: str) -> None:
    # The state dir is flat and small; shutil is not worth its import on the exit path.
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
        else:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass  # a helper winding down removed it first (slirp4netns its API socket)
    os.rmdir(path)
