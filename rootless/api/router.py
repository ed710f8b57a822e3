"""Requests to responses, apart from any I/O: (method, target, body) -> (status, body).

Routing is on the whole path, as rootlesskit's mux does: `/v1/info`, `/v1/ports` and
`/v1/ports/ID`, nothing more (`DELETE /v1/ports/1/2` is a 404, not a removal of port
2). The path is percent-decoded first and the query ignored, as there; a path that
is not the canonical form (`//v1/info`, a trailing `/`) is a 404 (rootlesskit
redirects some of those; a redirect would help no API client). HEAD is not served
(405, as rootlesskit).

The port operations are delegated to the port driver's parent side (add_now and
remove_now, which block: the server calls the router from a worker thread); its
errors (rootless.ports) are mapped here to HTTP statuses."""
import msgspec

from ..errors import CAPACITY_ERRNOS, OutOfProcesses, RootlessError
from ..ports import (PortConflict, PortError, PortHelperFailed, PortNotFound, PortRequestInvalid,
                     PortSpec, PortsUnavailable)
from .models import ErrorBody, PortSpecBody, encode_hook, port_spec

_json = msgspec.json.Encoder(enc_hook=encode_hook)
_spec_decoder = msgspec.json.Decoder(PortSpecBody)

INFO, PORTS, PORT = "/v1/info", "/v1/ports", "/v1/ports/{id}"
_METHODS = {INFO: ("GET",), PORTS: ("GET", "POST"), PORT: ("DELETE",)}
_ID_MAX = 2**63 - 1  # rootlesskit's port ids are Go ints


# The port side's errors as HTTP statuses: the first class of an error's MRO found here.
PORT_ERROR_STATUS = {PortRequestInvalid: 400, PortNotFound: 404, PortConflict: 409,
                     PortHelperFailed: 502, PortsUnavailable: 503, PortError: 500}


class ApiFailure(RootlessError):
    """A request the router itself refuses (a bad port id, a body that is no port spec),
    with the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def port_error_status(exc: PortError) -> int:
    return next(PORT_ERROR_STATUS[cls] for cls in type(exc).__mro__ if cls in PORT_ERROR_STATUS)


def error(status: int, message: str) -> tuple[int, bytes]:
    return status, _json.encode(ErrorBody(message=message))


def clip(text: str, limit: int = 100) -> str:
    """`text` cut to about `limit` characters: what a client sent may be huge."""
    return text if len(text) <= limit else text[:limit] + "..."


def route(target: str) -> tuple[str, str] | None:
    """(route, port id text) for a request target, or None when no route has its
    whole path. Targets are origin-form (`/v1/info?x`) or absolute-form
    (`http://host/v1/info`, RFC 9112 3.2.2); the host is ignored, as rootlesskit does."""
    path = target.partition("?")[0]
    if not path.startswith("/"):
        scheme, sep, rest = path.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return None  # authority-form (CONNECT) or "*": nothing of ours
        path = "/" + rest.partition("/")[2]
    path = unquote(path)  # so "%2F" is a separator here too, as in rootlesskit
    if path in (INFO, PORTS):
        return path, ""
    head, _, ident = path.rpartition("/")
    if head == PORTS and ident:
        return PORT, ident
    return None


_HEX = frozenset("0123456789abcdefABCDEF")


def unquote(text: str) -> str:
    """urllib.parse.unquote's decoding (%XX as UTF-8, invalid sequences replaced),
    without urllib.parse, which loads ipaddress: 0.5 MiB and 3 ms of the API's first
    request."""
    if "%" not in text:
        return text
    head, *pieces = text.split("%")
    out = bytearray(head.encode())
    for piece in pieces:
        if len(piece) >= 2 and piece[0] in _HEX and piece[1] in _HEX:
            out.append(int(piece[:2], 16))
            out += piece[2:].encode()
        else:
            out += b"%" + piece.encode()
    return out.decode("utf-8", "replace")


def port_id(text: str) -> int:
    """A port id as `GET /v1/ports` lists them: ASCII digits only (int() would also
    take "+1", " 1" or "١"), at most a Go int."""
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and int(text) <= _ID_MAX):
        raise ApiFailure(400, f"bad port id {clip(text, 30)!r}: use an id that GET "
                              f"/v1/ports lists (a number)")
    return int(text)


class Router:
    def __init__(self, info, ports):
        self._info = info      # () -> models.Info
        self._ports = ports    # a port driver: list() / add_now(spec) / remove_now(id)

    def handle(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        found = route(target)
        if found is None:
            return error(404, f"no such endpoint: {clip(target)}")
        name, ident = found
        allowed = _METHODS[name]
        if method not in allowed:
            return error(405, f"{clip(method, 20)} is not allowed on {clip(target)}: use "
                              f"{' or '.join(allowed)}")
        try:
            return self._call(name, method, ident, body)
        except ApiFailure as exc:
            return error(exc.status, str(exc))
        except PortError as exc:
            return error(port_error_status(exc), str(exc))
        except OutOfProcesses as exc:  # a thread the request needed (a port's loop)
            return error(503, f"{exc}; try again later")
        except RootlessError as exc:  # bad input found by the shared parsers/validators
            return error(400, str(exc))
        except OSError as exc:
            if exc.errno not in CAPACITY_ERRNOS:
                raise  # a bug: the server answers 500 and logs it
            return error(503, f"out of resources ({exc.strerror}): try again later")

    def _call(self, name: str, method: str, ident: str, body: bytes):
        if name == INFO:
            return 200, _json.encode(self._info())
        if name == PORT:
            self._ports.remove_now(port_id(ident))
            return 200, b""
        if method == "GET":
            return 200, _json.encode(self._ports.list())
        return 201, _json.encode(self._ports.add_now(self._spec(body)))

    @staticmethod
    def _spec(body: bytes) -> PortSpec:
        try:
            return port_spec(_spec_decoder.decode(body))
        except msgspec.DecodeError as exc:
            raise ApiFailure(400, f"invalid port spec body: {exc}") from None
