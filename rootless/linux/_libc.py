"""ctypes bindings: libc is loaded once, every failure becomes an OSError with errno."""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20

MNT_DETACH = 0x2

# ioctl on a namespace fd (linux/nsfs.h): the uid that owns a user namespace
_NS_GET_OWNER_UID = 0xB704

# netdevice(7): an interface's MTU, through any socket of the netns
_AF_INET = 2
_SOCK_DGRAM = 2
_SIOCSIFMTU = 0x8922
_IFNAMSIZ = 16

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_RLIMIT_NOFILE = 7


def _check(result: int, what: str, path: str | None = None) -> None:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def ns_owner_uid(fd: int) -> int:
    """The (host) uid that created the user namespace open as `fd`."""
    uid = ctypes.c_uint()
    _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(_NS_GET_OWNER_UID), ctypes.byref(uid)),
           "ioctl(NS_GET_OWNER_UID)")
    return uid.value


class _IfreqMtu(ctypes.Structure):
    # struct ifreq: the name, then a union (40 bytes in all); ifr_mtu is its first int
    _fields_ = [("name", ctypes.c_char * _IFNAMSIZ), ("mtu", ctypes.c_int),
                ("_pad", ctypes.c_char * 20)]


def set_mtu(ifname: str, mtu: int) -> None:
    """The MTU of `ifname` in the caller's netns: one ioctl, where pyroute2's import
    would cost the way to the command ~0.1 s."""
    fd = _libc.socket(ctypes.c_int(_AF_INET), ctypes.c_int(_SOCK_DGRAM | os.O_CLOEXEC),
                      ctypes.c_int(0))
    _check(fd, "socket(AF_INET, SOCK_DGRAM)")
    try:
        ifr = _IfreqMtu(os.fsencode(ifname), mtu)
        _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(_SIOCSIFMTU), ctypes.byref(ifr)),
               f"setting the MTU of {ifname} to {mtu}")
    finally:
        os.close(fd)


def _path(p: str | None) -> bytes | None:
    return None if p is None else os.fsencode(p)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    _check(_libc.mount(_path(source), _path(target), _path(fstype),
                       ctypes.c_ulong(flags), _path(data)), f"mount {target}", target)


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_path(target), ctypes.c_int(flags)), f"umount {target}", target)


def set_parent_death_signal(sig: int) -> None:
    _check(_libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def set_child_subreaper() -> None:
    _check(_libc.prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), 0, 0, 0),
           "prctl(PR_SET_CHILD_SUBREAPER)")


class _Rlimit(ctypes.Structure):
    _fields_ = [("cur", ctypes.c_ulong), ("max", ctypes.c_ulong)]


def raise_fd_limit() -> None:
    """The soft limit of open files up to the hard one, for a process whose soft limit
    was lowered under it (prlimit, a shell's ulimit) and that must still clean up. Here,
    with ctypes (loaded in the child from the start), not `resource`: that is a shared
    object, which cannot even be loaded once no fd is left. Never raises."""
    limit = _Rlimit()
    if _libc.getrlimit(ctypes.c_int(_RLIMIT_NOFILE), ctypes.byref(limit)) == 0 and \
            limit.cur < limit.max:
        limit.cur = limit.max
        _libc.setrlimit(ctypes.c_int(_RLIMIT_NOFILE), ctypes.byref(limit))
