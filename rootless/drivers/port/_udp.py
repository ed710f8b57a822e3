"""A published UDP port of the builtin driver, on the ports' loop (`_loop`, as the
TCP ports: trio is not loaded for it): one flow per client address.

The parent's socket on the host receives each client's datagrams; the first one of
a client opens a flow: a UDP socket of the child's netns (from the factory),
connected to the child port, and, when the child may see clients' addresses, bound
to the client's address. What the child answers on it goes back to that client
from the host socket. A flow ends after a while without traffic either way: the
flows are kept least recently active first, and one timer a port, set for the first
one's end, sweeps them.

Each flow is contained: whatever fails in it ends it alone, with one rate-limited
line; a failure while opening one drops that client's datagrams of the moment, and
the port goes on.
"""
import errno
import time
import _socket  # not socket.py: it loads enum (1 MiB), which the ports need not
# The C type itself: the collections package loads keyword, operator and reprlib.
from _collections import OrderedDict

from ... import _log, _tunables
from ..._loop import IN, Watcher
from . import _transparent
from ._socket_factory import FactoryGone


def _idle_timeout(default: float = 60.0) -> float:
    """Seconds without a datagram, either way, before a flow ends (conntrack's UDP
    stream timeout, roughly); ROOTLESS_UDP_FLOW_TIMEOUT overrides it."""
    return _tunables.seconds("ROOTLESS_UDP_FLOW_TIMEOUT", default)


MAX_FLOWS = 4096     # per port: beyond it, a new client's flow ends the least recently
                     # used one (spoofed or 127/8 sources must not lock clients out)
_MAX_DATAGRAM = 65535
_BURST = 64  # datagrams read at most per round of the loop, each way
# What a connected UDP socket reports for an earlier ICMP error: the next
# datagram may well get through (the server may just be starting).
_TRANSIENT = (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
_WAITING = object()  # _open(): the factory answers later


class UdpPort(Watcher):
    """`host_sock`: a bound socket of the C module `_socket`, ours from start() on.
    Datagrams from clients are read and passed on in batches (recvmmsg/sendmmsg): one
    system call each way moves up to _BURST datagrams."""

    def __init__(self, engine, host_sock, spec):
        self.engine, self.loop, self.host_sock, self.spec = (engine, engine.loop, host_sock,
                                                              spec)
        self.child = (spec.childIP or "127.0.0.1", spec.childPort)
        self.port = host_sock.getsockname()[1]  # the published port, for the log
        self.family = _socket.AF_INET6 if ":" in self.child[0] else _socket.AF_INET
        self.idle = _idle_timeout()
        # By the client's sockaddr, the least recently active first.
        self.flows: OrderedDict[bytes, "_Flow"] = OrderedDict()
        self._batch = None
        self._pending = None  # (key, destination, n, start): a flow waits for its socket
        self._now, self._opened = False, None  # see _open
        self._sweep = None    # the timer for the first flow's end
        self._closed = None   # the callback that waits for the port to be closed

    def start(self, done) -> None:
        """On the loop: route the child's answers (a rule in the child, per child port),
        then serve; done(None, error) once serving, or with why it cannot."""
        from ...linux._mmsg import Datagrams

        self._batch = Datagrams(_BURST, _MAX_DATAGRAM + 1, self.host_sock.family,
                                self._ask_destinations())
        self.host_sock.setblocking(False)

        def ruled(error):
            if error is None:
                try:
                    self.loop.watch(self.host_sock.fileno(), IN, self)
                except OSError as exc:
                    error = exc
            done(None, error)
        self.engine.udp_rules.add(self.child[1], ruled)

    def close(self, closed) -> None:
        """Stop serving and end every flow; `closed()` once the port is closed (its
        socket, its flows and the child's rule for its answers)."""
        if self._closed is not None:
            return
        self._closed = closed
        self.loop.watch(self.host_sock.fileno(), 0, self)
        self.host_sock.close()
        if self._sweep is not None:
            self.loop.cancel(self._sweep)
            self._sweep = None
        for flow in list(self.flows.values()):
            self._end(flow)
        self.engine.udp_rules.remove(self.child[1], lambda error: closed())

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
        option = _socket.IPV6_RECVPKTINFO if host.family == _socket.AF_INET6 else IP_PKTINFO
        host.setsockopt(level, option, 1)
        return True

    # -- clients' datagrams --

    def ready(self, fd: int, events: int) -> None:
        try:
            n = self._batch.recv(fd)
        except BlockingIOError:
            return
        except OSError as exc:  # an ICMP error of an earlier answer
            _log.debug(f"UDP {self.child}: {exc.strerror}")
            return
        self._pass_on(n, 0)

    def failed(self, exc: Exception) -> None:
        """A bug while passing datagrams on: those are lost, not the port."""
        _log.limited("udp-port", f"UDP port {self.port}: datagrams dropped: "
                                 f"{type(exc).__name__}: {exc}")

    def _pass_on(self, n: int, start: int, opened=_WAITING) -> None:
        """Pass datagrams start..n-1 of the batch on, a run of one client's at a time.
        `opened`: the flow just opened for the run at `start` (None: none could be)."""
        batch, flows, now = self._batch, self.flows, time.monotonic()
        client = batch.sender(start) if start < n else None
        while start < n:
            # The run of `client`'s datagrams; each sender is read once (the one that
            # ends the run is the next run's client).
            end, sender = start + 1, None
            while end < n and (sender := batch.sender(end)) == client:
                end += 1
            if opened is not _WAITING:
                flow, opened = opened, _WAITING
            else:
                flow = flows.get(client)
                if flow is None:
                    flow = self._open(client, batch.destination(start), n, start)
                    if flow is _WAITING:
                        return  # _got() goes on from here
                else:
                    flows.move_to_end(client)
            if flow is not None:
                flow.last = now
                flow.send(batch, start, end)
            start, client = end, sender
        self._arm_sweep()

    def _open(self, key: bytes, destination: bytes | None, n: int, start: int):
        """A new flow for `key`, None if none can be had now, or _WAITING: the factory
        has no socket at hand, and reading stops until it answers (the batch holds the
        datagrams still to pass on)."""
        self._pending = (key, destination, n, start)
        self._now = True
        try:
            self.engine.factory.socket(self.family, _socket.SOCK_DGRAM, self._got)
        except BaseException:
            self._pending = None  # an answer that comes all the same finds none waiting
            raise
        finally:
            self._now = False
        if self._pending is None:
            return self._opened
        self.loop.watch(self.host_sock.fileno(), 0, self)
        return _WAITING

    def _got(self, sock, error) -> None:
        """The factory's answer (at once, from _open, or later from the loop, where
        nothing may be raised to the factory's client: a failure here is this client's
        datagrams lost, not the port's)."""
        pending, self._pending = self._pending, None
        if pending is None or self._closed is not None:  # nobody waits for it any more
            if sock is not None:
                sock.close()
            return
        key, destination, n, start = pending
        try:
            flow = self._flow(key, destination, sock, error)
        except Exception as exc:
            self.failed(exc)
            flow = None
        if self._now:
            self._opened = flow
            return
        try:
            self.loop.watch(self.host_sock.fileno(), IN, self)
            self._pass_on(n, start, opened=flow)
        except Exception as exc:
            self.failed(exc)

    def _flow(self, key: bytes, destination: bytes | None, sock, error):
        if sock is None:
            if not isinstance(error, FactoryGone):  # an OSError, out of fds most likely:
                # the client's next datagram may do
                _log.limited("udp-socket", f"UDP port {self.port}: a client's datagrams "
                                           f"are dropped: {error.strerror or error}")
            return None
        from ...linux._mmsg import address

        try:
            client = address(key)
            ip = (_transparent.client_address(client, self.family)
                  if self.engine.factory.transparent else None)
            if ip is not None:
                _transparent.make_transparent(sock, self.family, ip)
            sock.setblocking(False)
            sock.connect(self.child)
        except OSError as exc:
            sock.close()
            _log.debug(f"UDP {self.child}: flow for {key!r}: {exc.strerror}")
            return None
        except BaseException:
            sock.close()
            raise
        flow = _Flow(client, sock)
        flow.port, flow.key, flow.source = self, key, _source(self.host_sock.family,
                                                             destination)
        try:
            self.loop.watch(sock.fileno(), IN, flow)
        except BaseException:
            sock.close()
            raise
        if len(self.flows) >= MAX_FLOWS:
            self._evict()
        self.flows[key] = flow
        return flow

    def _evict(self) -> None:
        self._end(next(iter(self.flows.values())))
        _log.limited("udp-evict", f"UDP port {self.port}: {MAX_FLOWS} clients: the least "
                                  f"recently active ones make room for new ones",
                     level="info")

    # -- flows' ends --

    def _end(self, flow: "_Flow") -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        if flow.open:
            flow.open = False
            self.loop.watch(flow.sock.fileno(), 0, flow)
            flow.sock.close()

    def _arm_sweep(self) -> None:
        if self._sweep is None and self.flows and self._closed is None:
            first = next(iter(self.flows.values()))
            self._sweep = self.loop.call_later(
                max(0.0, first.last + self.idle - time.monotonic()), self._swept)

    def _swept(self) -> None:
        """The first flow's end is due: end the flows idle since `idle` seconds."""
        self._sweep = None
        now = time.monotonic()
        while self.flows:
            flow = next(iter(self.flows.values()))
            if flow.last + self.idle > now:
                break
            self._end(flow)
        self._arm_sweep()


class _Flow(Watcher):
    def __init__(self, client: tuple, sock):
        self.client, self.sock = client, sock
        self.port: UdpPort = None
        self.key = b""
        self.source = []  # ancillary data for sendmsg: answers from where the client sent
        self.last = time.monotonic()
        self.open = True

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

    def ready(self, fd: int, events: int) -> None:
        """The child's answers: back to the client, from the host's socket."""
        port = self.port
        self.last = time.monotonic()
        if port.flows.get(self.key) is self:
            port.flows.move_to_end(self.key)
        host = port.host_sock
        for _ in range(_BURST):
            try:
                data = self.sock.recv(_MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                _log.debug(f"UDP flow of {self.client[:2]}: {exc.strerror}")
                port._end(self)
                return
            try:
                if self.source:
                    host.sendmsg([data], self.source, 0, self.client)
                else:
                    host.sendto(data, self.client)
            except OSError as exc:  # a full buffer drops it, as a network would
                if exc.errno != errno.EAGAIN:
                    _log.debug(f"UDP answer to {self.client[:2]}: {exc.strerror}")

    def failed(self, exc: Exception) -> None:
        """A bug in this flow: it ends alone."""
        _log.limited("udp-flow", f"UDP port {self.port.port}: the flow of {self.client[0]} "
                                 f"failed: {type(exc).__name__}: {exc}")
        self.port._end(self)


def _source(family: int, destination: bytes | None) -> list:
    """sendmsg's ancillary data that sends from `destination` (a PKTINFO)."""
    if destination is None:
        return []
    from ...linux._mmsg import PKTINFO

    level, kind, _, _ = PKTINFO[family]
    if family == _socket.AF_INET6:  # in6_pktinfo: address, interface (any)
        return [(level, kind, destination + bytes(4))]
    # in_pktinfo: interface (any), the source to use, (the destination: ignored)
    return [(level, kind, bytes(4) + destination + bytes(4))]
