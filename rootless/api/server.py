"""The API's HTTP/1.1 server on a unix socket: h11 driven over trio streams.

Malformed HTTP gets a 400 and the connection closes; nothing a client sends can end
the server. The host part of the URL is ignored, as rootlesskit does."""
import socket
from http import HTTPStatus

import h11
import trio

from .. import _log
from .router import Router, error

MAX_BODY = 1 << 20
_IDLE_TIMEOUT = 60.0


async def serve(sock: socket.socket, router: Router, *,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve on `sock`, a listening socket from `rootless.api.listen`."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    async with listener:
        task_status.started()
        await trio.serve_listeners(lambda stream: _connection(stream, router), [listener])


async def _connection(stream: trio.SocketStream, router: Router) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    async with stream:
        try:
            try:
                while await _one_request(stream, conn, router):
                    conn.start_next_cycle()
            except (h11.RemoteProtocolError, _BadRequest) as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _respond(stream, conn, *error(400, f"bad request: {exc}"),
                                   close=True)
        # also around the 400: a client gone in mid-request cannot be answered either
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass


class _BadRequest(Exception):
    pass


async def _next_event(stream, conn):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.fail_after(_IDLE_TIMEOUT):
            data = await stream.receive_some(65536)
        conn.receive_data(data)


async def _one_request(stream, conn, router) -> bool:
    """Serve one request; False when the connection is done."""
    event = await _next_event(stream, conn)
    if isinstance(event, h11.ConnectionClosed):
        return False
    if not isinstance(event, h11.Request):
        raise _BadRequest(f"unexpected {type(event).__name__}")
    body = bytearray()
    while True:
        part = await _next_event(stream, conn)
        if isinstance(part, h11.Data):
            body += part.data
            if len(body) > MAX_BODY:
                raise _BadRequest(f"body larger than {MAX_BODY} bytes")
        elif isinstance(part, h11.EndOfMessage):
            break
        else:
            return False
    try:
        status, payload = await router.handle(event.method.decode(), event.target.decode(),
                                              bytes(body))
    except Exception as exc:  # a bug in one request must not end the server
        _log.error(f"API: {event.method.decode()} {event.target.decode()} failed: "
                   f"{type(exc).__name__}: {exc}")
        status, payload = error(500, f"internal error: {type(exc).__name__}: {exc}")
    await _respond(stream, conn, status, payload)
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


async def _respond(stream, conn, status: int, payload: bytes, close: bool = False) -> None:
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    if close:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=status, headers=headers,
                                  reason=HTTPStatus(status).phrase.encode()))
    if payload:
        data += conn.send(h11.Data(data=payload))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
