"""UDP through a builtin port: one flow per client address.

The parent's socket on the host receives each client's datagrams; the first one of
a client opens a flow: a UDP socket of the child's netns (from the factory),
connected to the child port, and, when the child may see clients' addresses, bound
to the client's address. What the child answers on it goes back to that client
from the host socket. A flow ends after a while without traffic either way.
"""
import errno
import socket
from collections import OrderedDict

from ... import _log, _tunables
from . import _transparent
from ._socket_factory import FactoryGone


def _idle_timeout(default: float = 60.0) -> float:
    """Seconds without a datagram, either way, before a flow ends (conntrack's UDP
    stream timeout, roughly); ROOTLESS_UDP_FLOW_TIMEOUT overrides it."""
    return _tunables.seconds("ROOTLESS_UDP_FLOW_TIMEOUT", default)


MAX_FLOWS = 4096     # per port: beyond it, a new client's flow ends the least recently
                     # used one (spoofed or 127/8 sources must not lock clients out)
_MAX_DATAGRAM = 65535
_BURST = 64  # datagrams read at most between two checkpoints
# What a connected UDP socket reports for an earlier ICMP error: the next
# datagram may well get through (the server may just be starting).
_TRANSIENT = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)


class UdpPort:
    """`host_sock`: a bound, non-blocking stdlib socket. Datagrams from clients are
    read and passed on in batches (recvmmsg/sendmmsg): one system call each way moves
    up to _BURST datagrams, and a burst costs one trio checkpoint."""

    def __init__(self, factory, host_sock, child_ip: str, child_port: int, transparent: bool):
        self.factory, self.host_sock = factory, host_sock
        self.child = (child_ip, child_port)
        self.port = host_sock.getsockname()[1]  # the published port, for the log
        self.family = socket.AF_INET6 if ":" in child_ip else socket.AF_INET
        self.transparent = transparent
        self.idle = _idle_timeout()
        # By the client's sockaddr, the least recently used first.
        self.flows: OrderedDict[bytes, "_Flow"] = OrderedDict()

    async def serve(self) -> None:
        import trio
        from ...linux._mmsg import Datagrams

        host, flows = self.host_sock, self.flows
        batch = Datagrams(_BURST, _MAX_DATAGRAM + 1, host.family, self._ask_destinations())
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            while True:
                await trio.lowlevel.wait_readable(host)
                try:
                    n = batch.recv(host.fileno())
                except BlockingIOError:
                    continue
                except OSError as exc:  # an ICMP error of an earlier answer
                    _log.debug(f"UDP {self.child}: {exc.strerror}")
                    continue
                try:
                    # Runs of datagrams from one client go on in one call.
                    start, client = 0, batch.sender(0)
                    for i in range(1, n + 1):
                        sender = batch.sender(i) if i < n else None
                        if sender != client:
                            flow = flows.get(client)
                            if flow is None:
                                flow = await self._new_flow(client, batch.destination(start))
                            else:
                                flows.move_to_end(client)
                            if flow is not None:
                                flow.last = trio.current_time()
                                flow.send(batch, start, i)
                            start, client = i, sender
                except Exception as exc:  # a bug: these datagrams are lost, not the port
                    _log.limited("udp-port", f"UDP port {self.port}: datagrams dropped: "
                                             f"{type(exc).__name__}: {exc}")

    def _ask_destinations(self) -> bool:
        """On a wildcard address, have the socket tell each datagram's destination, so
        that answers go out from the address the client sent to (from the one routing
        picks, a client that sent to another address of the host would drop them, as
        rootlesskit's do)."""
        from ...linux._mmsg import IP_PKTINFO, PKTINFO

        host = self.host_sock
        if host.getsockname()[0] not in ("0.0.0.0", "::"):
            return False
        level = PKTINFO[host.family][0]
        option = socket.IPV6_RECVPKTINFO if host.family == socket.AF_INET6 else IP_PKTINFO
        host.setsockopt(level, option, 1)
        return True

    async def _new_flow(self, sockaddr: bytes, destination: bytes | None):
        from ...linux._mmsg import address

        client = address(sockaddr)
        flow = await self._open(client)
        if flow is None:
            return None
        try:
            if len(self.flows) >= MAX_FLOWS:
                self._evict()
            flow.key = sockaddr
            flow.source = _source(self.host_sock.family, destination)
            self.nursery.start_soon(self._answers, flow)  # from now on, it closes the socket
        except BaseException:
            flow.sock.close()
            raise
        self.flows[sockaddr] = flow
        return flow

    def _evict(self) -> None:
        """End the least recently used flow (its task closes its socket)."""
        _, flow = self.flows.popitem(last=False)
        flow.scope.cancel()
        _log.limited("udp-evict", f"UDP port {self.port}: {MAX_FLOWS} clients: the least "
                                  f"recently active ones make room for new ones",
                     level="info")

    async def _open(self, client: tuple):
        try:
            sock = await self.factory.socket(self.family, socket.SOCK_DGRAM)
        except FactoryGone:
            return None  # the child is gone
        except OSError as exc:  # out of fds, most likely: the next datagram may do
            _log.limited("udp-socket", f"UDP port {self.port}: a client's datagrams are "
                                       f"dropped: {exc.strerror}")
            return None
        try:
            ip = _transparent.client_address(client, self.family) if self.transparent else None
            if ip is not None:
                _transparent.make_transparent(sock, self.family, ip)
            sock.setblocking(False)
            sock.connect(self.child)
        except OSError as exc:
            sock.close()
            _log.debug(f"UDP {self.child}: flow for {client[:2]}: {exc.strerror}")
            return None
        return _Flow(client, sock)

    async def _answers(self, flow: "_Flow") -> None:
        """The flow's task: passes the child's answers on, until the flow is idle or
        evicted. Contained: whatever it raises ends this flow alone."""
        host, flows = self.host_sock, self.flows
        try:
            with flow.scope:
                await self._pass_answers(flow, host, flows)
        except Exception as exc:
            _log.limited("udp-flow", f"UDP port {self.port}: the flow of {flow.client[0]} "
                                     f"failed: {type(exc).__name__}: {exc}")
        finally:
            if flows.get(flow.key) is flow:
                del flows[flow.key]
            flow.sock.close()

    async def _pass_answers(self, flow: "_Flow", host, flows) -> None:
        import trio

        sock = flow.sock
        while True:
            with trio.move_on_at(flow.last + self.idle) as waited:
                await trio.lowlevel.wait_readable(sock)
            if waited.cancelled_caught:
                if trio.current_time() >= flow.last + self.idle:
                    return
                continue
            flow.last = trio.current_time()
            if flows.get(flow.key) is flow:  # not evicted meanwhile
                flows.move_to_end(flow.key)
            for _ in range(_BURST):
                try:
                    data = sock.recv(_MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _TRANSIENT:
                        continue
                    _log.debug(f"UDP flow of {flow.client[:2]}: {exc.strerror}")
                    return
                try:
                    if flow.source:
                        host.sendmsg([data], flow.source, 0, flow.client)
                    else:
                        host.sendto(data, flow.client)
                except OSError as exc:  # a full buffer drops it, as a network would
                    if exc.errno != errno.EAGAIN:
                        _log.debug(f"UDP answer to {flow.client[:2]}: {exc.strerror}")


class _Flow:
    def __init__(self, client: tuple, sock):
        import trio

        self.client, self.sock = client, sock
        self.key = b""
        self.source = []  # ancillary data for sendmsg: answers from where the client sent
        self.last = trio.current_time()
        self.scope = trio.CancelScope()  # cancelled: the flow is evicted

    def send(self, batch, start: int, end: int) -> None:
        """Pass on datagrams start..end-1 of `batch`; those the child's socket does not
        take are dropped, as a network would."""
        fd = self.sock.fileno()
        while start < end:
            try:
                start += batch.send(fd, start, end)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return
                if exc.errno not in _TRANSIENT:
                    _log.debug(f"UDP to the child from {self.client[:2]}: {exc.strerror}")
                start += 1  # the one that failed


def _source(family: int, destination: bytes | None) -> list:
    """sendmsg's ancillary data that sends from `destination` (a PKTINFO)."""
    if destination is None:
        return []
    from ...linux._mmsg import PKTINFO

    level, kind, _, _ = PKTINFO[family]
    if family == socket.AF_INET6:  # in6_pktinfo: address, interface (any)
        return [(level, kind, destination + bytes(4))]
    # in_pktinfo: interface (any), the source to use, (the destination: ignored)
    return [(level, kind, bytes(4) + destination + bytes(4))]
