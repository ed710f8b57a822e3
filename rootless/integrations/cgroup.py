"""--evacuate-cgroup2: move our cgroup's processes into a sub-group, so the cgroup
itself holds none and controllers can be delegated to the child's cgroup namespace."""
import os

from ..errors import RootlessError, UsageError

_ROOT = "/sys/fs/cgroup"


def _own_cgroup(path: str = "/proc/self/cgroup") -> str:
    # Bytes: a cgroup's name need not be UTF-8 (os.fsdecode keeps it as a path).
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"0::"):
                return os.fsdecode(line[3:].rstrip(b"\n"))
    return ""


def _is_cgroup2(path: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    from ..child.mounts import top_fstype

    return top_fstype(path, mountinfo) == b"cgroup2"


def check_name(name: str) -> None:
    """--evacuate-cgroup2 names one sub-group of our cgroup: a path ('/x', '../x')
    would move our processes, and write, outside it."""
    problem = None
    if not name:
        problem = "is empty"
    elif "/" in name:
        problem = "is a path, not a name (it has a '/')"
    elif name in (".", ".."):
        problem = "is not a name a cgroup can have"
    elif any(c < " " or c == "\x7f" for c in name):
        problem = "has a control character (a newline, a NUL...)"
    elif len(os.fsencode(name)) > 255:
        problem = f"is {len(os.fsencode(name))} bytes long, more than a file name's 255"
    if problem:
        raise UsageError(f"--evacuate-cgroup2={name!r} {problem}: give the name of one "
                         f"sub-group of our cgroup, e.g. --evacuate-cgroup2=init")


def evacuate(name: str) -> str:
    """Returns the path of the cgroup the processes now live in."""
    check_name(name)
    if not _is_cgroup2(_ROOT):
        raise RootlessError(f"--evacuate-cgroup2={name} needs cgroup v2 mounted at {_ROOT}, "
                            f"but this host uses cgroup v1 there: drop the flag, or boot with "
                            f"systemd.unified_cgroup_hierarchy=1")
    own = _own_cgroup()
    if not own:
        raise RootlessError(f"--evacuate-cgroup2={name}: this process is in no cgroup v2 group "
                            f"(/proc/self/cgroup has no 0:: line)")
    base = os.path.join(_ROOT, own.lstrip("/"))
    target = os.path.join(base, name)
    try:
        os.makedirs(target, exist_ok=True)
        with open(os.path.join(base, "cgroup.procs")) as f:
            pids = f.read().split()
        for pid in pids:
            try:
                with open(os.path.join(target, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except ProcessLookupError:
                pass  # exited meanwhile
        with open(os.path.join(base, "cgroup.controllers")) as f:
            controllers = f.read().split()
        if controllers:
            with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                f.write(" ".join("+" + c for c in controllers))
    except OSError as exc:
        raise RootlessError(f"--evacuate-cgroup2={name}: cannot move processes into {target}: "
                            f"{exc.strerror} (is the cgroup delegated to you? systemd user "
                            f"units need Delegate=yes)") from None
    return target
