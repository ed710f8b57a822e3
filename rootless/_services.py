"""The parent's services while the command runs: the REST API on STATE/api.sock and
the port driver, under trio, in a thread of their own.

The main thread keeps the supervision (signal handlers run only there) and does not
wait for this thread to start: trio's import (60 ms) stays off the path to the
command. It also stays off the exit of a short command: the thread lets the first
moments pass before it imports anything, so a command that is done by then never
competes with it for the GIL.
"""
import os
import threading

from . import __version__, _log
from .api import API_VERSION

_GRACE = 0.02  # seconds before the services load: see the module's docstring


class Services:
    def __init__(self, config, state, child_pid: int, network_info, ports):
        self.config, self.state, self.child_pid = config, state, child_pid
        self.network_info, self.ports = network_info, ports
        # The services' failure, in words: the supervisor polls it, prints it and ends
        # the run. It is not printed here: when the run is ending anyway (the command
        # exited, a helper died), the failure is only a consequence, not news.
        self.failed_r, self._failed_w = os.pipe()
        self._lock = threading.Lock()
        self._stopping = False
        self._active = False
        self._running = threading.Event()
        # Set once the port driver and the API listen (or the services gave up):
        # what --notify=ready waits for before READY=1.
        self.started = threading.Event()
        self._stop_requested = threading.Event()
        self._token = None
        self._scope = None
        self._thread = threading.Thread(target=self._run, name="rootless-services",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop_requested.set()
        with self._lock:
            self._stopping = True
            active = self._active
        if active:  # else it never touches the state dir: no need to wait for it
            import trio

            if self._running.wait(timeout):
                try:
                    trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
                except trio.RunFinishedError:
                    pass
            self._thread.join(timeout)
        os.close(self.failed_r)
        os.close(self._failed_w)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self.started.set()  # whatever happened, nobody waits for it any longer

    def _serve(self) -> None:
        if self._stop_requested.wait(_GRACE):
            return
        import trio

        with self._lock:
            if self._stopping:
                return
            self._active = True
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: B902 - reported, then the run ends
            if not self._stopping:
                os.write(self._failed_w, _describe(exc).encode()[:4000] or b"?")

    async def _main(self) -> None:
        import trio

        from .api.router import Router
        from .api.server import serve

        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self._token = trio.lowlevel.current_trio_token()
            self._running.set()
            await nursery.start(self.ports.serve, self.state.path)
            await nursery.start(serve, self.state.file("api.sock"),
                                Router(self.info, self.ports))
            _log.debug(f"API on {self.state.file('api.sock')}")
            self.started.set()

    def info(self):
        from .api.models import Info, NetworkDriverInfo, PortDriverInfo

        net = None
        if self.config.net == "host":
            net = NetworkDriverInfo(driver="")
        else:
            ni = self.network_info
            net = NetworkDriverInfo(driver=self.config.net,
                                    dns=list(ni.dns) if ni else [],
                                    childIP=ni.ip if ni else "")
        port = None
        if self.config.port_driver != "none":
            port = PortDriverInfo(driver=self.ports.name, protos=list(self.ports.protos),
                                  disallowLoopbackChildIP=self.ports.disallow_loopback_child_ip)
        return Info(apiVersion=API_VERSION, version=__version__, stateDir=self.state.path,
                    childPID=self.child_pid, networkDriver=net, portDriver=port)


def _describe(exc: BaseException) -> str:
    from .errors import RootlessError

    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, RootlessError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"port/API services failed: {exc.strerror or exc}"
    return f"port/API services failed: {type(exc).__name__}: {exc}"
