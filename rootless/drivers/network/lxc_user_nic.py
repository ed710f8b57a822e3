"""--net=lxc-user-nic: a veth from the namespace into a bridge of the host, through
LXC's setuid helper, and the namespace's address from the bridge's DHCP server. The
kernel carries the traffic, with no user-mode TCP/IP stack in the way.

The parent asks `lxc-user-nic create /dev/null dummy PID veth BRIDGE IFNAME`, as
rootlesskit does (the first two name an LXC container; we are none): the helper
creates a veth pair in our network namespace, plugs one end into BRIDGE and moves the
other, named IFNAME, into the network namespace of PID. It does so only for a user
granted veths on that bridge in /etc/lxc/lxc-usernet (`USER veth BRIDGE COUNT`, or
`@GROUP ...`), COUNT at a time. PID is our DHCP client's (_dhcp), which has joined
the namespaces by then, and keeps the lease for the whole run.

The namespace reaches the host through the bridge only, never the host's loopback:
--disable-host-loopback is implied (and said, as rootlesskit says it, when it was
not given). --net=auto never picks this driver (docs/network.md, "lxc-user-nic").
"""
import os
import _signal as signal  # the C module: see _process.py

from ... import _log
from ..._process import PYTHON_IGNORED_SIGNALS, readable
from ...errors import DriverError, OutOfProcesses, UsageError
from ._helper import ended, find_binary
from .base import NetworkDriver

USERNET = "/etc/lxc/lxc-usernet"
PACKAGE = "lxc"
# Where LXC installs its helper, as rootlesskit looks for it: Debian and Fedora,
# Ubuntu, Arch Linux.
PLACES = ("/usr/libexec/lxc/lxc-user-nic", "/usr/lib/{machine}-linux-gnu/lxc/lxc-user-nic",
          "/usr/lib/lxc/lxc-user-nic")
_CREATE_TIMEOUT = 10.0  # s: it takes a few ms


class LxcUserNicDriver(NetworkDriver):
    name = "lxc-user-nic"
    dynamic_child_ip = True  # the lease decides it, as rootlesskit's API says
    client = None

    def preflight(self) -> None:
        c = self.config
        self.binary = find_helper(c.lxc_user_nic_binary)
        check_setuid(self.binary, c.lxc_user_nic_bridge)
        check_bridge(c.lxc_user_nic_bridge)
        if not c.disable_host_loopback:
            _log.warning("--disable-host-loopback is implied by --net=lxc-user-nic: the "
                         "namespace reaches the host only through the bridge, never its "
                         "127.0.0.1")
        from ._dhcp import Client

        # Last: nothing may fail after it here. It loads its library meanwhile.
        self.client = Client.fork(c.ifname, c.mtu, c.lxc_user_nic_bridge, c.debug)

    def start(self, child_pid: int, state_dir: str, netns_path: str | None = None):
        from ...wire.netinfo import NetworkInfo

        c = self.config
        try:
            self.client.join(child_pid, netns_path, os.path.join(state_dir, "dhcp.log"))
            self._create(self.client.pid)
            ip, prefix, router, mtu, dns = self.client.lease()
        except BaseException:
            self.stop()
            raise
        _log.debug(f"lxc-user-nic: {c.ifname} leased {ip}/{prefix}, router {router}, "
                   f"DNS {', '.join(dns)}, MTU {mtu}")
        return NetworkInfo(ifname=c.ifname, ip=ip, netmask=prefix, gateway=router, dns=dns,
                           mtu=mtu)

    def _create(self, pid: int) -> None:
        """The veth: the bridge's end here, IFNAME in the netns of `pid`."""
        bridge = self.config.lxc_user_nic_bridge
        status, output = run(
            [self.binary, "create", "/dev/null", "dummy", str(pid), "veth", bridge,
             self.config.ifname], _CREATE_TIMEOUT)
        if status != 0:
            raise DriverError(refusal(status, output, self.binary, bridge))
        _log.debug(f"lxc-user-nic: {output.strip()}")  # IFNAME:INDEX:HOST_VETH:INDEX

    def helpers(self) -> list:
        return [self.client.helper] if self.client else []

    def stop(self) -> None:
        if self.client:
            self.client.stop()
            self.client = None


def find_helper(given: str) -> str:
    """The lxc-user-nic to run: --lxc-user-nic-binary, else where LXC installs it,
    else the one on PATH."""
    flag = "--lxc-user-nic-binary"
    if given:
        return find_binary(flag, given, PACKAGE)
    machine = os.uname().machine
    for place in PLACES:
        path = place.format(machine=machine)
        if os.path.exists(path):
            return path
    return find_binary(flag, "lxc-user-nic", PACKAGE)


def check_setuid(path: str, bridge: str) -> None:
    """lxc-user-nic works only as root: setuid root, on a file system that honours it."""
    st = os.stat(path)
    why = ""
    if not (st.st_mode & 0o4000 and st.st_uid == 0):
        why = "is not setuid root"
    elif os.statvfs(path).f_flag & os.ST_NOSUID:
        why = "is on a file system mounted nosuid"
    if why:
        raise UsageError(f"{path} {why}, so it cannot plug a veth into {bridge}: as root, "
                         f"run: chown root {path} && chmod u+s {path} (Debian's lxc package "
                         f"installs it so), or point --lxc-user-nic-binary at one that is")


def check_bridge(bridge: str) -> None:
    """lxc-user-nic plugs the veth into a bridge of the network namespace we run in."""
    import _socket  # the C module: socket.py and its enum stay off the start path

    try:
        _socket.if_nametoindex(bridge)
    except OSError:
        raise UsageError(f"the bridge {bridge} does not exist here, so --net=lxc-user-nic "
                         f"has nothing to plug into: create it (lxc-net does, with "
                         f"USE_LXC_BRIDGE=\"true\" in /etc/default/lxc-net: as root, "
                         f"systemctl restart lxc-net), or name another with "
                         f"--lxc-user-nic-bridge") from None


def run(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run `argv` to its end: (its wait status, its stdout and stderr). Killed after
    `timeout` seconds."""
    import time

    rfd, wfd = os.pipe()
    try:
        pid = os.posix_spawn(argv[0], argv, os.environ, setsigdef=PYTHON_IGNORED_SIGNALS,
                             file_actions=[(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                           (os.POSIX_SPAWN_DUP2, wfd, 1),
                                           (os.POSIX_SPAWN_DUP2, wfd, 2)])
    except OSError as exc:
        os.close(rfd)
        raise OutOfProcesses.check(exc, argv[0]) or DriverError(
            f"cannot run {argv[0]}: {exc.strerror}") from None
    finally:
        os.close(wfd)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while readable(rfd, max(0.0, deadline - time.monotonic())):
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
            chunks.append(f"(killed after {timeout:.0f} s)".encode())
    finally:
        os.close(rfd)
    return os.waitpid(pid, 0)[1], b"".join(chunks).decode(errors="replace")


def refusal(status: int, output: str, binary: str, bridge: str) -> str:
    """Why `lxc-user-nic create` failed, in its own words, and what to do."""
    said = said_by_helper(output)
    if "Quota reached" in said:
        return f"lxc-user-nic refused a veth on {bridge} ({said}): {quota_fix(bridge)}"
    return f"{binary} {ended(status)}: {said or 'no message'}"


def said_by_helper(output: str) -> str:
    """lxc-user-nic's lines, without the source location each starts with
    ("../src/lxc/cmd/lxc_user_nic.c: 1250: main: Quota reached"), on one line."""
    import re

    lines = [re.sub(r"^\S+\.c: \d+: \w+:? (- )?", "", line.strip())
             for line in output.splitlines() if line.strip()]
    return "; ".join(lines)


def quota_fix(bridge: str) -> str:
    """lxc-user-nic says "Quota reached" both when the user has no grant and when it is
    used up: tell which, from /etc/lxc/lxc-usernet."""
    from ...subid import current_user

    user = current_user()
    granted = grants(user, bridge)
    if granted is None:
        return (f"there is no readable {USERNET}: as root, create it with the line "
                f"'{user} veth {bridge} 1'")
    if granted == 0:
        return (f"{USERNET} grants {user} no veth on {bridge}: as root, add the line "
                f"'{user} veth {bridge} 1' to it")
    return (f"{user}'s grant of {granted} veth{'s' if granted > 1 else ''} on {bridge} in "
            f"{USERNET} is used up (each running namespace or container holds one): "
            f"end one, or raise the count there")


def grants(user: str, bridge: str, path: str = USERNET) -> int | None:
    """How many veths on `bridge` `path` grants `user` (its lines and its groups'
    `@GROUP` lines, added up, as lxc-user-nic counts them); None if it cannot be read."""
    groups = _group_names()
    total = 0
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 4 or fields[1:3] != ["veth", bridge]:
                    continue
                name = fields[0]
                if name != user and not (name.startswith("@") and name[1:] in groups):
                    continue
                try:
                    total += int(fields[3])
                except ValueError:
                    continue
    except OSError:
        return None
    return total


def _group_names() -> set[str]:
    """Our groups' names: lxc-user-nic matches `@GROUP` lines against its caller's."""
    import grp

    names = set()
    for gid in os.getgroups() + [os.getgid()]:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue
    return names
