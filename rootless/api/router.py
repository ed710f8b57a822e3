"""Requests to responses, apart from any I/O: (method, path, body) -> (status, body).

The port operations are delegated to a PortManager (the port driver's parent side),
whose errors carry their HTTP status."""
import msgspec

from ..errors import RootlessError
from .models import ErrorBody, PortSpec

_json = msgspec.json.Encoder()
_spec_decoder = msgspec.json.Decoder(PortSpec)


class ApiFailure(RootlessError):
    """An error with the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> tuple[int, bytes]:
    return status, _json.encode(ErrorBody(message=message))


class Router:
    def __init__(self, info, ports):
        self._info = info      # () -> models.Info
        self._ports = ports    # a PortManager: list() / async add(spec) / async remove(id)

    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        path = path.split("?", 1)[0].rstrip("/")
        try:
            if path == "/v1/info" and method == "GET":
                return 200, _json.encode(self._info())
            if path == "/v1/ports":
                if method == "GET":
                    return 200, _json.encode(self._ports.list())
                if method == "POST":
                    return 201, _json.encode(await self._ports.add(self._spec(body)))
                return error(405, f"{method} is not allowed on {path}: use GET or POST")
            if path.startswith("/v1/ports/"):
                if method != "DELETE":
                    return error(405, f"{method} is not allowed on {path}: use DELETE")
                ident = path.rsplit("/", 1)[1]
                if not ident.isdigit():
                    return error(400, f"port id {ident!r} is not a number")
                await self._ports.remove(int(ident))
                return 200, b""
            if path in ("/v1/info",):
                return error(405, f"{method} is not allowed on {path}: use GET")
            return error(404, f"no such endpoint: {path}")
        except ApiFailure as exc:
            return error(exc.status, str(exc))
        except RootlessError as exc:  # bad input found by the shared parsers/validators
            return error(400, str(exc))

    @staticmethod
    def _spec(body: bytes) -> PortSpec:
        try:
            return _spec_decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ApiFailure(400, f"invalid port spec body: {exc}") from None
