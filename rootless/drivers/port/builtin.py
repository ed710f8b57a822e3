"""builtin: the parent listens on the host and forwards each connection (TCP, `_tcp`)
or client flow (UDP, `_udp`) into the child's netns, through sockets made there by the
child's socket factory; the child sees the client's address (`_transparent`) unless
--source-ip-transparent=false.

The ports run on a loop of their own (`_engine`), not under trio (12 MiB, and 60-130
ms of the first client's wait): it starts with the first client of a -p port, or the
API's first request, whichever comes first.
"""
import errno

from ..._listen import backlog
from ...errors import PortSpecError
from .base import FAMILY, PortDriver, bind_failure


class BuiltinPortDriver(PortDriver):
    name = "builtin"
    protos = ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6")
    needs_trio = False  # every port, -p or the API's, goes to the engine

    def preflight(self) -> None:
        from ...errors import UsageError

        if self.config.net == "host":
            raise UsageError("--port-driver=builtin needs a network namespace: use it with "
                             "--net=slirp4netns, pasta or none")
        self.initial = []
        self._early = []  # (_spec_key(spec), its socket), bound by listen_early()
        self._factory_link = self._factory_end = None
        self.engine = None     # _engine.Engine: the ports' loop, from the first client on
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

    def serve_light(self, ready: set[int]) -> list[int]:
        """The first client came on one of the -p fds: start the engine and publish
        every -p on it."""
        self._publish_initial()
        return []

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def _publish_initial(self) -> None:
        """Start the engine and publish the -p ports on it, in -p order (their ids, as
        rootlesskit numbers them). From the services' thread (a -p port's first client)
        or the API's worker: once."""
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
            self._register(*self._publish(self._validated(spec)))

    def prepare_api(self) -> None:
        """The -p ports are listed (and removable) from the API's first request on,
        their first client or not (OSError, out of fds: add_now tries again)."""
        if self.initial:
            self._publish_initial()

    def add_now(self, spec):
        """The API's: the port goes to the engine from this thread."""
        self._publish_initial()  # first: a -p port is known as such (its id, conflicts)
        return self._register(*self._publish(self._validated(spec)))

    def remove_now(self, ident: int) -> None:
        entry = self._known(ident)
        if self._ports.pop(ident, None) is not None:
            entry[1]()  # returns once the port is closed: a client then finds it so

    def _engine_failed(self, message: str) -> None:
        if self.on_failure is not None:
            self.on_failure(message)

    def _publish(self, spec):
        """Publish `spec` on the engine (from a thread other than the engine's):
        (the spec as bound, a closer that returns once the port is closed)."""
        from ...ports import PortsUnavailable

        sock = self._bound(spec)
        if spec.parentPort == 0:
            spec = spec.replace(parentPort=sock.getsockname()[1])
        try:
            if _is_udp(spec.proto):
                port = self.engine.add_udp_port(sock, spec)
            else:
                port = self.engine.add_port(sock, spec)
        except RuntimeError as exc:
            raise PortsUnavailable(f"no port can be added: {exc}") from None
        except OSError as exc:
            raise PortsUnavailable(f"cannot serve the port for now ({exc.strerror}): try "
                                   f"again later") from None
        except Exception as exc:  # FactoryGone
            raise PortsUnavailable(f"no port can be added: {exc} (the run is ending)"
                                   ) from None
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
