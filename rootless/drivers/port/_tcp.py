"""A published TCP port of the builtin driver, on the ports' loop (`_loop`): accept a
client, get a socket of the child's netns from the socket factory, connect it to the
child's port (from the client's address when the child may see it: `_transparent`),
then relay (`_relay`).

Each connection is contained: whatever fails in it ends it alone, its sockets closed,
with one rate-limited line; the port and the run go on.
"""
import errno
import os
import _socket  # not socket.py: it loads enum (1 MiB), which the ports need not

from ... import _log
from ..._listen import SpareFd
from . import _relay, _transparent
from ..._loop import IN, OUT, Watcher
from ._socket_factory import FactoryGone

_ACCEPTS = 16  # clients taken per round: a burst does not keep the loop from the others
_PAUSE = 0.1   # s: accepting pauses this long when the process is out of fds or memory
# accept(2)'s errors that belong to one client, gone already: the next one may do.
_CLIENT_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                          errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
                          errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
                          errno.ECONNRESET, errno.ETIMEDOUT})

_spare: list[SpareFd] = []  # the loop's fd in reserve, for when fds run out


class TcpPort(Watcher):
    def __init__(self, engine, listener, spec):
        self.engine, self.loop, self.listener, self.spec = engine, engine.loop, listener, spec
        self.child = (spec.childIP or "127.0.0.1", spec.childPort)
        self.family = _socket.AF_INET6 if ":" in self.child[0] else _socket.AF_INET
        self.connections: set = set()  # _Connecting and _relay.Relay
        self._closed = None  # the callback that waits for the port to be closed
        self._paused = None

    def start(self) -> None:
        if not _spare:
            _spare.append(SpareFd())  # taken now, while fds are plenty
        self.listener.setblocking(False)
        self.loop.watch(self.listener.fileno(), IN, self)

    def close(self, closed) -> None:
        """Stop accepting and end every connection; `closed()` once all are closed."""
        if self._paused is not None:
            self.loop.cancel(self._paused)
        else:
            self.loop.watch(self.listener.fileno(), 0, self)
        self.listener.close()
        self._closed = closed
        for connection in list(self.connections):
            connection.close()
        self._ended(None)

    def _ended(self, connection) -> None:
        self.connections.discard(connection)
        if self._closed is not None and not self.connections:
            closed, self._closed = self._closed, None
            closed()

    # -- accepting --

    def ready(self, fd: int, events: int) -> None:
        for _ in range(_ACCEPTS):
            try:
                fd, peer = self.listener._accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _CLIENT_GONE:
                    continue
                self._accept_failed(exc)
                return
            client = _socket.socket(self.listener.family, _socket.SOCK_STREAM, 0, fd)
            connection = _Connecting(self, client, peer)
            self.connections.add(connection)
            connection.start()

    def failed(self, exc: Exception) -> None:
        _log.limited("port-accept", f"port {self.spec.parentPort}: accepting: "
                                    f"{type(exc).__name__}: {exc}")

    def _accept_failed(self, exc: OSError) -> None:
        """Out of fds, close what waits in the backlog (the clients see their connections
        end rather than wait for an fd that may not come) and pause, as for anything
        else (out of memory: ENOBUFS, ENOMEM), so that the loop does not spin while
        connections end."""
        port = self.spec.parentPort
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            self._refuse_waiting()
            _log.limited("port-fds", f"port {port}: out of file descriptors ({exc.strerror}): "
                                     f"new connections are closed until some end")
        else:
            _log.limited("port-accept", f"port {port}: cannot accept connections for now: "
                                        f"{exc.strerror}")
        self.loop.watch(self.listener.fileno(), 0, self)
        self._paused = self.loop.call_later(_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        self.loop.watch(self.listener.fileno(), IN, self)

    def _refuse_waiting(self) -> None:
        """Reset the connections waiting in the backlog (there may be none: accept()
        says EMFILE before it looks), through the fd held in reserve."""
        spare = _spare[0]
        if not spare.release():
            return
        try:
            while True:
                fd, _ = self.listener._accept()  # OSError: none left, or no fd after all
                conn = _socket.socket(self.listener.family, _socket.SOCK_STREAM, 0, fd)
                _relay.reset_on_close(conn)
                conn.close()
        except OSError:
            pass
        finally:
            spare.restore()


class _Connecting(Watcher):
    """A client accepted, until its connection into the child is made."""

    def __init__(self, port: TcpPort, client, peer):
        self.port, self.client, self.peer = port, client, peer
        self.inner = None
        self.closed = False

    def start(self) -> None:
        try:
            self.client.setblocking(False)
            self.port.engine.factory.socket(self.port.family, _socket.SOCK_STREAM, self._got)
        except Exception as exc:
            self.failed(exc)

    def _got(self, inner, error) -> None:
        if self.closed:  # the port was removed meanwhile
            if inner is not None:
                inner.close()
            return
        if error is not None:
            if not isinstance(error, FactoryGone):  # gone: the client sees it close
                _log.limited("port-socket", f"port {self.port.spec.parentPort}: a client's "
                                            f"connection is closed: "
                                            f"{getattr(error, 'strerror', None) or error}")
            self.close()
            return
        self.inner = inner
        try:
            self._connect()
        except Exception as exc:
            self.failed(exc)

    def _connect(self) -> None:
        """Connect to the child's port, from the client's address when the child may
        see it."""
        port, inner = self.port, self.inner
        ip = (_transparent.client_address(self.peer, port.family)
              if port.engine.factory.transparent else None)
        try:
            if ip is not None:
                _transparent.make_transparent(inner, port.family, ip)
            inner.setblocking(False)
            error = inner.connect_ex(port.child)
        except OSError as exc:
            error = exc.errno
        if error == errno.EINPROGRESS:
            port.loop.watch(inner.fileno(), OUT, self)
        else:
            self._connected(error)

    def ready(self, fd: int, events: int) -> None:
        error = self.inner.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if not error:
            try:
                self.inner.getpeername()
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    return  # a report meant for an fd closed earlier in the round
                error = exc.errno
        self.port.loop.watch(self.inner.fileno(), 0, self)
        self._connected(error)

    def _connected(self, error: int) -> None:
        port = self.port
        if error:  # nothing listens there: close the client at once
            _log.debug(f"port {port.spec.parentPort}: connecting to {port.child[0]}:"
                       f"{port.child[1]} in the child: {os.strerror(error)}")
            self.close()
            return
        port.connections.discard(self)
        relay = _relay.Relay(port.loop, self.client, self.inner, port._ended)
        port.connections.add(relay)
        self.closed = True  # the relay has the sockets now
        try:
            relay.start()
        except Exception as exc:  # epoll cannot take its sockets: it alone fails
            relay.failed(exc)

    def failed(self, exc: Exception) -> None:
        _log.limited("port-connection", f"port {self.port.spec.parentPort}: a connection "
                                        f"from {self.peer[0]} failed: "
                                        f"{type(exc).__name__}: {exc}")
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.inner is not None:
            try:
                self.port.loop.watch(self.inner.fileno(), 0, self)
            except OSError:
                pass
            self.inner.close()
        self.client.close()
        self.port._ended(self)
