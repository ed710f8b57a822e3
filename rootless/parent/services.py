"""The parent's services while the command runs: the REST API on STATE/api.sock and
the port driver, in threads of their own.

The main thread keeps the supervision (signal handlers run only there, and the
signals they forward are delivered only there: see start) and does not wait for
the services' thread to start. Nor does the thread load anything at once: it lets the
first moments pass, so a short command that is done by then never competes with it
for the GIL, and then waits for the first client. The API socket and the port
driver's -p ports are bound before the command starts (parent.Listeners, with the
C module _socket), and clients wait in the sockets' backlogs meanwhile.

- The first client of a port the driver serves without trio (the builtin driver's
  ports, TCP and UDP: serve_light) starts the driver's own loop
  (drivers/port/_engine.py).
- The API's first client loads the API (h11, msgspec, the router: api/server.py) and
  this thread then runs it, on a loop of its own (rootless._loop), not trio.
- trio loads, in a thread of its own, only for a port driver that serves under it
  (slirp4netns', implicit: `needs_trio`, or serve() that must run at once).

Loading takes a CPU for a moment: taken just as the command started, that stalled a
command busy on every CPU (iperf3 through slirp4netns lost 0.25-0.75 s of traffic).
trio weighs 12 MiB and 60-130 ms: an instance whose ports the builtin driver serves
never loads it, whether they are published with -p or through the API
(docs/memory.md).
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
from ..errors import CAPACITY_ERRNOS, OutOfProcesses
from ..api import API_VERSION

_GRACE = 0.02  # seconds before the services load: see the module's docstring
_RETRY = 0.5   # seconds between tries to load them when the process is out of fds
_TRIO_WAIT = 30.0  # seconds an API request waits for trio's services to start


class Services:
    def __init__(self, config, state, child_pid: int, network_info, ports, listeners):
        self.config, self.state, self.child_pid = config, state, child_pid
        self.network_info, self.ports = network_info, ports
        # Bound by the parent, which closes them after stop(): the API's listening
        # socket, and the fds of the -p ports whose first client loads the services
        # (None: the port driver's serve() must run at once).
        self._listener, self._early = listeners.api, listeners.early
        # The services' failure, in words: the supervisor polls it, prints it and ends
        # the run. It is not printed here: when the run is ending anyway (the command
        # exited, a helper died), the failure is only a consequence, not news.
        self.failed_r, self._failed_w = os.pipe()
        # stop() writes here: it wakes every thread of ours wherever it waits.
        self._wake_r, self._wake_w = os.pipe()
        self._lock = _threads.Lock()
        self._stopping = False
        # Set once the port driver and the API listen (or the services gave up):
        # what --notify=ready waits for before READY=1.
        self.started = _threads.Event()
        self._thread = _threads.Thread(self._run, what="the thread of the ports and the API")
        # trio's services, once something needs them: their thread; set once trio runs
        # (its token known, so stop() can cancel it, serve() still starting), and once
        # the port driver serves (add() may run), or either will not happen.
        self._trio = None
        self._trio_running = _threads.Event()
        self._trio_ready = _threads.Event()
        self._token = self._scope = None
        self._serving = False
        ports.on_failure = self._fail
        ports.run_in_trio = self.run_in_trio

    def _fail(self, message: str) -> None:
        """The services cannot go on (from any of their threads): the supervisor ends
        the run."""
        if not self._stopping:
            os.write(self._failed_w, message.encode()[:4000] or b"?")

    def start(self) -> None:
        # The threads (and trio's worker threads, which inherit their mask) never take
        # a signal that is the command's: the kernel gives a process' signal to any
        # thread that does not block it, and only the main thread runs the handlers
        # that forward it. Taken here, systemd's SIGTERM waited unforwarded while the
        # main thread slept on in poll(), until TimeoutStopSec. A thread gets the mask
        # of the one that starts it: blocked around start(), not in the thread, where
        # a signal could come before it is (the threads it starts inherit it).
        grow_fd_table(self._wake_r)  # while the parent has one thread: see there
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            trio_thread = self._trio
        os.write(self._wake_w, b"x")  # never read: every waiter sees it
        if trio_thread is not None:
            if self._trio_running.wait(timeout) and self._token is not None:
                import trio

                try:
                    trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
                except trio.RunFinishedError:
                    pass
            trio_thread.join(timeout)
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

    # -- the services' thread --

    def _run(self) -> None:
        _threads.name("rootless api")
        try:
            self._serve()
        except BaseException as exc:  # noqa: B902 - reported, then the run ends
            self._fail(_describe(exc))
        finally:
            self.started.set()  # whatever happened, nobody waits for it any longer

    def _serve(self) -> None:
        if self._woken(_GRACE):
            return
        wake = self._early
        if wake is None:
            if not self._load(self._start_trio)[0]:  # it sets `started` once the driver serves
                return
            wake = []
        else:
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
            wake = self._serve_early(ready)
            if wake is None:
                return
        if self.ports.needs_trio and not self._load(self._start_trio)[0]:
            return
        loaded, api_loop = self._load(lambda: self._load_api(wake))
        if loaded:
            api_loop()

    def _serve_early(self, ready: set[int]) -> list[int] | None:
        """The first client came on the -p fds `ready`: serve what needs no trio, start
        trio for the rest; the -p fds still to wait for (None: stop() came)."""
        # the ports that need no trio (serving takes fds: two a connection)
        loaded, wake = self._load(lambda: self.ports.serve_light(ready))
        if not loaded:
            return None
        if wake is None:  # the driver serves under trio, every -p port from now on
            return [] if self._load(self._start_trio)[0] else None
        return wake

    def _load_api(self, wake: list[int]):
        """Load the API and make its loop (the -p fds `wake` still watched there);
        returns what runs it. OSError if fds ran out (tried again whole)."""
        from .._loop import IN, Loop
        from ..api.router import Router
        from ..api.server import Server

        loop = Loop("API")
        try:
            server = Server(loop, self._listener, Router(self.info, self.ports), self._fail,
                            self._prepare_api)
            early = _Early(self, loop, wake)
            loop.watch(self._wake_r, IN, _Stop(loop))
            for fd in wake:
                loop.watch(fd, IN, early)
            server.start()  # last: it starts the worker thread
        except BaseException:
            loop.close()
            raise
        _log.debug(f"API on {self.state.file('api.sock')}")

        def run():
            try:
                loop.run()
            finally:
                server.close()
                loop.close()
        return run

    def _prepare_api(self) -> None:
        """In the API's worker, before its first request."""
        if self.ports.needs_trio:
            self._await_trio()
        self.ports.prepare_api()

    def _load(self, load) -> tuple[bool, object]:
        """(True, what `load()` returns): `load` imports (each import opens its files)
        and starts what needs fds and threads. Out of them (the limit of open files
        lowered under us, or every fd in use; the user's limit of processes, which
        counts threads, reached), it is tried again every _RETRY s, with one line,
        rather than ending the run: the clients wait in the sockets' backlogs
        meanwhile. (False, None) if stop() came first."""
        while True:
            raise_fd_limit()
            try:
                return True, load()
            except OutOfProcesses as exc:
                if not self._wait_for_room("services-threads", str(exc)):
                    return False, None
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                if not self._wait_for_room("services-fds", exc.strerror):
                    return False, None

    def _wait_for_room(self, key: str, why: str) -> bool:
        """Say why the services cannot load (once in a while) and wait _RETRY s; False
        if stop() came meanwhile."""
        _log.limited(key, f"the port and API services cannot load for now ({why}): "
                          f"trying again; their clients wait")
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

    # -- trio's thread --

    def run_in_trio(self, function, *args):
        """For the port driver, from the API's thread: `function(*args)` under trio,
        which starts if it has not; ports.PortsUnavailable if it cannot run."""
        from ..ports import PortsUnavailable

        self._start_trio()  # errors.OutOfProcesses: the API answers 503
        if not self._await_trio():
            raise PortsUnavailable("the port services are still loading (out of file "
                                   "descriptors?): try again later")
        if not self._serving:
            raise PortsUnavailable("the port services are not running (the run is "
                                   "ending, or they failed): no port can be changed")
        import trio

        try:
            return trio.from_thread.run(function, *args, trio_token=self._token)
        except trio.RunFinishedError:
            raise PortsUnavailable("the run is ending: no port can be changed") from None

    def _await_trio(self) -> bool:
        return self._trio_ready.wait(_TRIO_WAIT)

    def _start_trio(self) -> None:
        """trio's services, in a thread of their own (once; not once stopping).
        OutOfProcesses if the thread cannot start now (it may be tried again)."""
        with self._lock:
            if self._trio is not None or self._stopping:
                if self._trio is None:  # nobody waits for what will not come
                    self._trio_running.set()
                    self._trio_ready.set()
                return
            self._trio = thread = _threads.Thread(self._run_trio, what="trio's thread")
            try:
                thread.start()
            except OutOfProcesses:
                self._trio = None
                raise

    def _run_trio(self) -> None:
        _threads.name("rootless trio")
        try:
            loaded, trio = self._load(lambda: __import__("trio"))
            if not loaded:
                return
            _quiet_trio_logging()
            while True:
                try:
                    return trio.run(self._main)
                except OSError as exc:  # trio's own fds (epoll, its wake-up socket pair)
                    if self._trio_running.is_set() or exc.errno not in CAPACITY_ERRNOS:
                        raise
                    if not self._wait_for_room("services-fds", exc.strerror):
                        return
        except BaseException as exc:  # noqa: B902 - reported, then the run ends
            self._fail(_describe(exc))
        finally:
            self._trio_running.set()
            self._trio_ready.set()
            self.started.set()

    async def _main(self) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self._token = trio.lowlevel.current_trio_token()
            self._trio_running.set()  # stop() may cancel serve() as it starts
            await nursery.start(self.ports.serve, self.state.path)
            self._serving = True  # only now: add() may run
            self._trio_ready.set()
            self.started.set()  # the API listens already (parent.Listeners)
            _log.debug("trio's port services started")

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


class _Stop:
    """On the API's loop: stop() wrote to the services' wake-up pipe."""

    def __init__(self, loop):
        self.loop = loop

    def ready(self, fd: int, events: int) -> None:
        self.loop.watch(fd, 0, self)
        self.loop.stop()

    def failed(self, exc: Exception) -> None:
        self.loop.stop()


class _Early:
    """On the API's loop: the -p fds whose first client has not come yet."""

    def __init__(self, services: Services, loop, fds: list[int]):
        self.services, self.loop, self.fds = services, loop, list(fds)

    def ready(self, fd: int, events: int) -> None:
        from .._loop import IN  # loaded with the API already

        for each in self.fds:
            self.loop.watch(each, 0, self)
        self.fds = self.services._serve_early({fd}) or []
        for each in self.fds:
            self.loop.watch(each, IN, self)

    def failed(self, exc: Exception) -> None:
        self.services._fail(_describe(exc))


def _quiet_trio_logging() -> None:
    """trio reports a few failures through the standard `logging` (an async
    generator's error), with a traceback, which logging's last resort would write to
    stderr: one rate-limited line of ours instead, which never raises."""
    import logging

    class OneLine(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                text = record.getMessage()
            except (TypeError, ValueError):  # a format that does not fit its arguments
                text = str(record.msg)
            first = text.splitlines()[0][:100] if text else ""
            _log.limited(record.name, f"{record.name}: {first}", level="error")

    logger = logging.getLogger("trio")
    logger.addHandler(OneLine())
    logger.propagate = False


def _describe(exc: BaseException) -> str:
    from ..errors import RootlessError

    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, RootlessError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"port/API services failed: {exc.strerror or exc}"
    return f"port/API services failed: {type(exc).__name__}: {exc}"
