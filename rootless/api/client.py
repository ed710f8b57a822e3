"""A small synchronous client of the REST API on STATE/api.sock (rootless-ctl, tests).

Stdlib http.client over an AF_UNIX socket: one short request per call, so no event
loop is worth importing. Works against rootlesskit's own socket too."""
import http.client
import os
import socket
import stat

import msgspec

from ..errors import ApiError, ApiUnreachable
from ..ports import PortSpec, PortStatus
from .models import ErrorBody, Info, PortStatusBody, encode_hook, port_status

DEFAULT_TIMEOUT = 30.0  # seconds; adding a port may wait for the child's side

_encoder = msgspec.json.Encoder(enc_hook=encode_hook)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        # The host only fills the Host header: the API ignores it (rootlessctl sends
        # "rootlesskit").
        super().__init__("rootlesskit", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: str, *, timeout: float = DEFAULT_TIMEOUT):
        self.socket_path = socket_path
        self.timeout = timeout

    def info(self) -> Info:
        return self._call("GET", "/v1/info", Info)

    def list_ports(self) -> list[PortStatus]:
        # `or []`: Go encodes an empty (nil) slice as null
        bodies = self._call("GET", "/v1/ports", list[PortStatusBody] | None) or []
        return [port_status(body) for body in bodies]

    def add_port(self, spec: PortSpec) -> PortStatus:
        return port_status(self._call("POST", "/v1/ports", PortStatusBody,
                                      _encoder.encode(spec)))

    def remove_port(self, ident: int) -> None:
        self._call("DELETE", f"/v1/ports/{int(ident)}", None)

    # -- plumbing --

    def _call(self, method: str, path: str, answer_type, body: bytes | None = None):
        status, data = self._request(method, path, body)
        if not 200 <= status < 300:
            raise ApiError(_error_message(status, data), status)
        if answer_type is None:
            return None
        try:
            return msgspec.json.decode(data, type=answer_type)
        except msgspec.DecodeError as exc:
            raise ApiError(f"unexpected answer to {method} {path} from {self.socket_path}: "
                           f"{exc}", status) from None

    def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        where = self.socket_path
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn = _UnixConnection(where, self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except FileNotFoundError:
            raise ApiUnreachable(f"no API socket at {where}: the instance may not be "
                                 f"running (check --socket or $ROOTLESSKIT_STATE_DIR)") from None
        except (ConnectionRefusedError, PermissionError) as exc:
            raise _refused(where, exc) from None
        except TimeoutError:
            raise ApiUnreachable(f"no answer from {where} within {self.timeout:g} s: the "
                                 f"instance may be stuck") from None
        except (OSError, http.client.HTTPException) as exc:
            # e.g. the connection closed before a whole answer came
            raise ApiUnreachable(f"cannot talk to the API at {where}: "
                                 f"{_describe(exc)}") from None
        finally:
            conn.close()


def _error_message(status: int, data: bytes) -> str:
    """The message of an error answer: `{"message": ...}`, else its text (Go's mux
    answers unknown paths with "404 page not found"), else the status."""
    try:
        message = msgspec.json.decode(data, type=ErrorBody).message
    except msgspec.DecodeError:
        message = data.decode(errors="replace")
    message = " ".join(message.split())  # one line, whatever the server sent
    return message or f"HTTP status {status}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower() if exc.strerror[:1].isupper() else exc.strerror
    return str(exc) or type(exc).__name__


def _refused(where: str, exc: OSError) -> ApiUnreachable:
    if not _is_socket(where):
        # connect() on another kind of file: ECONNREFUSED, or EACCES if not writable
        return ApiUnreachable(f"{where} is not a socket: give the api.sock in the "
                              f"instance's state dir")
    if isinstance(exc, PermissionError):
        return ApiUnreachable(f"permission denied on {where}: run as the user that "
                              f"started the instance")
    return ApiUnreachable(f"nothing listens on {where}: the instance may not be running "
                          f"any more (a stale socket)")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True  # gone meanwhile: let the caller's message stand
