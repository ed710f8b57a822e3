"""`rootless-run -- dockerd`: what rootless Docker needs, checked before anything starts,
and the one piece of dockerd-rootless.sh's preparation that is not a flag.

The rest of dockerd-rootless.sh is flags (network, copy-up of /etc and /run, port
driver), which rootless-run's own defaults already give, and dockerd finds rootless
mode by itself from ROOTLESSKIT_STATE_DIR.
"""
import os

from . import _log
from ._paths import which
from .errors import UsageError

# The host's daemons' runtime paths: after the copy-up of /run they are symlinks to
# the host's (root-owned) ones, where our dockerd and its containerd cannot write.
HOST_RUNTIME_PATHS = ("/run/docker", "/run/containerd", "/run/xtables.lock")

# Unprivileged overlayfs mounts (Linux 5.11); before, rootless Docker needs
# fuse-overlayfs (or the slow vfs driver).
_OVERLAY_IN_USERNS = (5, 11)


def preflight(config, subids, net_was_auto: bool) -> None:
    """Raise a UsageError naming everything dockerd would miss, each with its fix."""
    args = config.command[1:]
    path = os.environ.get("PATH", os.defpath)
    problems = []

    def need(binary: str, why: str, package: str) -> None:
        if which(binary, path):
            return
        sbin = next((d for d in ("/usr/sbin", "/sbin") if which(os.path.join(d, binary))), None)
        if sbin:
            problems.append(f"{binary} ({why}) is in {sbin}, which is not in PATH: "
                            f"export PATH=$PATH:/usr/sbin:/sbin")
        else:
            problems.append(f"{binary} ({why}): as root, run: apt-get install {package}")

    need("newuidmap", "maps the image files' owners", "uidmap")
    need("newgidmap", "maps the image files' groups", "uidmap")
    if not subids.uids or not subids.gids:
        from .subid import add_command, current_user

        problems.append("subordinate ids (images hold files of many owners): "
                        + add_command(current_user(), uids=not subids.uids,
                                      gids=not subids.gids))
    if config.net == "host":
        problems.append("a network namespace (dockerd makes its bridge and iptables rules "
                        "there): drop --net=host (rootless-run picks slirp4netns or pasta)")
    elif config.net == "none" and net_was_auto:
        problems.append("a network for the containers (neither slirp4netns with a usable "
                        "/dev/net/tun nor pasta works here): as root, run: apt-get install "
                        "slirp4netns and chmod 666 /dev/net/tun, or apt-get install passt; or "
                        "choose --net=none")
    if "/run" not in config.copy_up:
        problems.append("a writable /run (dockerd creates /run/docker): add --copy-up=/run")
    if not _flag_says(args, "--iptables", "false"):
        need("iptables", "dockerd's NAT and port rules", "iptables")
    if not _flag_says(args, "--userland-proxy", "false"):
        need("rootlesskit-docker-proxy", "publishes container ports through our API",
             "rootlesskit")
    if _kernel() < _OVERLAY_IN_USERNS and not _flag_given(args, "--storage-driver", "-s"):
        need("fuse-overlayfs", f"overlay storage without Linux {_OVERLAY_IN_USERNS[0]}."
                               f"{_OVERLAY_IN_USERNS[1]}", "fuse-overlayfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not runtime or not os.access(runtime, os.W_OK | os.X_OK):
        problems.append(f"a writable XDG_RUNTIME_DIR (dockerd puts docker.sock there; now "
                        f"{runtime or 'unset'}): log in through a session that sets it, or "
                        f"export XDG_RUNTIME_DIR to a private dir of yours")
    if not os.path.isdir(os.environ.get("HOME", "")):
        problems.append("an existing HOME (dockerd keeps its data in ~/.local/share/docker)")
    if problems:
        raise UsageError("dockerd cannot run rootless here; it needs " + "; ".join(problems))
    if _kernel_cgroup_v1():
        _log.debug("cgroup v1 host: rootless dockerd runs without cgroups (no resource "
                   "limits); cgroup v2 with delegation enables them")


def forget_host_runtime_dirs() -> None:
    """Child, after the copy-up of /run: drop the links to the host's daemons' runtime
    dirs, so dockerd creates its own (dockerd-rootless.sh does the same)."""
    for path in HOST_RUNTIME_PATHS:
        if os.path.islink(path):
            os.unlink(path)


def _flag_says(args, flag: str, value: str) -> bool:
    return f"{flag}={value}" in args or any(
        a == flag and b == value for a, b in zip(args, args[1:]))


def _flag_given(args, *flags: str) -> bool:
    return any(a in flags or a.split("=", 1)[0] in flags for a in args)


def _kernel() -> tuple[int, int]:
    try:
        major, minor = os.uname().release.split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:
        return (99, 0)  # unknown: assume a recent kernel rather than block the run


def _kernel_cgroup_v1() -> bool:
    return not os.path.exists("/sys/fs/cgroup/cgroup.controllers")
