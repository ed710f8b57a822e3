"""rootlesskit's REST API (1.1.1) on STATE/api.sock: models, a pure router, the h11
server on an epoll loop (rootless._loop), and a small sync client for rootless-ctl."""
import os

from .._listen import backlog

API_VERSION = "1.1.1"


def listen(path: str):
    """The API's listening unix socket at `path` (only its owner may connect): bound
    before the command starts, so that clients can queue before the API loads. With
    _socket, the C module: it is bound on the way to the command, where socket.py
    (and its enum) would cost 5 ms."""
    import _socket as socket

    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(backlog())
    except BaseException:
        sock.close()
        raise
    return sock

