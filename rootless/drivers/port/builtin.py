"""builtin: the parent listens on the host and forwards each connection into the
child's netns, through sockets made there by the child's socket factory.

TCP for now; UDP and the client's source address (IP_TRANSPARENT) are not done yet.
"""
import errno
import os

from ... import _log
from . import _relay, _socket_factory
from .base import PortDriver

_BATCH = 64  # sockets a factory request brings (SCM_RIGHTS passes at most 253)


class BuiltinPortDriver(PortDriver):
    name = "builtin"
    protos = ("tcp", "tcp4", "tcp6")

    def preflight(self) -> None:
        from ...errors import UsageError
        from ...portspec import parse, validate

        if self.config.net == "host":
            raise UsageError("--port-driver=builtin needs a network namespace: use it with "
                             "--net=slirp4netns, pasta or none")
        self.initial = [validate(parse(text)) for text in self.config.publish]
        for spec in self.initial:
            if spec.proto not in self.protos:
                raise UsageError(f"-p {_socket_text(spec)}: {spec.proto} is not supported by "
                                 f"the builtin port driver yet (it supports "
                                 f"{', '.join(self.protos)})")

    @staticmethod
    def start_child(state_dir: str, netns: str | None) -> None:
        _socket_factory.start(state_dir, netns)

    async def serve(self, state_dir: str, *, task_status) -> None:
        import socket
        import trio

        _relay.raise_fd_limit()
        self._pools = {4: [], 6: []}
        self._factory_lock = trio.Lock()
        path = os.path.join(state_dir, _socket_factory.FACTORY_SOCKET)
        # A plain socket (recv_fds wants one), non-blocking, driven by wait_readable.
        self._factory = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._factory.connect(path)
        self._factory.setblocking(False)
        with self._factory:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                for spec in self.initial:
                    await self.add(spec)
                task_status.started()
                await trio.sleep_forever()

    async def _child_socket(self, version: int):
        """An unconnected TCP socket in the child's netns, from the pool."""
        import socket
        import trio

        pool = self._pools[version]
        if not pool:
            async with self._factory_lock:
                if not pool:
                    self._factory.send(str(version).encode() + bytes([_BATCH]))  # 2 bytes
                    pool.extend(await _receive_fds(self._factory, _BATCH))
        fd = pool.pop()
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        # A plain non-blocking socket, driven by trio.lowlevel: trio's wrapper (type
        # probing, address resolution) costs a tenth of a short connection's time.
        sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        sock.setblocking(False)
        return sock

    async def _expose(self, spec):
        import msgspec
        import socket
        import trio
        from ...api.router import ApiFailure

        family, address, v6only = _listen_address(spec)
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        try:
            await sock.bind((address, spec.parentPort))
        except OSError as exc:
            sock.close()
            raise ApiFailure(409, f"cannot listen on {spec.parentIP}:{spec.parentPort}: "
                             f"{exc.strerror}") from None
        sock.listen(1024)
        if spec.parentPort == 0:
            spec = msgspec.structs.replace(spec, parentPort=sock.getsockname()[1])
        scope, closed = trio.CancelScope(), trio.Event()
        self.nursery.start_soon(self._accept_loop, sock, spec, scope, closed)

        async def close():
            scope.cancel()
            await closed.wait()
        return spec, close

    async def _accept_loop(self, sock, spec, scope, closed) -> None:
        import trio

        try:
            with scope, sock:
                async with trio.open_nursery() as conns:
                    while True:
                        client, _ = await sock.accept()
                        conns.start_soon(self._forward, client, spec)
        finally:
            closed.set()

    async def _forward(self, client, spec) -> None:
        import socket
        import trio

        child_ip = spec.childIP or "127.0.0.1"
        version = 6 if ":" in child_ip else 4
        with client:
            try:
                inner = await self._child_socket(version)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the child is gone: the client sees the connection close
            with inner:
                error = inner.connect_ex((child_ip, spec.childPort))
                if error == errno.EINPROGRESS:
                    await trio.lowlevel.wait_writable(inner)
                    error = inner.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:  # nothing listens there: close the client at once
                    _log.debug(f"port {spec.parentPort}: connecting to {child_ip}:"
                               f"{spec.childPort} in the child: {os.strerror(error)}")
                    return
                await _relay.relay(client, inner)


async def _receive_fds(sock, count: int) -> list[int]:
    import socket
    import trio

    fds: list[int] = []
    while len(fds) < count:
        await trio.lowlevel.wait_readable(sock)
        try:
            data, new, _, _ = socket.recv_fds(sock, count, count - len(fds))
        except BlockingIOError:
            continue
        if not data:
            raise trio.BrokenResourceError("the child's socket factory is gone")
        fds.extend(new)
    return fds


def _listen_address(spec):
    """(family, address, v6only). tcp/udp on 0.0.0.0 listen dual-stack, as Go's net
    package does for rootlesskit; tcp4/tcp6 one family each."""
    import socket

    ip = spec.parentIP or "0.0.0.0"
    if ":" in ip:
        return socket.AF_INET6, ip, spec.proto.endswith("6") or ip != "::"
    if ip == "0.0.0.0" and not spec.proto.endswith("4"):
        return socket.AF_INET6, "::", False
    return socket.AF_INET, ip, True


def _socket_text(spec) -> str:
    return f"{spec.parentIP}:{spec.parentPort}:{spec.childIP}:{spec.childPort}/{spec.proto}"
