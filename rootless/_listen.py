"""The listen backlog of sockets that face clients: api.sock and published ports."""


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
