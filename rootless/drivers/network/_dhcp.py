"""The DHCP client of --net=lxc-user-nic: the process that takes the namespace's
address from the bridge's DHCP server and keeps it for the whole run.

Where it lives, and why there. The parent forks it in the driver's preflight (it
loads its library while the namespaces are made); once they exist, it joins the
child's user namespace, then the network namespace (the child's own, or the one
--detach-netns keeps at STATE/netns), and stays there until the run ends:

- not in the child, as rootlesskit does it (a goroutine of its child): ours is one
  synchronous thread that must stay so until the namespaces exist, then waits for the
  command as its subreaper (or pid 1); a renewal every half lease for weeks has no
  place there, and with --detach-netns the child is not even in that netns;
- not in the socket factory: it exists only for the builtin port driver;
- a process of its own, then, which the parent watches through its pidfd as it
  watches slirp4netns (_helper.Helper): when it dies, or when the lease is lost (it
  turns that into its own exit, with a line saying why), the run ends at once.
  It is also the pid that `lxc-user-nic create` moves the veth to: the same for the
  child's netns and a detached one (rootlesskit starts `nsenter ... sleep infinity`
  for the latter). Living in the netns, it keeps it alive after the child has gone,
  long enough to release the lease when the parent tells it to stop (EOF on its
  control pipe, or SIGTERM, its parent-death signal): a bridge's address pool is not
  used up by runs that ended, each on a fresh veth with a new MAC address.

The protocol is pyroute2's (pyroute2.dhcp: its asyncio client keeps the RFC 2131
state machine, renewing at T1 and rebinding at T2; docs/network.md, "lxc-user-nic", says why
it and not another library), the links, address and route are set through pyroute2's
netlink. asyncio and pyroute2 are imported in this process only, after the fork: not
by the parent, the child, or any other driver.

Lines it writes to the parent: "J" once it is in the namespaces; then "L IP PREFIX
ROUTER MTU DNS,DNS..." once the interface is configured from a lease, or "E WHY" if
it cannot be (and it exits 1). What it logs goes to STATE/dhcp.log; its last line
says why it ended, for the run's one error line.
"""
import os
import _signal as signal  # the C module: see _process.py

from ..._process import close_fds_except, fork, readable, restore_default_signals
from ...errors import DriverError
from ._helper import Helper, helper_failed

LEASE_TIMEOUT = 10.0  # s: a DHCP server answers in ms (dnsmasq's ping check: 3 s)
_JOIN_TIMEOUT = 30.0  # s: loading asyncio and pyroute2 (0.1 s), two setns()
NAME = "the DHCP client of --net=lxc-user-nic"


class Client:
    """The parent's side: the process, its pipes and its pidfd (`helper`).

    Forked in the driver's preflight, before the namespaces exist: it loads asyncio
    and pyroute2 (0.1 s of a CPU) while the parent makes them, and is told where to go
    once they exist (join). The parent is one thread until the command runs."""

    def __init__(self, pid: int, control: int, reports: int):
        self.pid, self._control, self._reports = pid, control, reports
        self.helper = Helper(NAME, pid, "", tail_lines=1)
        self._buffer = b""

    @classmethod
    def fork(cls, ifname: str, mtu: int, bridge: str, debug: bool) -> "Client":
        control_r, control_w = os.pipe()
        reports_r, reports_w = os.pipe()
        parent = os.getpid()
        try:
            pid = fork("the DHCP client's process")
        except BaseException:
            for fd in (control_r, control_w, reports_r, reports_w):
                os.close(fd)
            raise
        if pid == 0:
            try:
                _child(control_r, reports_w, parent, (ifname, mtu, bridge, debug))
            finally:
                os._exit(1)
        os.close(control_r)
        os.close(reports_w)
        return cls(pid, control_w, reports_r)

    def join(self, anchor: int, netns_path: str | None, log: str) -> None:
        """Send the client into the user namespace of `anchor` and the network
        namespace at `netns_path` (None: that of `anchor`), logging to `log`; returns
        once it is there."""
        self.helper.log = log
        paths = (f"/proc/{anchor}/ns/user", netns_path or f"/proc/{anchor}/ns/net", log)
        self._send(b"\0".join(map(os.fsencode, paths)) + b"\0\0")
        self._expect("J", _JOIN_TIMEOUT, "did not join the namespace")

    def lease(self):
        """Let the client go (the veth is there now) and wait for its lease:
        (ip, prefix, router, mtu, dns)."""
        self._send(b"G")
        ip, prefix, router, mtu, dns = self._expect(
            "L", LEASE_TIMEOUT + 5.0, "did not get a lease").split(" ")
        return ip, int(prefix), router, int(mtu), tuple(dns.split(","))

    def _send(self, data: bytes) -> None:
        """To the client; if it is gone, its last line or its end says why
        (_expect)."""
        try:
            while data:
                data = data[os.write(self._control, data):]
        except BrokenPipeError:
            pass

    def _expect(self, kind: str, timeout: float, failing: str) -> str:
        """The client's next line, which must be of `kind`; its "E" line, its death or
        its silence is a DriverError."""
        line = self._line(timeout)
        if line is None:
            if readable(self.helper.fd, 1.0):
                how = f"{self.helper.how()} before the namespace had its address"
            else:
                how = f"{failing} within {timeout:.0f} s"
            raise helper_failed(NAME, how, self.helper.log, lines=1)
        if line.startswith("E "):
            raise DriverError(f"--net=lxc-user-nic: {line[2:]}")
        if not line.startswith(kind):
            raise DriverError(f"{NAME} said {line!r:.200}, not {kind}")
        return line[2:]

    def _line(self, timeout: float) -> str | None:
        """The next line from the client; None at EOF or after `timeout` seconds."""
        import time

        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            if not readable(self._reports, max(0.0, deadline - time.monotonic())):
                return None
            chunk = os.read(self._reports, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")

    def stop(self, grace: float = 1.0) -> None:
        """Tell the client to release the lease and go (SIGTERM, and EOF on its
        control pipe); killed if it is not gone within `grace` seconds. Idempotent."""
        if self._control < 0:
            return
        os.close(self._control)
        os.close(self._reports)
        self._control = self._reports = -1
        self.helper.signal(signal.SIGTERM)
        if not readable(self.helper.fd, grace):
            self.helper.signal(signal.SIGKILL)
        self.helper.close()


# -- the client process -------------------------------------------------------------------

def _child(control: int, reports: int, parent: int, args) -> None:
    """In the forked process; never returns. Until the lease is reported, what goes
    wrong is said to the parent ("E" line), which makes it the run's error."""
    from ...linux import set_parent_death_signal

    close_fds_except(control, reports)
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # the log, once the state dir is known (join)
        os.dup2(null, fd)
    os.close(null)
    os.setpgid(0, 0)  # a Ctrl-C on the terminal is the command's to handle
    restore_default_signals()  # not the parent's forwarding to the child
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a report to a parent gone: EPIPE
    # SIGTERM, not SIGKILL: once it serves a lease, the lease is released as when the
    # parent stops it. Checked after the prctl: the parent may be gone already.
    set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)
    code = 1
    try:
        _preload()
        paths = _read_paths(control)
        if paths is None:
            os._exit(0)  # the parent gave up before the namespaces were made
        _enter(*paths, parent)
        os.write(reports, b"J\n")
        if not os.read(control, 1):
            os._exit(0)  # the parent gave up (lxc-user-nic failed)
        code = _run(control, reports, *args)
    except BaseException as exc:  # noqa: B902 - said, then we are gone
        why = exc.why if isinstance(exc, _Refused) else f"{type(exc).__name__}: {exc}"
        _say(why, stamped=False)
        _report(reports, f"E {why}")
    finally:
        os._exit(code)


class _Refused(Exception):
    """What stops the client before it has a lease, in words for the user."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _preload() -> None:
    """What the client needs, loaded before it is told where to go."""
    try:
        import asyncio  # noqa: F401

        import pyroute2.dhcp.client  # noqa: F401
    except ImportError as exc:
        raise _Refused(f"cannot load pyroute2's DHCP client ({exc}): install pyroute2 "
                       f"0.9.6 or later") from None


def _read_paths(control: int) -> tuple[str, str, str] | None:
    """The user and network namespaces to join and the log, NUL-separated; None at
    EOF."""
    data = b""
    while not data.endswith(b"\0\0"):
        chunk = os.read(control, 4096)
        if not chunk:
            return None
        data += chunk
    userns, netns, log = (os.fsdecode(p) for p in data[:-2].split(b"\0"))
    return userns, netns, log


def _enter(userns: str, netns: str, log: str, parent: int) -> None:
    """Log to `log`, join the namespaces."""
    from ...linux import CLONE_NEWNET, CLONE_NEWUSER, set_parent_death_signal, setns

    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                     os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _Refused(f"cannot create {log}: {exc.strerror}") from None
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for path, kind in ((userns, CLONE_NEWUSER), (netns, CLONE_NEWNET)):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd, kind)
            finally:
                os.close(fd)
        except OSError as exc:
            raise _Refused(f"cannot join the namespace at {path}: {exc.strerror}") from None
    set_parent_death_signal(signal.SIGTERM)  # a change of credentials may clear it
    if os.getppid() != parent:
        os._exit(1)


def _report(reports: int, line: str) -> None:
    try:
        os.write(reports, line.encode(errors="replace") + b"\n")
    except OSError:
        pass  # the parent is gone


def _say(message: str, stamped: bool = True) -> None:
    """A line in the log (our stderr), with the time unless it is the last one, which
    the run's error line quotes; never raises."""
    import time

    if stamped:
        message = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
    try:
        os.write(2, f"{message}\n".encode(errors="replace"))
    except OSError:
        pass


def _run(control: int, reports: int, ifname: str, mtu: int, bridge: str,
         debug: bool) -> int:
    import asyncio
    import logging

    # pyroute2's own lines: its errors (the one reason to read them) unless --debug.
    logging.basicConfig(level=logging.INFO if debug else logging.ERROR,
                        format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(_keep(control, reports, ifname, mtu, bridge))


async def _keep(control: int, reports: int, ifname: str, mtu: int, bridge: str) -> int:
    """Take a lease for `ifname`, configure it, report it, and keep it until told to
    stop; returns the exit code. Before the lease is reported, a failure is a
    _Refused (the parent says it); after, a loss is the log's last line."""
    import asyncio

    from pyroute2.dhcp.client import AsyncDHCPClient, ClientConfig

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(control, stop.set)  # EOF: the parent is done with us
    stopped = asyncio.ensure_future(stop.wait())
    await _bring_up(ifname, mtu)
    events: asyncio.Queue = asyncio.Queue()
    config = ClientConfig(interface=ifname, lease_type=_unsaved_lease(), hooks=_hooks(events),
                          retransmission=_backoff, handle_signals=False, host_name=None,
                          vendor_id=None)
    async with AsyncDHCPClient(config) as client:  # leaving it releases the lease
        await client.bootstrap()
        lease = await _first(events, stopped)
        if lease is None:
            if stop.is_set():
                return 0
            raise _Refused(_no_lease(client, ifname, bridge))
        why = _unusable(lease, bridge)
        if why:
            raise _Refused(why)
        actual_mtu = await _configure(ifname, lease)
        _say(f"leased {lease.ip}/{lease.prefixlen} from {lease.server_id} for "
             f"{lease.lease_time} s")
        _report(reports, " ".join(("L", lease.ip, str(lease.prefixlen), lease.default_gateway,
                                   str(actual_mtu), ",".join(lease.name_servers))))
        lost = await _hold(events, stopped, lease, ifname)
    if lost:
        _say(lost, stamped=False)  # the last line: the run's error quotes it
        return 1
    return 0


async def _bring_up(ifname: str, mtu: int) -> None:
    """lo and `ifname` up, `ifname` with `mtu` (0: as lxc-user-nic made it, the
    bridge's)."""
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    async with AsyncIPRoute() as ipr:
        for name in ("lo", ifname):
            index = await ipr.link_lookup(ifname=name)
            if not index:
                raise _Refused(f"lxc-user-nic made no {name} in the namespace")
            try:
                await ipr.link("set", index=index[0], state="up",
                               **({"mtu": mtu} if mtu and name == ifname else {}))
            except NetlinkError as exc:
                what = f"set the MTU of {name} to {mtu}" if mtu and name == ifname else \
                    f"bring {name} up"
                raise _Refused(f"cannot {what}: {os.strerror(exc.code)}") from None


def _unsaved_lease():
    """pyroute2's Lease, kept in memory only: a lease belongs to one veth, which
    lives as long as the run (its default writes a JSON file in the cwd)."""
    from pyroute2.dhcp.leases import Lease

    class Unsaved(Lease):
        def dump(self) -> None:
            pass

        @classmethod
        def load(cls, interface: str) -> None:
            return None

    return Unsaved


def _hooks(events) -> list:
    """One hook a trigger, each queueing (trigger, lease): what happens to the lease is
    decided in _first and _hold, not in a hook (pyroute2 logs a hook's error and
    goes on)."""
    from pyroute2.dhcp.hooks import Trigger, hook

    def noting(trigger):
        async def note(lease):
            events.put_nowait((trigger, lease))
        note.__name__ = f"note_{trigger}"
        return hook(trigger)(note)

    return [noting(trigger) for trigger in Trigger]


def _backoff():
    """Seconds between retransmissions: from 0.5 (a DHCP server on the same bridge
    answers at once; pyroute2's first wait, 4 s, would slow every start whose first
    DISCOVER went out as the link came up), doubling up to 32."""
    delay = 0.5
    while True:
        yield delay
        delay = min(delay * 2, 32.0)


async def _next(events, stopped, timeout: float | None = None):
    """The client's next (trigger, lease); None once `stopped` is done, or after
    `timeout` seconds."""
    import asyncio

    got = asyncio.ensure_future(events.get())
    done, _ = await asyncio.wait({got, stopped}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if got in done:
        return got.result()
    got.cancel()
    return None


async def _first(events, stopped):
    """The first lease, or None when stopped or after LEASE_TIMEOUT seconds."""
    import asyncio

    from pyroute2.dhcp.hooks import Trigger

    clock = asyncio.get_running_loop().time
    deadline = clock() + LEASE_TIMEOUT
    while event := await _next(events, stopped, max(0.0, deadline - clock())):
        if event[0] is Trigger.BOUND:
            return event[1]
    return None


def _no_lease(client, ifname: str, bridge: str) -> str:
    from pyroute2.dhcp.fsm import State

    if client.state is State.SELECTING:
        return (f"no DHCP server answered on the bridge {bridge} within "
                f"{LEASE_TIMEOUT:.0f} s: start the one that serves it (lxc-net's dnsmasq: "
                f"as root, systemctl start lxc-net), or name a served bridge with "
                f"--lxc-user-nic-bridge")
    return (f"the DHCP server on the bridge {bridge} offered {ifname} an address but did "
            f"not confirm it within {LEASE_TIMEOUT:.0f} s (the client is "
            f"{client.state.name}): check the server's log")


def _unusable(lease, bridge: str) -> str:
    """Why the namespace cannot use `lease`, or "". rootlesskit refuses a lease
    without a router or a DNS server too ("got no Router", "got no DNS")."""
    from pyroute2.dhcp.leases import MissingOptionError

    missing = []
    for what, option in (("a subnet mask", "subnet_mask"), ("a router", "routers"),
                         ("a DNS server", "name_servers")):
        try:
            if getattr(lease, option):
                continue
        except MissingOptionError:
            pass
        missing.append(what)
    if not missing:
        return ""
    return (f"the DHCP server on the bridge {bridge} leased {lease.ip} without "
            f"{' or '.join(missing)}: the namespace needs them (a default route, "
            f"/etc/resolv.conf); have the server send them (dnsmasq sends its own "
            f"address for both unless told otherwise by --dhcp-option=3 or 6)")


async def _configure(ifname: str, lease) -> int:
    """The address and the default route of `lease` on `ifname`; returns its MTU."""
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        async with AsyncIPRoute() as ipr:
            index = (await ipr.link_lookup(ifname=ifname))[0]
            await ipr.addr("replace", index=index, address=lease.ip,
                           prefixlen=lease.prefixlen)
            await ipr.route("replace", dst="0.0.0.0/0", gateway=lease.default_gateway,
                            oif=index)
            link = (await ipr.link("get", index=index))[0]
            return link.get_attr("IFLA_MTU")
    except NetlinkError as exc:
        raise _Refused(f"cannot give {ifname} the address {lease.ip}/{lease.prefixlen} "
                       f"and the route via {lease.default_gateway}: "
                       f"{os.strerror(exc.code)}") from None


async def _hold(events, stopped, lease, ifname: str) -> str:
    """Keep the lease until stopped (returns ""), or until it is lost (returns why):
    the namespace must not go on with an address the server may give to another. A
    renewal that moves the namespace to another address is a loss too: what uses the
    address (the API's childIP, the command's own sockets) would not follow it."""
    from pyroute2.dhcp.hooks import Trigger

    while event := await _next(events, stopped):
        trigger, new = event
        if trigger is Trigger.EXPIRED:
            return f"the lease of {lease.ip} on {ifname} expired: no DHCP server renewed it"
        if trigger is Trigger.UNBOUND:
            return (f"the DHCP server took back the lease of {lease.ip} on {ifname} "
                    f"(DHCPNAK)")
        if new.ip != lease.ip:
            return f"the DHCP server moved {ifname} from {lease.ip} to {new.ip}"
        _say(f"{trigger} {lease.ip} for {new.lease_time} s")
    return ""


__all__ = ["Client", "LEASE_TIMEOUT"]
