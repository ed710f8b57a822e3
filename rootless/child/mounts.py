"""Mount set-up inside the child's mount namespace (sync; runs before the command)."""
import os

from ..errors import ChildSetupError
from ..state.statedir import write_all, write_failure
from ..linux import (MNT_DETACH, MS_BIND, MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE,
                    MS_REC, MS_SHARED, MS_SLAVE, mount, umount)

# --propagation: the values rootlesskit's child accepts; without "r", / alone.
_PROPAGATION = {"private": MS_PRIVATE, "rprivate": MS_REC | MS_PRIVATE,
                "shared": MS_SHARED, "rshared": MS_REC | MS_SHARED,
                "slave": MS_SLAVE, "rslave": MS_REC | MS_SLAVE}


def set_up(propagation: str, sysfs: bool, copy_ups: tuple[str, ...], state_dir: str) -> None:
    """The child's mount namespace before the command: the propagation of /, a fresh
    sysfs (`sysfs`: the child has a netns of its own), the copy-ups.

    Shared propagation comes last: sysfs and the copy-ups move mounts (MS_MOVE), which
    the kernel refuses under a shared parent (EINVAL). Until then every mount here is
    a slave or private, as the kernel made them for a mount namespace owned by a new
    user namespace (mount_namespaces(7)), so nothing we mount propagates anywhere."""
    shared = propagation in ("shared", "rshared")
    if not shared:
        _set_propagation(propagation)
    if sysfs:
        mount_sysfs(state_dir)
    for directory in copy_ups:
        copy_up(directory, state_dir)
    if shared:
        _set_propagation(propagation)


def _set_propagation(mode: str) -> None:
    try:
        mount(None, "/", None, _PROPAGATION[mode])
    except OSError as exc:
        raise ChildSetupError(f"cannot make / {mode} in the child: {exc.strerror}") from None


def _scratch_dir(state_dir: str, tag: str) -> str:
    path = os.path.join(state_dir, f".{tag}-{os.urandom(4).hex()}")
    os.mkdir(path, 0o700)
    return path


def mount_sysfs(state_dir: str) -> None:
    """A fresh sysfs on /sys, so /sys/class/net shows the new netns' interfaces.

    The cgroup tree below /sys/fs/cgroup is moved over, as rootlesskit does, or
    tools looking for cgroups would find an empty directory.
    """
    cgroup = "/sys/fs/cgroup"
    keep = os.path.ismount(cgroup)
    saved = None
    try:
        if keep:
            saved = _scratch_dir(state_dir, "cgroup")
            mount(cgroup, saved, None, MS_BIND | MS_REC)
        # nosuid/nodev/noexec: a new sysfs may not be less restricted than the visible one.
        mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        if saved:
            mount(saved, cgroup, None, MS_MOVE)
    except OSError as exc:
        raise ChildSetupError(f"cannot mount a fresh sysfs on /sys in the child: {exc.strerror}"
                              ) from None
    finally:
        if saved:
            if os.path.ismount(saved):
                umount(saved, MNT_DETACH)
            os.rmdir(saved)


def mount_proc() -> None:
    """A fresh /proc for the new pid namespace (called by its pid 1)."""
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError as exc:
        raise ChildSetupError(
            f"cannot mount a fresh /proc for --pidns: {exc.strerror} (the kernel refuses when "
            f"the host's /proc has parts hidden by other mounts, as in some containers)") from None


def copy_up(directory: str, state_dir: str) -> None:
    """tmpfs+symlink: DIR becomes a writable tmpfs in which each entry of the original
    DIR is found again, the original DIR kept (bind-mounted) at DIR/.ro<random> (the
    hidden copy), as rootlesskit does; but relative symlinks keep resolving, at any
    depth, exactly as outside (see _mirror_entries).

    The state dir may lie inside DIR (--state-dir=$XDG_RUNTIME_DIR/... with /run copied
    up): once the tmpfs covers DIR its path leads nowhere, so the scratch mount and
    the state dir are held by fds from the start."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ChildSetupError(f"--copy-up={directory}: {exc.strerror}") from None
    if not os.path.isdir(directory):
        raise ChildSetupError(f"--copy-up={directory}: not a directory")
    saved = _scratch_dir(state_dir, "copyup")
    state_fd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    saved_fd = None
    moved = False
    try:
        mount(directory, saved, None, MS_BIND | MS_REC)
        saved_fd = os.open(saved, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        mount("tmpfs", directory, "tmpfs", 0, f"mode={st.st_mode & 0o7777:o}")
        hidden = ".ro" + os.urandom(5).hex()
        target = os.path.join(directory, hidden)
        os.mkdir(target, 0o755)
        mount(f"/proc/self/fd/{saved_fd}", target, None, MS_MOVE)
        moved = True
        _mirror_entries(directory, hidden)
    except OSError as exc:
        raise ChildSetupError(f"--copy-up={directory} failed: {exc.strerror}") from None
    finally:
        if saved_fd is not None:
            if not moved:
                umount(f"/proc/self/fd/{saved_fd}", MNT_DETACH)
            os.close(saved_fd)
        os.rmdir(os.path.basename(saved), dir_fd=state_fd)
        os.close(state_fd)


_NAME_MAX = 255


def _mirror_entries(directory: str, hidden: str) -> None:
    """Make each entry NAME of the hidden copy DIR/HIDDEN an entry of the tmpfs on DIR,
    so that every path through DIR, relative symlinks included, leads where it does
    outside:

    - a symlink is made again with the same target text. A relative one resolves from
      DIR, as outside (/etc/mtab -> ../proc/self/mounts); a link into the hidden copy
      would resolve from DIR/HIDDEN, one level too deep (/etc/proc/self/mounts).
    - a directory is bind-mounted (recursively) from the hidden copy on DIR/HIDDEN-NAME,
      and DIR/NAME is a symlink to that. The mount's root is a child of DIR: `..` from it
      is DIR, and from DIR its parent, as from DIR/NAME outside. So every relative link
      below it, at any depth, resolves as outside (/etc/ssl/certs ->
      ../../var/lib/ca-certificates/pem on openSUSE, /etc/rc2.d/S01cron ->
      ../init.d/cron). Through DIR/HIDDEN/NAME instead (rootlesskit issue #225),
      `..` from NAME is DIR/HIDDEN: one level short of climbing out of DIR.
    - anything else (a file, a socket...) is a symlink into the hidden copy: no path
      goes on below it, so nothing else resolves from there.

    Everything at the top stays a symlink in the tmpfs, so a command can still replace
    any entry (`rm -f /run/docker`, as dockerd-rootless.sh does); a mount point at
    DIR/NAME could not be removed. Below the top, the original dirs stay as they are,
    live (new files on the host show), read-only as before. Mirroring the whole tree
    (a tmpfs dir per subdir) would cost a syscall per file at start-up (~1,300 entries
    in a Debian /etc) and freeze the subdirs (/run/user/UID among them) as they were.
    The cost here: a mkdir and a bind mount per directory at the top of DIR (~70 in a
    Debian /etc, ~10 in /run), as many more lines in /proc/self/mountinfo, and as many
    more hidden names in DIR (`find DIR` meets each subdir twice: in the hidden copy
    and at its mount point)."""
    try:
        entries = list(os.scandir(os.path.join(directory, hidden)))
    except OSError as exc:
        raise ChildSetupError(f"--copy-up={directory}: cannot list it: {exc.strerror}"
                              ) from None
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for index, entry in enumerate(entries):
            try:
                _mirror(directory, fd, hidden, entry, index)
            except OSError as exc:
                raise ChildSetupError(f"--copy-up={directory}: cannot make "
                                      f"{os.path.join(directory, entry.name)} again in it: "
                                      f"{exc.strerror}") from None
    finally:
        os.close(fd)


def _mirror(directory: str, fd: int, hidden: str, entry: os.DirEntry, index: int) -> None:
    """DIR/NAME for the hidden copy's `entry` (DIR open as `fd`), as _mirror_entries says."""
    if entry.is_symlink():
        link = os.readlink(entry.path)
    elif entry.is_dir(follow_symlinks=False):
        point = _dir_point(hidden, entry.name, index)
        os.mkdir(point, 0o755, dir_fd=fd)
        mount(entry.path, os.path.join(directory, point), None, MS_BIND | MS_REC)
        link = point
    else:
        link = os.path.join(hidden, entry.name)
    os.symlink(link, entry.name, dir_fd=fd)


def _dir_point(hidden: str, name: str, index: int) -> str:
    """The name of the mount point of the hidden copy's dir `name`: HIDDEN-NAME, which
    shows what it is, or HIDDEN.INDEX where that is longer than a name may be."""
    point = f"{hidden}-{name}"
    return point if len(os.fsencode(point)) <= _NAME_MAX else f"{hidden}.{index}"


def create_detached_netns(path: str) -> None:
    """--detach-netns: a new netns kept alive by a bind mount at `path` (in a process
    that exits afterwards: the caller stays in the host's netns)."""
    from ..linux import CLONE_NEWNET, unshare

    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        unshare(CLONE_NEWNET)
        mount("/proc/self/ns/net", path, None, MS_BIND)
    except OSError as exc:
        raise ChildSetupError(f"--detach-netns: cannot create the netns at {path}: "
                              f"{write_failure(exc)}") from None


def install_resolver_files(state_dir: str, dns: tuple[str, ...]) -> None:
    """/etc/resolv.conf naming the driver's DNS, and /etc/hosts, written in the state dir
    and bind-mounted in place (the host's DNS address means nothing in our netns)."""
    try:
        with open("/etc/hosts", "rb") as f:
            hosts = f.read()
    except OSError:
        hosts = b"127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
    files = {"resolv.conf": "".join(f"nameserver {ns}\n" for ns in dns).encode(),
             "hosts": hosts}
    # The parent checked the state dir and its path (see statedir): only the user can
    # change what the path leads to. The files are written through the dir's fd.
    try:
        state_fd = os.open(state_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW |
                           os.O_CLOEXEC)
    except OSError as exc:
        raise ChildSetupError(f"cannot open the state dir {state_dir} in the child: "
                              f"{exc.strerror}") from None
    try:
        for name, data in files.items():
            fd = _write_state_file(state_fd, state_dir, name, data)
            try:
                _bind_over(fd, os.path.join(state_dir, name), os.path.join("/etc", name))
            finally:
                os.close(fd)
    finally:
        os.close(state_fd)


def _write_state_file(state_fd: int, state_dir: str, name: str, data: bytes) -> int:
    """STATE/name with `data`, mode 0644 whatever the umask: the command's processes,
    as any id, read it through the bind mount. Returns its fd."""
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644, dir_fd=state_fd)
        try:
            os.fchmod(fd, 0o644)
            write_all(fd, data)
        except BaseException:
            os.close(fd)
            raise
    except OSError as exc:
        raise ChildSetupError(f"cannot write {os.path.join(state_dir, name)}: "
                              f"{write_failure(exc)}") from None
    return fd


def _bind_over(fd: int, source: str, target: str) -> None:
    """Bind-mount the file open at `fd` (written at `source`) on `target`."""
    try:
        if os.path.islink(target) and _on_tmpfs("/etc"):
            # /etc was copied up: its entries are symlinks to the original files;
            # bind over a file of our own, not through the link onto the original.
            os.unlink(target)
            open(target, "w").close()
        mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    except OSError as exc:
        hint = ""
        if os.path.islink(target) and not os.path.exists(target):
            hint = (f" ({target} is a symlink to {os.readlink(target)}, which does not "
                    f"exist here: add --copy-up=/etc)")
        raise ChildSetupError(f"cannot bind-mount {source} on {target}: "
                              f"{exc.strerror}{hint}") from None


def _on_tmpfs(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    return top_fstype(path, mountinfo) == b"tmpfs"


def top_fstype(path: str, mountinfo: str = "/proc/self/mountinfo") -> bytes | None:
    """The file system type of the mount on top at `path` (later lines of mountinfo
    are mounted over earlier ones), None if nothing is mounted there. A line that is
    not as the kernel writes them is skipped."""
    # Bytes: mount points need not be UTF-8; the kernel escapes blanks and '\\' (\ooo).
    point = os.fsencode(path).replace(b"\\", b"\\134").replace(b" ", b"\\040")
    point = point.replace(b"\t", b"\\011").replace(b"\n", b"\\012")
    fstype = None
    with open(mountinfo, "rb") as f:
        for line in f:
            # ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ...
            fields = line.split()
            try:
                end = fields.index(b"-", 6)
            except ValueError:
                continue
            if end + 1 < len(fields) and fields[4] == point:
                fstype = fields[end + 1]
    return fstype
