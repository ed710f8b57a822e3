"""builtin: the parent listens on the host and forwards each connection (TCP) or
client flow (UDP, `_udp`) into the child's netns, through sockets made there by the
child's socket factory; the child sees the client's address (`_transparent`) unless
--source-ip-transparent=false.
"""
import errno
import os
from functools import partial

from ... import _log
from ..._listen import backlog, spare_fd
from ...errors import PortSpecError
from . import _relay, _socket_factory, _transparent
from ._udp import UdpPort
from .base import FAMILY, PortDriver, bind_failure


class BuiltinPortDriver(PortDriver):
    name = "builtin"
    protos = ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6")

    def preflight(self) -> None:
        from ...errors import UsageError

        if self.config.net == "host":
            raise UsageError("--port-driver=builtin needs a network namespace: use it with "
                             "--net=slirp4netns, pasta or none")
        self.initial = []
        self._early = []  # (_spec_key(spec), its socket), bound by listen_early()
        self._factory_link = self._factory_end = None
        if not self.config.publish:
            return  # portspec (re, ipaddress: 1-2 ms) only when there are specs
        from ...portspec import parse, validate, written

        self.initial = [validate(parse(text)) for text in self.config.publish]
        for text, spec in zip(self.config.publish, self.initial):
            if spec.proto not in self.protos:
                raise UsageError(f"-p {written(text)}: {spec.proto} is not supported by "
                                 f"the builtin port driver (it supports "
                                 f"{', '.join(self.protos)})")

    def link_child(self) -> None:
        """The socket factory's connection: a socket pair made before the fork, so that
        it is there before the command starts, and nothing later depends on a path in
        the state dir (logind or tmpfiles may remove the dir under a live run)."""
        import socket

        self._factory_link, self._factory_end = socket.socketpair()

    def forked(self, in_child: bool) -> None:
        (self._factory_link if in_child else self._factory_end).close()

    def start_child(self, config, state_dir: str, netns: str | None) -> None:
        _socket_factory.start(self._factory_end, netns, config.source_ip_transparent)

    def components(self) -> list:
        from .._component import Component

        return [Component(self._factory_link.fileno(), lambda: (
            "the socket factory (it makes the sockets of published ports in the "
            "namespace) died while the command was running: the published ports cannot "
            "reach it any more; stopping the command"), in_child=True)]

    def listen_early(self) -> list[int]:
        """The -p ports listen from the start; the relays load at their first client."""
        for text, spec in zip(self.config.publish, self.initial):
            try:
                self._early.append((_spec_key(spec), _bind(spec)))
            except OSError as exc:  # those bound so far: close_early(), as always
                from ...portspec import written
                raise PortSpecError(f"-p {written(text)}: {self._early_failure(spec, exc)}"
                                    ) from None
        return [sock.fileno() for _, sock in self._early]

    def _early_failure(self, spec, exc: OSError) -> str:
        """Why -p `spec` cannot be bound: an earlier -p of the same port, or the host."""
        from ...portspec import format as text

        family, wildcards = FAMILY[spec.proto], ("", "0.0.0.0", "::")
        for other in self.initial[:len(self._early)] if exc.errno == errno.EADDRINUSE else ():
            if (FAMILY[other.proto] == family and other.parentPort == spec.parentPort
                    and (other.parentIP == spec.parentIP or other.parentIP in wildcards
                         or spec.parentIP in wildcards)):
                return (f"{family} port {spec.parentPort} is already published by "
                        f"-p {text(other)}: publish each port once")
        return str(bind_failure(exc, spec.proto, spec.parentIP or "0.0.0.0", spec.parentPort))

    def close_early(self) -> None:
        for _, sock in self._early:
            sock.close()
        self._early = []
        if self._factory_link is not None:
            self._factory_link.close()

    def _take_early(self, spec):
        """The socket listen_early() bound for `spec`, if any (each once)."""
        key = _spec_key(spec)
        for i, (bound, sock) in enumerate(self._early):
            if bound == key:
                del self._early[i]
                return sock
        return None

    async def serve(self, state_dir: str, *, task_status) -> None:
        import trio

        self.factory = _socket_factory.Factory(self._factory_link)
        self._udp_rules: dict[int, int] = {}  # child port -> published UDP ports using it
        await self.factory.connect()
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                for spec in self.initial:
                    await self.add(spec)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.factory.close()

    async def _expose(self, spec):
        import trio
        from ...ports import PortsUnavailable

        udp = spec.proto.startswith("udp")
        sock = self._take_early(spec)
        if sock is None:
            try:
                sock = _bind(spec)
            except OSError as exc:
                raise bind_failure(exc, spec.proto, spec.parentIP or "0.0.0.0",
                                   spec.parentPort) from None
        if spec.parentPort == 0:
            spec = spec.replace(parentPort=sock.getsockname()[1])
        if udp:
            sock.setblocking(False)
            try:
                await self._add_udp_rule(spec.childPort)
            except _socket_factory.FactoryGone:
                sock.close()  # the run is ending: no port to add
                raise PortsUnavailable("the socket factory is gone (the run is ending): "
                                       "no port can be added") from None
            serve = UdpPort(self.factory, sock, spec.childIP or "127.0.0.1", spec.childPort,
                            self.factory.transparent).serve
        else:
            sock = trio.socket.from_stdlib_socket(sock)
            serve = partial(self._accept_loop, sock, spec)
        scope, closed = trio.CancelScope(), trio.Event()
        self.nursery.start_soon(_until_closed, serve, sock, scope, closed)

        async def close():
            scope.cancel()
            await closed.wait()
            if udp:
                await self._remove_udp_rule(spec.childPort)
        return spec, close

    async def _add_udp_rule(self, child_port: int) -> None:
        """Answers from the child's UDP port reach transparent sockets (`_transparent`)."""
        if not self.factory.transparent:
            return
        users = self._udp_rules.get(child_port, 0)
        if not users:
            try:
                await self.factory.udp_rule(True, child_port)
            except OSError as exc:
                # The flows still work if not transparent: say so, but don't refuse.
                _log.warning(f"UDP port {child_port} of the child: cannot route answers to "
                             f"clients' addresses ({exc}); its clients will not be seen")
                return
        self._udp_rules[child_port] = users + 1

    async def _remove_udp_rule(self, child_port: int) -> None:
        users = self._udp_rules.get(child_port, 0)
        if users > 1:
            self._udp_rules[child_port] = users - 1
        elif users == 1:
            del self._udp_rules[child_port]
            try:
                await self.factory.udp_rule(False, child_port)
            except (OSError, _socket_factory.FactoryGone):
                pass

    async def _accept_loop(self, sock, spec) -> None:
        import trio

        spare_fd()  # taken now, while fds are plenty
        async with trio.open_nursery() as conns:
            while True:
                try:
                    client, peer = await sock.accept()
                except OSError as exc:
                    await _accept_failed(sock, spec.parentPort, exc)
                    continue
                conns.start_soon(self._forward, client, peer, spec)

    async def _forward(self, client, peer, spec) -> None:
        """One connection, contained: whatever it raises ends it alone, its sockets
        closed, with one rate-limited line; the port and the run go on."""
        import socket

        child = (spec.childIP or "127.0.0.1", spec.childPort)
        family = socket.AF_INET6 if ":" in child[0] else socket.AF_INET
        with client:
            try:
                try:
                    inner = await self.factory.socket(family, socket.SOCK_STREAM)
                except _socket_factory.FactoryGone:
                    return  # the child is gone: the client sees the connection close
                except OSError as exc:  # out of fds, most likely: the next one may do
                    _log.limited("port-socket", f"port {spec.parentPort}: a client's "
                                                f"connection is closed: {exc.strerror}")
                    return
                with inner:
                    if await self._connect(inner, family, child, peer, spec):
                        await _relay.relay(client, inner)
            except* Exception as failure:
                _log.limited("port-connection", f"port {spec.parentPort}: a connection "
                                                f"from {peer[0]} failed: {_first(failure)}")

    async def _connect(self, inner, family, child, peer, spec) -> bool:
        """Connect `inner` to the child's port, from the client's address when the
        child may see it; False (logged) if it cannot be."""
        import socket
        import trio

        ip = _transparent.client_address(peer, family) if self.factory.transparent else None
        try:
            if ip is not None:
                _transparent.make_transparent(inner, family, ip)
            # A plain non-blocking socket, driven by trio.lowlevel: trio's wrapper
            # costs a tenth of a short connection's time.
            inner.setblocking(False)
            error = inner.connect_ex(child)
            if error == errno.EINPROGRESS:
                await trio.lowlevel.wait_writable(inner)
                error = inner.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            error = exc.errno
        if error:  # nothing listens there: close the client at once
            _log.debug(f"port {spec.parentPort}: connecting to {child[0]}:{child[1]} "
                       f"in the child: {os.strerror(error)}")
        return not error


# accept(2)'s errors that belong to one client, gone already: the next one may do.
_CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                          errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                          errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
                          errno.ECONNRESET, errno.ETIMEDOUT})
_PAUSE = 0.1  # s: accepting pauses this long when the process is out of fds or memory


async def _accept_failed(listener, port: int, exc: OSError) -> None:
    """accept() failed: if the client is gone, go on; if the process is out of fds,
    close what waits in the backlog (the clients see their connections end rather
    than wait for an fd that may not come) and pause, as for anything else (out of
    memory: ENOBUFS, ENOMEM), so that the loop does not spin while connections end."""
    import trio

    if exc.errno in _CLIENT_GONE:
        return
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        _refuse_waiting(listener)
        _log.limited("port-fds", f"port {port}: out of file descriptors ({exc.strerror}): "
                                 f"new connections are closed until some end")
    else:
        _log.limited("port-accept", f"port {port}: cannot accept connections for now: "
                                    f"{exc.strerror}")
    await trio.sleep(_PAUSE)


def _refuse_waiting(listener) -> None:
    """Reset the connections waiting in `listener`'s backlog (there may be none:
    accept() says EMFILE before it looks), through the fd held in reserve."""
    import socket

    spare = spare_fd()
    if not spare.release():
        return
    waiting = None
    try:
        waiting = socket.socket(fileno=listener.fileno())  # trio's, borrowed: not closed
        while True:
            conn, _ = waiting.accept()  # OSError: none left (EAGAIN), or no fd after all
            with conn:
                _relay.reset_on_close(conn)
    except OSError:
        pass
    finally:
        if waiting is not None:
            waiting.detach()
        spare.restore()


def _first(failure: BaseException) -> str:
    """What an exception (or the first of a group) says, in a line."""
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    return f"{type(failure).__name__}: {failure}"


async def _until_closed(serve, sock, scope, closed) -> None:
    """Run `serve` until `scope` is cancelled; then the socket is closed, and `closed`
    tells the remover it is."""
    try:
        with scope, sock:
            await serve()
    finally:
        closed.set()


def _bind(spec):
    """The host's stdlib socket for `spec`, bound (and listening, for TCP); OSError if
    it cannot be."""
    import socket

    udp = spec.proto.startswith("udp")
    family, ip, port, v6only = _listen_address(spec)
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        if not udp:  # a UDP port shared by accident would split the flows between sockets
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        sock.bind((ip, port))
        if not udp:
            sock.listen(backlog())
    except BaseException:
        sock.close()
        raise
    return sock


def _listen_address(spec):
    """(family, address, port, v6only). tcp/udp on 0.0.0.0 listen dual-stack, as Go's
    net package does for rootlesskit; tcp4/tcp6 one family each."""
    import socket

    ip, port = spec.parentIP or "0.0.0.0", spec.parentPort
    if ":" in ip:
        return socket.AF_INET6, ip, port, spec.proto.endswith("6") or ip != "::"
    if ip == "0.0.0.0" and not spec.proto.endswith("4"):
        return socket.AF_INET6, "::", port, False
    return socket.AF_INET, ip, port, True


def _spec_key(spec) -> str:
    return f"{spec.parentIP}:{spec.parentPort}:{spec.childIP}:{spec.childPort}/{spec.proto}"
