"""`rootless-run -- dockerd`: what rootless Docker needs, checked before anything starts,
and the one piece of dockerd-rootless.sh's preparation that is not a flag.

The rest of dockerd-rootless.sh is flags (network, copy-up of /etc and /run, port
driver), which rootless-run's own defaults already give, and dockerd finds rootless
mode by itself from ROOTLESSKIT_STATE_DIR.
"""
import os

from .. import _log
from .._paths import which
from ..errors import UsageError

# The host's daemons' runtime paths: after the copy-up of /run they are symlinks to
# the host's (root-owned) ones, where our dockerd and its containerd cannot write.
HOST_RUNTIME_PATHS = ("/run/docker", "/run/containerd", "/run/xtables.lock")

# Unprivileged overlayfs mounts (Linux 5.11); before, rootless Docker needs
# fuse-overlayfs (or the slow vfs driver).
_OVERLAY_IN_USERNS = (5, 11)


def preflight(config, subids, net_was_auto: bool) -> None:
    """Raise a UsageError naming everything dockerd would miss: one sentence each, what
    is missing, what dockerd needs it for and the fix (commands in backticks: a
    sentence's full stop is not part of them)."""
    args = config.command[1:]
    path = os.environ.get("PATH", os.defpath)
    problems: list[str] = []

    def need(binary: str, purpose: str, package: str) -> None:
        if which(binary, path):
            return
        sbin = next((d for d in ("/usr/sbin", "/sbin") if which(os.path.join(d, binary))), None)
        if sbin:
            problems.append(f"{binary}, which {purpose}, is in {sbin}, a directory not in "
                            f"PATH: run `export PATH=$PATH:/usr/sbin:/sbin`.")
        else:
            problems.append(f"{binary}, which {purpose}, is not in PATH: as root, run "
                            f"`apt-get install {package}`, or add its directory to PATH.")

    need("newuidmap", "maps the owners of the images' files", "uidmap")
    need("newgidmap", "maps the groups of the images' files", "uidmap")
    if not subids.uids or not subids.gids:
        from ..subid import add_command, current_user

        user = current_user()
        kinds = " and ".join(k for k, none in (("uids", not subids.uids),
                                                ("gids", not subids.gids)) if none)
        problems.append(f"{user} has no subordinate {kinds}, which the images' files need "
                        f"(they have many owners): "
                        + add_command(user, uids=not subids.uids, gids=not subids.gids,
                                      fenced=True) + ".")
    if config.net == "host":
        problems.append("--net=host leaves dockerd no network namespace to make its bridge "
                        "and iptables rules in: drop --net=host (rootless-run then picks "
                        "slirp4netns or pasta).")
    elif config.net == "none" and net_was_auto:
        problems.append("No network for the containers works here (neither slirp4netns "
                        "with a usable /dev/net/tun nor pasta): as root, run `apt-get "
                        "install slirp4netns` and `chmod 666 /dev/net/tun`, or `apt-get "
                        "install passt`; or choose --net=none.")
    if "/run" not in config.copy_up:
        problems.append("/run is not writable in the namespace, and dockerd creates "
                        "/run/docker there: add --copy-up=/run.")
    if not _flag_says(args, "--iptables", "false"):
        need("iptables", "dockerd needs for its NAT and port rules", "iptables")
    if not _flag_says(args, "--userland-proxy", "false"):
        need("rootlesskit-docker-proxy", "publishes the containers' ports through our API",
             "rootlesskit")
    if _kernel() < _OVERLAY_IN_USERNS and not _flag_given(args, "--storage-driver", "-s"):
        need("fuse-overlayfs", f"gives dockerd overlay storage before Linux "
                               f"{_OVERLAY_IN_USERNS[0]}.{_OVERLAY_IN_USERNS[1]}",
             "fuse-overlayfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not runtime or not os.access(runtime, os.W_OK | os.X_OK):
        where = f"={runtime} is not a directory you can write" if runtime else " is not set"
        problems.append(f"XDG_RUNTIME_DIR{where}, and dockerd puts docker.sock there: log "
                        f"in through a session that sets it, or export XDG_RUNTIME_DIR to "
                        f"a private dir of yours.")
    home = os.environ.get("HOME", "")
    if not os.path.isdir(home):
        where = f"={home} does not exist" if home else " is not set"
        problems.append(f"HOME{where}, and dockerd keeps its data in "
                        f"~/.local/share/docker: export HOME to your home directory.")
    if problems:
        raise UsageError("dockerd cannot run rootless here. " + " ".join(problems))
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
