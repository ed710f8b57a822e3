"""Thin wrappers over the Linux system calls Python 3.11 does not expose.

Nothing here imports trio: the child uses these before any thread exists.
"""
from ._libc import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    MNT_DETACH,
    MS_BIND,
    MS_MOVE,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_REC,
    MS_SHARED,
    MS_SLAVE,
    mount,
    ns_owner_uid,
    raise_fd_limit,
    set_child_subreaper,
    set_mtu,
    set_parent_death_signal,
    setns,
    umount,
    unshare,
)

__all__ = [
    "CLONE_NEWCGROUP", "CLONE_NEWIPC", "CLONE_NEWNET", "CLONE_NEWNS", "CLONE_NEWPID",
    "CLONE_NEWUSER", "CLONE_NEWUTS", "MNT_DETACH", "MS_BIND", "MS_MOVE", "MS_NODEV",
    "MS_NOEXEC", "MS_NOSUID", "MS_PRIVATE", "MS_REC", "MS_SHARED", "MS_SLAVE", "mount",
    "ns_owner_uid", "raise_fd_limit", "set_child_subreaper", "set_mtu", "set_parent_death_signal", "setns",
    "umount", "unshare",
]
