"""The builtin driver's engine: the ports' loop (`_loop`) on a thread of the parent,
with the socket factory's client and the published TCP ports. It starts at the first
client of a -p TCP port, the API's first request (its -p ports listed, or a port
added) or trio's services' start, whichever comes first; other threads (the API's
worker, trio's) add and remove ports through it."""
from ... import _log, _threads
from . import _relay
from ..._loop import Loop
from ._socket_factory import Factory
from ._tcp import TcpPort

_CALL_TIMEOUT = 10.0  # s: the loop answers at once, unless the run is ending


class Engine:
    def __init__(self, factory_sock, on_failure):
        self.loop = Loop()
        self.factory = Factory(self.loop, factory_sock)
        self._on_failure = on_failure  # a message: the run cannot go on
        self._ports: set[TcpPort] = set()
        self._stopping = False
        self._thread = _threads.Thread(self._run)

    def start(self) -> None:
        _relay.pipes.loop = self.loop
        self.factory.start()  # before the thread runs: nothing else touches the loop yet
        self._thread.start()
        _log.debug("ports: the TCP ports' loop started")

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

    def remove_port(self, port: TcpPort) -> None:
        """Close `port` and its connections; returns once they are closed."""
        closed = _threads.Event()
        try:
            self.loop.call_soon_threadsafe(lambda: (self._ports.discard(port),
                                                    port.close(closed.set)))
        except RuntimeError:
            return  # the loop has ended: it closed every port
        closed.wait(_CALL_TIMEOUT)

    def _call(self, function):
        """Run `function` on the loop's thread and return what it returns."""
        done, box = _threads.Event(), []

        def call():
            try:
                box.append((function(), None))
            except BaseException as exc:  # noqa: B902 - raised in the caller's thread
                box.append((None, exc))
            finally:
                done.set()

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
