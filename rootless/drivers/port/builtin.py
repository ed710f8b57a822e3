"""builtin: the parent listens on the host and forwards each connection (TCP, `_tcp`)
or client flow (UDP, `_udp`) into the child's netns, through sockets made there by the
child's socket factory; the child sees the client's address (`_transparent`) unless
--source-ip-transparent=false.

TCP ports run on the ports' own loop (`_engine`), not under trio: a run whose clients
all come through TCP ports, -p ones or the API's (rootless Docker's), never loads trio
(12 MiB, and 60-130 ms of the first client's wait). UDP ports are served under trio,
which loads with the first client of a -p one, or when the API adds one.
"""
import errno

from ... import _log
from ..._listen import backlog
from ...errors import PortSpecError
from .base import FAMILY, PortDriver, bind_failure


class BuiltinPortDriver(PortDriver):
    name = "builtin"
    protos = ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6")
    needs_trio = False  # the API's TCP ports go to the engine; its UDP ones to trio

    def preflight(self) -> None:
        from ...errors import UsageError

        if self.config.net == "host":
            raise UsageError("--port-driver=builtin needs a network namespace: use it with "
                             "--net=slirp4netns, pasta or none")
        self.initial = []
        self._early = []  # (_spec_key(spec), its socket), bound by listen_early()
        self._factory_link = self._factory_end = None
        self.engine = None     # _engine.Engine: the ports' loop, from the first client on
        self._deferred = []    # (id, spec): -p UDP ports, published once trio loads
        from ... import _threads

        self._starting = _threads.Lock()  # see _publish_initial
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
        import _socket

        from . import _socket_factory  # noqa: F401 - the child's, loaded before the fork

        self._factory_link, self._factory_end = _socket.socketpair()

    def forked(self, in_child: bool) -> None:
        (self._factory_link if in_child else self._factory_end).close()

    def start_child(self, config, state_dir: str, netns: str | None) -> None:
        from . import _socket_factory

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

    # -- serving --

    def serve_light(self, ready: set[int]) -> list[int] | None:
        """The first client came on the -p fds `ready`. TCP ones are served without
        trio: start the engine and publish every -p (a UDP one keeps its id and waits
        for trio, as its fd does). None: a UDP port's client came, trio must load."""
        udp = {sock.fileno() for key, sock in self._early if _is_udp(key)}
        if ready & udp:
            return None
        self._publish_initial()
        return sorted(udp)

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def _publish_initial(self) -> None:
        """Start the engine, publish the -p TCP ports on it, and give the -p UDP ones
        their ids (in -p order, as rootlesskit numbers them), for serve() to publish.
        From any of the services' threads (the first -p client's, the API's, trio's):
        once."""
        if self.engine is not None:
            return
        with self._starting:
            self._start_engine()

    def _start_engine(self) -> None:
        if self.engine is not None:
            return
        from ._engine import Engine

        engine = Engine(self._factory_link, self._engine_failed)  # OSError: out of fds
        engine.start()
        self.engine = engine  # only now: a failure above is tried again whole
        for spec in self.initial:
            if _is_udp(spec.proto):
                self._deferred.append((self._reserve_id(), spec))
            else:
                self._register(*self._expose_tcp(self._validated(spec)))

    def prepare_api(self) -> None:
        """The -p ports are listed (and removable) from the API's first request on,
        their first client or not (OSError, out of fds: add_now tries again)."""
        if self.initial:
            self._publish_initial()

    def add_now(self, spec):
        """The API's: a TCP port goes to the engine from this thread; a UDP one to trio."""
        self._publish_initial()  # first: a -p port is known as such (its id, conflicts)
        spec = self._validated(spec)
        if _is_udp(spec.proto):
            return super().add_now(spec)
        return self._register(*self._expose_tcp(spec))

    def remove_now(self, ident: int) -> None:
        entry = self._known(ident)
        if _is_udp(entry[0].spec.proto):
            return super().remove_now(ident)  # served under trio
        if self._ports.pop(ident, None) is not None:
            entry[1]()  # returns once the port is closed: a client then finds it so

    def _engine_failed(self, message: str) -> None:
        if self.on_failure is not None:
            self.on_failure(message)

    async def serve(self, state_dir: str, *, task_status) -> None:
        import trio

        from ._socket_factory import TrioFactory

        self._publish_initial()
        self.factory = TrioFactory(self.engine.loop, self.engine.factory)
        self._udp_rules: dict[int, int] = {}  # child port -> published UDP ports using it
        await self.factory.connect()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            deferred, self._deferred = self._deferred, []
            for ident, spec in deferred:
                self._register(*await self._expose(spec), ident=ident)
            task_status.started()
            await trio.sleep_forever()

    async def _expose(self, spec):
        """Under trio only UDP specs come here: add_now() publishes the TCP ones on the
        engine from the API's thread (their closers block: see remove_now)."""
        return await self._expose_udp(spec)

    def _expose_tcp(self, spec):
        """Publish TCP `spec` on the engine (from a thread other than the engine's)."""
        from ...ports import PortsUnavailable

        sock = self._bound(spec)
        if spec.parentPort == 0:
            spec = spec.replace(parentPort=sock.getsockname()[1])
        try:
            port = self.engine.add_port(sock, spec)
        except RuntimeError as exc:
            raise PortsUnavailable(f"no port can be added: {exc}") from None
        except OSError as exc:
            raise PortsUnavailable(f"cannot serve the port for now ({exc.strerror}): try "
                                   f"again later") from None
        engine = self.engine
        return spec, lambda: engine.remove_port(port)  # blocks: see remove_now

    def _bound(self, spec):
        """The host's socket for `spec`: the one listen_early() bound, or a new one."""
        sock = self._take_early(spec)
        if sock is None:
            try:
                sock = _bind(spec)
            except OSError as exc:
                raise bind_failure(exc, spec.proto, spec.parentIP or "0.0.0.0",
                                   spec.parentPort) from None
        return sock

    async def _expose_udp(self, spec):
        import trio

        from ...ports import PortsUnavailable
        from ._socket_factory import FactoryGone
        from ._udp import UdpPort

        import socket

        bound = self._bound(spec)
        sock = socket.socket(bound.family, bound.type, bound.proto, bound.detach())
        if spec.parentPort == 0:
            spec = spec.replace(parentPort=sock.getsockname()[1])
        sock.setblocking(False)
        try:
            await self._add_udp_rule(spec.childPort)
        except FactoryGone:
            sock.close()  # the run is ending: no port to add
            raise PortsUnavailable("the socket factory is gone (the run is ending): "
                                   "no port can be added") from None
        serve = UdpPort(self.factory, sock, spec.childIP or "127.0.0.1", spec.childPort,
                        self.factory.transparent).serve
        scope, closed = trio.CancelScope(), trio.Event()
        self.nursery.start_soon(_until_closed, serve, sock, scope, closed)

        async def close():
            scope.cancel()
            await closed.wait()
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
            except OSError:
                pass
            except Exception as exc:  # FactoryGone: the run is ending
                _log.debug(f"UDP port {child_port}: {exc}")

async def _until_closed(serve, sock, scope, closed) -> None:
    """Run `serve` until `scope` is cancelled; then the socket is closed, and `closed`
    tells the remover it is."""
    try:
        with scope, sock:
            await serve()
    finally:
        closed.set()


def _bind(spec):
    """The host's socket for `spec` (the C module's: socket.py loads enum, 1 MiB that
    a run with TCP ports need not load), bound (and listening, for TCP); OSError if
    it cannot be."""
    import _socket as socket

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
    import _socket as socket

    ip, port = spec.parentIP or "0.0.0.0", spec.parentPort
    if ":" in ip:
        return socket.AF_INET6, ip, port, spec.proto.endswith("6") or ip != "::"
    if ip == "0.0.0.0" and not spec.proto.endswith("4"):
        return socket.AF_INET6, "::", port, False
    return socket.AF_INET, ip, port, True


def _is_udp(key_or_proto: str) -> bool:
    """A UDP spec's proto, or _spec_key of one."""
    return key_or_proto.rsplit("/", 1)[-1].startswith("udp")


def _spec_key(spec) -> str:
    return f"{spec.parentIP}:{spec.parentPort}:{spec.childIP}:{spec.childPort}/{spec.proto}"
