"""The parent's services while the command runs: the REST API on STATE/api.sock and
the port driver, under trio, in a thread of their own.

The main thread keeps the supervision (signal handlers run only there, and the
signals they forward are delivered only there: see start) and does not wait for
this thread to start: trio's import (60 ms) stays off the path to the command. It
also stays off the exit of a short command: the thread lets the first moments pass
before it does anything, so a command that is done by then never competes with it
for the GIL.

Nor does the thread load trio while nobody needs it. The API socket and the port
driver's -p ports are bound before the command starts (parent.Listeners, with the
standard library), and the thread waits for the first client of any of them before it
loads anything: clients wait in the sockets' backlogs meanwhile. The first client of a
port the driver serves without trio (the builtin driver's TCP ports: serve_light)
starts the driver's own loop, and trio waits on; the API's first client, or a UDP
port's, loads trio. Loading trio, h11 and the port driver takes 60-100 ms of a CPU:
taken just as the command started, that stalled a command busy on every CPU (iperf3
through slirp4netns lost 0.25-0.75 s of traffic). trio weighs 12 MiB: an instance
whose clients only come through TCP ports never loads it (docs/memory.md).
"""
import os
# Loaded with this module, before the thread starts: raise_fd_limit needs it as the
# services load, and a limit lowered by then could leave no fd to load it with (0.2 ms,
# once the command runs).
import resource  # noqa: F401
import select
import _signal as signal  # the C module: see _process.py

from .. import __version__, _log, _threads
from .._listen import grow_fd_table, raise_fd_limit
from .._process import FORWARDED_SIGNALS
from ..drivers._component import Component
from ..errors import CAPACITY_ERRNOS
from ..api import API_VERSION

_GRACE = 0.02  # seconds before the services load: see the module's docstring
_RETRY = 0.5   # seconds between tries to load them when the process is out of fds


class Services:
    def __init__(self, config, state, child_pid: int, network_info, ports, listeners):
        self.config, self.state, self.child_pid = config, state, child_pid
        self.network_info, self.ports = network_info, ports
        # Bound by the parent, which closes them after stop() unless taken over here:
        # the API's listening socket, and the fds of the -p ports whose first client
        # loads the services (None: the port driver's serve() must run at once).
        self._listener, self._early = listeners.api, listeners.early
        self._api = None  # the listener as trio serves it (socket.socket), ours to close
        # The services' failure, in words: the supervisor polls it, prints it and ends
        # the run. It is not printed here: when the run is ending anyway (the command
        # exited, a helper died), the failure is only a consequence, not news.
        self.failed_r, self._failed_w = os.pipe()
        # stop() writes here: it wakes the thread wherever it waits before trio runs.
        self._wake_r, self._wake_w = os.pipe()
        self._lock = _threads.Lock()
        self._stopping = False
        self._active = False
        self._running = _threads.Event()
        # Set once the port driver and the API listen (or the services gave up):
        # what --notify=ready waits for before READY=1.
        self.started = _threads.Event()
        self._token = None
        self._scope = None
        self._thread = _threads.Thread(self._run)
        ports.on_failure = self._fail

    def _fail(self, message: str) -> None:
        """The services cannot go on (from any of their threads): the supervisor ends
        the run."""
        if not self._stopping:
            os.write(self._failed_w, message.encode()[:4000] or b"?")

    def start(self) -> None:
        # The thread (and trio's worker threads, which inherit its mask) never takes
        # a signal that is the command's: the kernel gives a process' signal to any
        # thread that does not block it, and only the main thread runs the handlers
        # that forward it. Taken here, systemd's SIGTERM waited unforwarded while the
        # main thread slept on in poll(), until TimeoutStopSec. A thread gets the mask
        # of the one that starts it: blocked around start(), not in the thread, where
        # a signal could come before it is.
        grow_fd_table(self._wake_r)  # while the parent has one thread: see there
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            active = self._active
        os.write(self._wake_w, b"x")
        if active:
            import trio

            if self._running.wait(timeout):
                try:
                    trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
                except trio.RunFinishedError:
                    pass
        # Also when it never loaded trio: it may hold the API socket in the state dir.
        self._thread.join(timeout)
        self.ports.shutdown()  # the port driver's own loop, if it started one
        for fd in (self.failed_r, self._failed_w, self._wake_r, self._wake_w):
            os.close(fd)

    def component(self) -> Component:
        """For the supervisor: the services failed as a whole (one request, one
        connection fails on its own and does not get here)."""
        return Component(self.failed_r, self._failure, events=select.POLLIN)

    def _failure(self) -> str:
        return os.read(self.failed_r, 4096).decode(errors="replace")

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: B902 - reported, then the run ends
            self._fail(_describe(exc))
        finally:
            self.started.set()  # whatever happened, nobody waits for it any longer
            if self._api is not None:
                self._api.close()

    def _serve(self) -> None:
        if self._woken(_GRACE):
            return
        wake = self._early
        if wake is not None:
            _log.debug(f"API on {self.state.file('api.sock')}; the services load at its "
                       f"first connection{' or the first client of a -p port' if wake else ''}")
            self.started.set()
            api = self._listener.fileno()
            while True:
                ready = self._wait(None, also=[api, *wake])
                if ready is None:
                    return
                if api in ready:
                    break
                # the ports that need no trio (serving takes fds: two a connection)
                loaded, wake = self._load(lambda: self.ports.serve_light(ready))
                if not loaded:
                    return
                if wake is None:
                    break
        # Loading takes fds (imports, trio's own), and serving does.
        loaded, trio = self._load(lambda: __import__("trio"))
        if not loaded:
            return
        with self._lock:
            if self._stopping:
                return
            self._active = True
        while True:
            try:
                return trio.run(self._main)
            except OSError as exc:  # trio's own fds (epoll, its wake-up socket pair)
                if self._running.is_set() or exc.errno not in CAPACITY_ERRNOS:
                    raise
                if not self._out_of_fds(exc):
                    return

    def _load(self, load) -> tuple[bool, object]:
        """(True, what `load()` returns): `load` imports (each import opens its files)
        and starts what needs fds. Out of them (the limit of open files lowered under
        us, or every fd in use), it is tried again every _RETRY s, with one line, rather
        than ending the run: the clients wait in the sockets' backlogs meanwhile.
        (False, None) if stop() came first."""
        while True:
            raise_fd_limit()
            try:
                return True, load()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                if not self._out_of_fds(exc):
                    return False, None

    def _out_of_fds(self, exc: OSError) -> bool:
        """Say it (once in a while) and wait _RETRY s; False if stop() came meanwhile."""
        _log.limited("services-fds", f"the port and API services cannot load for now "
                                     f"({exc.strerror}): trying again; their clients wait")
        return not self._woken(_RETRY)

    def _woken(self, timeout: float) -> bool:
        """Wait `timeout` seconds; True if stop() woke us first."""
        return self._wait(timeout) is None

    def _wait(self, timeout: float | None, also: tuple | list = ()) -> set[int] | None:
        """Wait `timeout` seconds (None: no limit) or until fds of `also` are readable:
        those; None if stop() woke us instead."""
        poller = select.poll()
        for fd in (self._wake_r, *also):
            poller.register(fd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(None if timeout is None else timeout * 1000)}
        return None if self._wake_r in ready else ready

    async def _main(self) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self._token = trio.lowlevel.current_trio_token()
            self._running.set()
            await nursery.start(self.ports.serve, self.state.path)
            self.started.set()  # the API listens already (parent.Listeners)
            # The API (h11, its routes and models) loads at its own first client, not
            # at a -p port's: 0.5 MiB and some milliseconds that a port's client would
            # pay for nothing (docs/memory.md).
            await trio.lowlevel.wait_readable(self._listener.fileno())
            while True:  # as _load: out of fds, the API's clients wait, the run goes on
                raise_fd_limit()
                try:
                    from ..api.router import Router
                    from ..api.server import serve

                    self._api = _stdlib_socket(self._listener)
                    break
                except OSError as exc:
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    _log.limited("services-fds", f"the API cannot load for now "
                                                 f"({exc.strerror}): trying again; its "
                                                 f"clients wait")
                    await trio.sleep(_RETRY)
            await nursery.start(serve, self._api, Router(self.info, self.ports))
            _log.debug(f"API on {self.state.file('api.sock')}")

    def info(self):
        from ..api.models import Info, NetworkDriverInfo, PortDriverInfo

        net = None
        if self.config.net == "host":
            net = NetworkDriverInfo(driver="")
        else:
            from ..drivers import network

            ni = self.network_info
            dynamic = getattr(network.get(self.config.net), "dynamic_child_ip", False)
            net = NetworkDriverInfo(driver=self.config.net,
                                    dns=list(ni.dns) if ni else [],
                                    childIP=ni.ip if ni else "", dynamicChildIP=dynamic)
        port = None
        if self.config.port_driver != "none":
            port = PortDriverInfo(driver=self.ports.name, protos=list(self.ports.protos),
                                  disallowLoopbackChildIP=self.ports.disallow_loopback_child_ip)
        return Info(apiVersion=API_VERSION, version=__version__, stateDir=self.state.path,
                    childPID=self.child_pid, networkDriver=net, portDriver=port)


def _stdlib_socket(sock):
    """socket.socket (what the server wants) for a listener bound with _socket, the C
    module (socket.py and its enum stay off the path to the command): the same fd,
    detached from `sock`."""
    import socket

    if isinstance(sock, socket.socket):
        return sock
    return socket.socket(sock.family, sock.type, sock.proto, sock.detach())


def _describe(exc: BaseException) -> str:
    from ..errors import RootlessError

    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, RootlessError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"port/API services failed: {exc.strerror or exc}"
    return f"port/API services failed: {type(exc).__name__}: {exc}"
