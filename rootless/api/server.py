"""The API's HTTP/1.1 server on a unix socket: h11 driven over trio streams.

Each connection is a unit of work of its own: whatever happens while serving it (a
malformed or hostile request, a client that stalls or goes away, a bug in a handler)
ends that connection only, with a 4xx (the client's fault) or a 500 (ours, logged in
one rate-limited line) when an answer can still be sent. Out of fds, new connections
are answered 503 and closed while the old ones go on. Only the listener failing ends
the server: `serve` then raises ListenerFailed, and the run ends.

The host part of the URL is ignored, as rootlesskit does."""
import errno
import logging
import select
import socket
from http import HTTPStatus

import h11
import trio

from .. import _log
from .._listen import SpareFd, spare_fd
from ..errors import RootlessError
from .router import CAPACITY_ERRNOS, Router, clip, error

MAX_BODY = 1 << 20
MAX_HEAD = 64 * 1024
_IDLE_TIMEOUT = 60.0     # seconds a connection may wait for the head of its next request
_REQUEST_TIMEOUT = 60.0  # seconds a request may take to arrive whole, once begun
_SEND_TIMEOUT = 60.0     # seconds an answer may wait for a client that does not read
_BUSY_RETRY = 0.1        # seconds between accepts while out of fds, with no fd to spare

# accept() failing for one client only (it went away first): accept the next one.
_CLIENT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO})
# The client went away or stalled: nobody to answer, nothing to log.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


def _unavailable() -> bytes:
    body = b'{"message":"out of file descriptors: try again later"}'
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


_UNAVAILABLE = _unavailable()


class _OneLine(logging.Handler):
    """trio reports a few failures through the standard `logging` (an async
    generator's error; serve_listeners' accept errors, unused here), with a
    traceback, which logging's last resort would write to stderr: one rate-limited
    line of ours instead, which never raises."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # a format that does not fit its arguments
            text = str(record.msg)
        first = text.splitlines()[0] if text else ""
        _log.limited(record.name, f"{record.name}: {clip(first)}", level="error")


logging.getLogger("trio").addHandler(_OneLine())
logging.getLogger("trio").propagate = False


class ListenerFailed(RootlessError):
    """The API's listening socket failed: the run cannot go on without its API."""


async def serve(sock: socket.socket, router: Router, *,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve on `sock`, a listening socket from `rootless.api.listen` (its owner closes
    it). Returns only by cancellation; raises ListenerFailed if the listener fails
    other than for want of resources."""
    sock.setblocking(False)
    spare = spare_fd()
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            conn = await _accept(sock, spare)
            if conn is not None:
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                nursery.start_soon(_connection, stream, router)


async def _accept(sock: socket.socket, spare: SpareFd) -> socket.socket | None:
    """The next client, or None if there was none to serve after all."""
    await trio.lowlevel.wait_readable(sock)
    try:
        return sock.accept()[0]
    except BlockingIOError:
        # Readable but nothing to accept: a spurious wake-up, or a listener shut
        # down, which would wake us for ever and never accept again.
        if _hung_up(sock):
            raise ListenerFailed(_failed(sock, "it was shut down")) from None
    except OSError as exc:
        if exc.errno in CAPACITY_ERRNOS:
            await _refuse_one(sock, spare, exc)
        elif exc.errno not in _CLIENT_ERRNOS:
            raise ListenerFailed(_failed(sock, exc.strerror or str(exc))) from None
    return None


def _hung_up(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _failed(sock: socket.socket, why: str) -> str:
    try:
        where = sock.getsockname() or "api.sock"
    except OSError:
        where = "api.sock"
    return f"the API listener on {where} failed: {why}"


async def _refuse_one(sock: socket.socket, spare: SpareFd, exc: OSError) -> None:
    """accept() failed for want of resources: answer one waiting client 503 with the
    spare fd, or, without one, wait a little before accepting again."""
    out_of_fds = exc.errno in (errno.EMFILE, errno.ENFILE)
    _log.limited("api-accept", f"API: cannot accept a connection ({exc.strerror}): new "
                               f"clients {'get 503' if out_of_fds else 'wait'} until "
                               f"resources are freed")
    answered = False
    if out_of_fds and spare.release():
        try:
            conn, _ = sock.accept()  # non-blocking: BlockingIOError if it gave up
        except OSError:
            pass
        else:
            with conn:
                try:
                    conn.send(_UNAVAILABLE)  # a fresh socket's buffer takes it whole
                    answered = True
                except OSError:
                    pass
        spare.restore()
    await trio.sleep(0 if answered else _BUSY_RETRY)


async def _connection(stream: trio.SocketStream, router: Router) -> None:
    """Serve one connection, whatever it sends; nothing raised here ends the server
    (but cancellation)."""
    http = _Http(stream)
    async with stream:
        try:
            while await _one_request(http, router):
                http.next_cycle()
        except _GONE:
            pass
        except h11.RemoteProtocolError as exc:  # e.g. 431 for a head beyond MAX_HEAD
            http.refused()
            await http.answer_if_possible(exc.error_status_hint, f"bad request: {exc}")
        except _BadRequest as exc:
            await http.answer_if_possible(exc.status, f"bad request: {exc}")
        except Exception as exc:  # a bug: this connection ends, the server goes on
            _log.limited("api-connection", f"API: a connection failed: {_what(exc)}",
                         level="error")
            await http.answer_if_possible(500, f"internal error: {_what(exc)}")


_HEAD = b"HEAD "


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _Http:
    """One connection's h11 state and the method of its current request."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.head = False
        self._lead = b""  # the request's first bytes: its method, if h11 refuses the head

    def next_cycle(self) -> None:
        self.conn.start_next_cycle()
        self.head = False
        self._lead = self.conn.trailing_data[0][:len(_HEAD)]  # a pipelined request's

    def refused(self) -> None:
        """h11 refused the request (so no Request told its method): an answer to a
        HEAD must still have no body, or the client reads it as another answer."""
        self.head = self._lead == _HEAD

    async def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(65536)
            if len(self._lead) < len(_HEAD):
                self._lead += data[:len(_HEAD) - len(self._lead)]
            self.conn.receive_data(data)

    async def send(self, status: int, payload: bytes, close: bool = False) -> None:
        headers = [("Content-Type", "application/json"),
                   ("Content-Length", str(len(payload)))]
        if close:
            headers.append(("Connection", "close"))
        data = self.conn.send(h11.Response(status_code=status, headers=headers,
                                           reason=HTTPStatus(status).phrase.encode()))
        if payload and not self.head:  # an answer to HEAD has headers only
            data += self.conn.send(h11.Data(data=payload))
        data += self.conn.send(h11.EndOfMessage())
        with trio.fail_after(_SEND_TIMEOUT):
            await self.stream.send_all(data)

    async def answer_if_possible(self, status: int, message: str) -> None:
        """The last answer on this connection, if it is not too late for one."""
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # an answer was already begun: closing is all that is left
        status, payload = error(status, clip(message, 300))
        if self.head and self.conn.their_state is h11.ERROR:
            # h11 refused the HEAD before it knew its method: it would frame the answer
            # by its Content-Length, and want the body that a HEAD answer cannot have
            payload = b""
        try:
            await self.send(status, payload, close=True)
        except (*_GONE, h11.LocalProtocolError):
            pass


async def _one_request(http: _Http, router: Router) -> bool:
    """Serve one request; False when the connection is done."""
    conn = http.conn
    with trio.move_on_after(_IDLE_TIMEOUT) as idle:
        first = await http.next_event()
    if idle.cancelled_caught or isinstance(first, h11.ConnectionClosed):
        return False
    with trio.fail_after(_REQUEST_TIMEOUT):
        request, body = await _read_request(http, first)
    if request is None:
        return False
    method = request.method.decode("ascii", "replace")
    target = request.target.decode("ascii", "replace")
    try:
        status, payload = await router.handle(method, target, body)
    except Exception as exc:  # a bug in one handler: this request gets a 500
        _log.limited("api-request", f"API: {method} {clip(target)} failed: {_what(exc)}",
                     level="error")
        status, payload = error(500, f"internal error: {_what(exc)}")
    await http.send(status, payload)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _read_request(http: _Http, event) -> tuple[h11.Request | None, bytes]:
    """The request that begins with `event`, and its body."""
    if not isinstance(event, h11.Request):
        raise _BadRequest(f"unexpected {type(event).__name__}")
    http.head = event.method == b"HEAD"
    _check_length(event)
    if http.conn.they_are_waiting_for_100_continue:
        await http.stream.send_all(http.conn.send(h11.InformationalResponse(
            status_code=100, headers=[], reason=b"Continue")))
    body = bytearray()
    while True:
        part = await http.next_event()
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > MAX_BODY:
                raise _BadRequest(f"body larger than {MAX_BODY} bytes", 413)
        elif isinstance(part, h11.EndOfMessage):
            return event, bytes(body)
        else:
            return None, b""  # the client closed in mid-body


def _check_length(request: h11.Request) -> None:
    """Refuse a body too large before it comes (h11 checked the header's syntax)."""
    for name, value in request.headers:
        if name == b"content-length" and (len(value) > 9 or int(value) > MAX_BODY):
            raise _BadRequest(f"body of {clip(value.decode(), 30)} bytes: the API takes "
                              f"at most {MAX_BODY}", 413)


def _what(exc: BaseException) -> str:
    return clip(f"{type(exc).__name__}: {exc}", 300)
