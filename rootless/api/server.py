"""The API's HTTP/1.1 server on a unix socket: h11 (sans-IO) driven by a loop of our
own (`rootless._loop`), without trio: rootless Docker publishes every port through
the API, and trio would be 12 MiB and 60-130 ms of its first `docker run -p`.

The loop only moves bytes: each request, once whole, goes to one worker thread, which
runs the router (a port's addition may take a while: binding, the ports' loop, or
trio for a driver that serves under it) and hands the answer back. Requests are
served one at a time, in the order they came, as the port driver wants them anyway.

Each connection is a unit of work of its own: whatever happens while serving it (a
malformed or hostile request, a client that stalls or goes away, a bug in a handler)
ends that connection only, with a 4xx (the client's fault) or a 500 (ours, logged in
one rate-limited line) when an answer can still be sent. Out of fds, new connections
are answered 503 and closed while the old ones go on. Only the listener failing ends
the server: its owner is told (`on_failure`), and the run ends.

The host part of the URL is ignored, as rootlesskit does."""
import errno
import os
import time
from _queue import SimpleQueue
from http import HTTPStatus

import h11

from .. import _log, _threads, _tunables
from .._listen import SpareFd
from .._loop import ERR, HUP, IN, OUT, Watcher
from .router import CAPACITY_ERRNOS, clip, error

MAX_BODY = 1 << 20
MAX_HEAD = 64 * 1024
# Seconds a client may be silent (ROOTLESS_API_TIMEOUT overrides all three): waiting
# for the head of its next request, while a request arrives, and not reading an answer.
_TIMEOUT = _tunables.seconds("ROOTLESS_API_TIMEOUT", 60.0)
_IDLE_TIMEOUT = _REQUEST_TIMEOUT = _SEND_TIMEOUT = _TIMEOUT
_SWEEP = min(1.0, _TIMEOUT / 4)  # seconds between looks at the connections' deadlines
_BUSY_RETRY = 0.1        # seconds between accepts while out of fds, with no fd to spare
_ACCEPTS = 16            # clients taken per round
_MAX_QUEUED = 256        # requests waiting for the worker; more are answered 503
_READ = 65536

# accept() failing for one client only (it went away first): accept the next one.
_CLIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO})
_HEAD = b"HEAD "


def _canned(status: int, message: bytes) -> bytes:
    body = b'{"message":"%s"}' % message
    return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, HTTPStatus(status).phrase.encode(),
                                               len(body), body))


_UNAVAILABLE = _canned(503, b"out of file descriptors: try again later")


class ListenerFailed(Exception):
    """The API's listening socket failed: the run cannot go on without its API."""


class Server(Watcher):
    """Serves `listener` (a listening unix socket; its owner closes it) on `loop`."""

    def __init__(self, loop, listener, router, on_failure, prepare=None):
        self.loop, self.listener, self.router = loop, listener, router
        self._on_failure = on_failure  # a message: the run cannot go on
        self._prepare = prepare        # run by the worker before its first request
        self.connections: set[_Connection] = set()
        self._spare = SpareFd()        # this loop's own: two threads may not share one
        self._jobs = SimpleQueue()
        self.queued = 0                # requests given to the worker and not answered
        self._paused = None
        self._sweeping = None
        self._worker = _threads.Thread(self._work, what="the API's worker thread")

    def start(self) -> None:
        """Start the worker and watch the listener. Raises (errors.OutOfProcesses: no
        thread now; OSError: epoll) with nothing left running or open: tried again."""
        try:
            self._worker.start()
            self.listener.setblocking(False)
            self.loop.watch(self.listener.fileno(), IN, self)
        except BaseException:
            self._jobs.put(None)  # a worker that started ends
            self._spare.close()
            raise

    def close(self) -> None:
        """On the loop's thread, once it has stopped: every connection closed."""
        for connection in list(self.connections):
            connection.close()
        if self._paused is None:
            self.loop.watch(self.listener.fileno(), 0, self)
        self._jobs.put(None)
        self._worker.join(5.0)

    # -- accepting --

    def ready(self, fd: int, events: int) -> None:
        for _ in range(_ACCEPTS):
            try:
                fd, _ = self.listener._accept()
            except BlockingIOError:
                # Readable but nothing to accept: a spurious wake-up, or a listener
                # shut down, which would wake us for ever and never accept again.
                if events & (HUP | ERR):
                    raise ListenerFailed(self._failed("it was shut down")) from None
                return
            except OSError as exc:
                if exc.errno in _CLIENT_ERRNOS:
                    continue
                if exc.errno not in CAPACITY_ERRNOS:
                    raise ListenerFailed(self._failed(exc.strerror or str(exc))) from None
                self._refuse_one(exc)
                return
            connection = _Connection(self, fd)
            self.connections.add(connection)
            connection.start()

    def failed(self, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, ListenerFailed) else self._failed(
            f"{type(exc).__name__}: {exc}")
        self.loop.watch(self.listener.fileno(), 0, self)
        self._paused = True  # never watched again
        self._on_failure(message)

    def _failed(self, why: str) -> str:
        try:
            where = self.listener.getsockname() or "api.sock"
        except OSError:
            where = "api.sock"
        return f"the API listener on {where} failed: {why}"

    def _refuse_one(self, exc: OSError) -> None:
        """accept() failed for want of resources: answer one waiting client 503 with the
        spare fd, or, without one, stop accepting for a little while."""
        out_of_fds = exc.errno in (errno.EMFILE, errno.ENFILE)
        _log.limited("api-accept", f"API: cannot accept a connection ({exc.strerror}): new "
                                   f"clients {'get 503' if out_of_fds else 'wait'} until "
                                   f"resources are freed")
        if out_of_fds and self._spare.release():
            try:
                fd, _ = self.listener._accept()
            except OSError:
                pass
            else:
                try:
                    os.write(fd, _UNAVAILABLE)  # a fresh socket's buffer takes it whole
                except OSError:
                    pass
                os.close(fd)
            self._spare.restore()
            return  # the next client is tried in the next round
        self.loop.watch(self.listener.fileno(), 0, self)
        self._paused = self.loop.call_later(_BUSY_RETRY, self._resume)

    def _resume(self) -> None:
        self._paused = None
        self.loop.watch(self.listener.fileno(), IN, self)

    # -- deadlines: one timer for all connections --

    def watch_deadlines(self) -> None:
        if self._sweeping is None:
            self._sweeping = self.loop.call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        self._sweeping = None
        now = time.monotonic()
        waiting = False
        for connection in list(self.connections):
            if connection.deadline is not None:
                if connection.deadline <= now:
                    connection.close()  # gone, or too slow: nobody to answer
                else:
                    waiting = True
        if waiting:
            self.watch_deadlines()

    # -- the worker --

    def submit(self, connection, method: str, target: str, body: bytes) -> None:
        if self.queued >= _MAX_QUEUED:
            connection.answer(503, error(503, "too many requests waiting: try again "
                                              "later")[1], close=True)
            return
        self.queued += 1
        self._jobs.put((connection, method, target, body))

    def _work(self) -> None:
        _threads.name("rootless router")
        try:
            self._serve_jobs()
        except BaseException as exc:  # noqa: B902 - a bug here: no request would be answered
            self._on_failure(f"the API's worker thread failed: {_what(exc)}")

    def _serve_jobs(self) -> None:
        if self._prepare is not None:
            try:
                self._prepare()
            except Exception as exc:  # the requests are still answered, as they can be
                _log.limited("api-request", f"API: {_what(exc)}", level="error")
        while (job := self._jobs.get()) is not None:
            connection, method, target, body = job
            status, payload = self._handle(method, target, body)
            try:
                self.loop.call_soon_threadsafe(
                    lambda c=connection, s=status, p=payload: self._answered(c, s, p))
            except RuntimeError:
                return  # the loop has ended: nobody to answer

    def _handle(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        try:
            return self.router.handle(method, target, body)
        except Exception as exc:  # a bug in one handler: this request gets a 500
            _log.limited("api-request", f"API: {method} {clip(target)} failed: {_what(exc)}",
                         level="error")
            return error(500, f"internal error: {_what(exc)}")

    def _answered(self, connection, status: int, payload: bytes) -> None:
        self.queued -= 1
        if connection in self.connections:
            connection.answer(status, payload)


class _Connection(Watcher):
    """One client: its h11 state, the request being read, the answer being sent. It
    reads the next request only once the last answer is sent (as a blocking server
    would), so a client that sends and never reads holds one answer, not a queue."""

    def __init__(self, server: Server, fd: int):
        self.server, self.loop, self.fd = server, server.loop, fd
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.head = False    # the request is a HEAD: its answer has no body
        self._lead = b""     # the request's first bytes: its method, if h11 refuses the head
        self.request = None  # the h11.Request being read
        self.body = bytearray()
        self.busy = False    # the request is with the worker
        self.out = b""       # what is still to send
        self.closing = False  # close once `out` is sent
        self.deadline = None
        self._events = 0

    def start(self) -> None:
        os.set_blocking(self.fd, False)
        self._expect(_IDLE_TIMEOUT)
        self._watch()

    def close(self) -> None:
        if self.fd < 0:
            return
        self.loop.watch(self.fd, 0, self)
        os.close(self.fd)
        self.fd = -1
        self.server.connections.discard(self)

    def _expect(self, seconds: float | None) -> None:
        """The client has `seconds` for what comes next (None: no limit)."""
        self.deadline = None if seconds is None else time.monotonic() + seconds
        if seconds is not None:
            self.server.watch_deadlines()

    def _watch(self) -> None:
        reading = not (self.busy or self.closing or self.out)
        events = (IN if reading else 0) | (OUT if self.out else 0)
        if events != self._events:
            self.loop.watch(self.fd, events, self)
            self._events = events

    # -- the loop's reports --

    def ready(self, fd: int, events: int) -> None:
        if self.out:
            self._flush()
        elif events & IN:
            self._receive()
        elif events & (HUP | ERR):
            self.close()  # gone, with nothing that could still be answered

    def failed(self, exc: Exception) -> None:
        """A bug while serving this connection: it ends, the server goes on."""
        _log.limited("api-connection", f"API: a connection failed: {_what(exc)}",
                     level="error")
        if self.closing:  # it failed again on its way out: no second answer
            self.close()
            return
        try:
            self._last_answer(500, f"internal error: {_what(exc)}")
        except Exception:  # noqa: BLE001 - nothing more to try
            self.close()

    # -- reading --

    def _receive(self) -> None:
        try:
            data = os.read(self.fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            self.close()  # the client went away
            return
        if len(self._lead) < len(_HEAD):
            self._lead += data[:len(_HEAD) - len(self._lead)]
        self.http.receive_data(data)  # b"": the client closed its side
        self._advance()

    def _advance(self) -> None:
        """Take h11's events until it needs more data, or a request is whole."""
        while not (self.busy or self.closing or self.out) and self.fd >= 0:
            try:
                event = self.http.next_event()
                if event is h11.NEED_DATA:
                    break
                self._take(event)
            except h11.RemoteProtocolError as exc:  # e.g. 431 for a head beyond MAX_HEAD
                self.head = self._lead == _HEAD  # see _last_answer
                self._last_answer(exc.error_status_hint, f"bad request: {exc}")
            except _BadRequest as exc:
                self._last_answer(exc.status, f"bad request: {exc}")
        if self.fd >= 0:
            self._watch()

    def _take(self, event) -> None:
        if isinstance(event, h11.Request):
            self.request, self.head = event, event.method == b"HEAD"
            self._expect(_REQUEST_TIMEOUT)
            _check_length(event)
            if self.http.they_are_waiting_for_100_continue:
                self._send(self.http.send(h11.InformationalResponse(
                    status_code=100, headers=[], reason=b"Continue")))
        elif isinstance(event, h11.Data):
            self.body += event.data
            if len(self.body) > MAX_BODY:
                raise _BadRequest(f"body larger than {MAX_BODY} bytes", 413)
        elif isinstance(event, h11.EndOfMessage):
            self.busy = True
            self._expect(None)  # the worker's time is not the client's
            request, body, self.body = self.request, bytes(self.body), bytearray()
            self.server.submit(self, request.method.decode("ascii", "replace"),
                               request.target.decode("ascii", "replace"), body)
        elif isinstance(event, h11.ConnectionClosed):
            self.close()
        else:
            raise _BadRequest(f"unexpected {type(event).__name__}")

    # -- answering --

    def answer(self, status: int, payload: bytes, close: bool = False) -> None:
        """The answer to the request the worker had (on the loop's thread)."""
        if self.fd >= 0:
            self.busy = False
            self._respond(status, payload, close)

    def _respond(self, status: int, payload: bytes, close: bool) -> None:
        headers = [("Content-Type", "application/json"),
                   ("Content-Length", str(len(payload)))]
        if close:
            headers.append(("Connection", "close"))
            self.closing = True
        data = self.http.send(h11.Response(status_code=status, headers=headers,
                                           reason=HTTPStatus(status).phrase.encode()))
        if payload and not self.head:  # an answer to HEAD has headers only
            data += self.http.send(h11.Data(data=payload))
        data += self.http.send(h11.EndOfMessage())
        self._send(data)

    def _last_answer(self, status: int, message: str) -> None:
        """The last answer on this connection, if it is not too late for one; it
        closes once that is sent."""
        self.closing = True
        if self.http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status, payload = error(status, clip(message, 300))
            if self.head and self.http.their_state is h11.ERROR:
                # h11 refused the HEAD before it knew its method: it would frame the
                # answer by its Content-Length, and want the body a HEAD answer cannot have
                payload = b""
            try:
                self._respond(status, payload, close=True)
                return
            except h11.LocalProtocolError:
                pass
        if not self.out:
            self.close()  # an answer was already begun: closing is all that is left

    def _send(self, data: bytes) -> None:
        sending = bool(self.out)
        self.out += data
        self._flush()
        if self.out and not sending and self.fd >= 0:
            self._expect(_SEND_TIMEOUT)

    def _flush(self) -> None:
        try:
            sent = os.write(self.fd, self.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close()  # the client went away: nobody to answer
            return
        self.out = self.out[sent:]
        if self.out:
            self._watch()
        elif self.closing:
            self.close()
        elif self.http.our_state in (h11.DONE, h11.MUST_CLOSE):
            self._next_cycle()
        else:  # "100 Continue" sent: the body comes next (maybe read already)
            self._expect(_REQUEST_TIMEOUT)
            self._advance()

    def _next_cycle(self) -> None:
        """The answer is sent: the next request, or the end (h11 knows which)."""
        if self.http.our_state is not h11.DONE or self.http.their_state is not h11.DONE:
            self.close()  # HTTP/1.0, or "Connection: close"
            return
        self.http.start_next_cycle()
        self.request, self.head = None, False
        self._lead = self.http.trailing_data[0][:len(_HEAD)]  # a pipelined request's
        self._expect(_IDLE_TIMEOUT)
        self._advance()


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _check_length(request: h11.Request) -> None:
    """Refuse a body too large before it comes (h11 checked the header's syntax)."""
    for name, value in request.headers:
        if name == b"content-length" and (len(value) > 9 or int(value) > MAX_BODY):
            raise _BadRequest(f"body of {clip(value.decode(), 30)} bytes: the API takes "
                              f"at most {MAX_BODY}", 413)


def _what(exc: BaseException) -> str:
    return clip(f"{type(exc).__name__}: {exc}", 300)
