"""rootlesskit's REST API (1.1.1) on STATE/api.sock: models, a pure router, the h11
server on trio, and a small sync client for rootless-ctl."""
import os

API_VERSION = "1.1.1"


def listen(path: str):
    """The API's listening unix socket at `path` (only its owner may connect): bound
    with the standard library, so that clients can queue before trio is loaded."""
    import socket

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


def backlog() -> int:
    """The system's listen backlog (net.core.somaxconn), as Go's net package takes for
    rootlesskit: a burst of clients waits in the queue, where a backlog of 128 made
    the 129th connect() fail with EAGAIN."""
    import socket

    try:
        with open("/proc/sys/net/core/somaxconn", "rb") as f:
            return max(int(f.read()), 1)
    except (OSError, ValueError):
        return socket.SOMAXCONN
