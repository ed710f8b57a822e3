"""The builtin driver's engine: the ports' loop (`_loop`) on a thread of the parent,
with the socket factory's client and the published ports, TCP (`_tcp`) and UDP
(`_udp`). It starts at the first client of a -p port or the API's first request (its
-p ports listed, or a port added), whichever comes first; other threads (the first
client's, the API's worker) add and remove ports through it."""
from ... import _log, _threads
from . import _relay
from ..._loop import Loop
from ._socket_factory import Factory, FactoryGone
from ._tcp import TcpPort

_CALL_TIMEOUT = 10.0  # s: the loop answers at once, unless the run is ending


class Engine:
    def __init__(self, factory_sock, on_failure):
        self.loop = Loop()
        self.factory = Factory(self.loop, factory_sock)
        self.udp_rules = _UdpRules(self.factory)
        self._on_failure = on_failure  # a message: the run cannot go on
        self._ports: set = set()  # TcpPort and _udp.UdpPort
        self._stopping = False
        self._thread = _threads.Thread(self._run, what="the ports' thread")

    def start(self) -> None:
        """Start the loop's thread. Its failure (errors.OutOfProcesses: no thread now;
        OSError: epoll) leaves nothing behind, the loop closed and nothing asked of the
        socket factory, whose link stays open: the start is tried again whole."""
        try:
            self.factory.watch()  # before the thread runs: nothing else touches the loop yet
            self.loop.call_soon_threadsafe(self.factory.hello)  # the loop's first call
            self._thread.start()
        except BaseException:
            self.loop.close()
            raise
        _relay.pipes.loop = self.loop
        _log.debug("ports: the ports' loop started")

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self.loop.stop()
        self._thread.join(timeout)

    def add_port(self, listener, spec) -> TcpPort:
        """Serve `listener` (a bound, listening socket of the C module `_socket`, ours
        from now on) for `spec`; from any thread but the loop's. Raises what stopped it
        (OSError: epoll could not take it; RuntimeError: the run is ending), the
        listener closed."""
        port = TcpPort(self, listener, spec)
        try:
            self._call(lambda: (port.start(), self._ports.add(port)))
        except BaseException:
            listener.close()
            raise
        return port

    def add_udp_port(self, sock, spec):
        """Serve the bound UDP socket `sock` (of the C module `_socket`, ours from now
        on) for `spec`, once the child routes its answers; from any thread but the
        loop's. Raises as add_port() does, and FactoryGone (the run is ending)."""
        from ._udp import UdpPort

        port = UdpPort(self, sock, spec)

        def start(done):
            def started(result, error):
                if error is None:
                    self._ports.add(port)
                done(result, error)
            port.start(started)
        try:
            self._call(start, waits=True)
        except BaseException:
            sock.close()
            raise
        return port

    def remove_port(self, port) -> None:
        """Close `port` and its connections; returns once they are closed."""
        closed = _threads.Event()
        try:
            self.loop.call_soon_threadsafe(lambda: (self._ports.discard(port),
                                                    port.close(closed.set)))
        except RuntimeError:
            return  # the loop has ended: it closed every port
        closed.wait(_CALL_TIMEOUT)

    def _call(self, function, waits: bool = False):
        """Run `function` on the loop's thread and return what it returns; `waits`:
        what function(done) passes to done(result, error), at once or later."""
        done, box = _threads.Event(), []

        def finish(result, error):
            box.append((result, error))
            done.set()

        def call():
            try:
                if waits:
                    function(finish)
                else:
                    finish(function(), None)
            except BaseException as exc:  # noqa: B902 - raised in the caller's thread
                finish(None, exc)

        self.loop.call_soon_threadsafe(call)
        if not done.wait(_CALL_TIMEOUT):
            raise RuntimeError("the ports' loop does not answer")
        result, error = box[0]
        if error is not None:
            raise error
        return result

    def _run(self) -> None:
        _threads.name("rootless ports")
        try:
            self.loop.run()
        except BaseException as exc:  # noqa: B902 - the run cannot go on without ports
            if not self._stopping:
                self._on_failure(f"the published ports' loop failed: "
                                 f"{type(exc).__name__}: {exc}")
        finally:
            self._close_all()

    def _close_all(self) -> None:
        """On the loop's thread, at its end: every port and connection closed (the
        worker threads told to stop, and waited for), the factory's client and the
        idle pipes too."""
        from . import _bulk

        for port in self._ports:
            port.close(lambda: None)
        self._ports.clear()
        _bulk.join_all()
        self.loop.run_pending()  # the workers' hand-backs: their sockets close now
        self.factory.close()
        _relay.pipes.close()
        self.loop.close()


class _UdpRules:
    """The child's rules that send what its UDP ports answer back to transparent
    sockets (`_transparent`): one per child port, while a published port uses it. On
    the loop."""

    def __init__(self, factory):
        self.factory = factory
        self._users: dict[int, int] = {}  # child port -> published UDP ports using it

    def add(self, child_port: int, done) -> None:
        """done(None) once the rule is there, or not needed, or failed (its flows still
        work, the child sees its own address: said once); done(FactoryGone)."""
        def hello():
            if not self.factory.transparent:
                done(None)
                return
            users = self._users.get(child_port, 0)
            self._users[child_port] = users + 1
            if users:
                done(None)
                return

            def answer(_, error):
                if isinstance(error, FactoryGone):
                    self._users.pop(child_port, None)
                    done(error)
                    return
                if error is not None:
                    _log.warning(f"UDP port {child_port} of the child: cannot route answers "
                                 f"to clients' addresses ({error}); its clients will not be "
                                 f"seen")
                done(None)
            self.factory.udp_rule(True, child_port, answer)
        self.factory.after_hello(hello)

    def remove(self, child_port: int, done) -> None:
        """done(None) once the rule is gone (or others still use it)."""
        users = self._users.get(child_port, 0)
        if users > 1:
            self._users[child_port] = users - 1
        elif users == 1:
            del self._users[child_port]

            def answer(_, error):
                if error is not None:
                    _log.debug(f"UDP port {child_port}: its rule: {error}")
                done(None)
            self.factory.udp_rule(False, child_port, answer)
            return
        done(None)
