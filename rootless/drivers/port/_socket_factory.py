"""A small process in the child's network namespace that makes unconnected sockets
for the parent and passes them over a unix socket (SCM_RIGHTS).

A socket belongs to the netns it was created in: the parent connects such a socket
itself, and the connection is made inside the child's namespace. The parent asks in
batches, so a connection through a published port costs no round trip to the child.
Request: 2 bytes, family ('4' or '6') and a count; answer: count bytes + count fds.
"""
import os
import signal
import socket

FACTORY_SOCKET = ".ports.sock"
_FAMILIES = {b"4": socket.AF_INET, b"6": socket.AF_INET6}


def start(state_dir: str, netns: str | None) -> None:
    """Fork the factory; it lives until the child (its parent) dies."""
    path = os.path.join(state_dir, FACTORY_SOCKET)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(4)
    pid = os.fork()
    if pid:
        listener.close()
        return
    try:
        from ...linux import set_parent_death_signal, setns, CLONE_NEWNET

        set_parent_death_signal(signal.SIGKILL)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        if netns:
            fd = os.open(netns, os.O_RDONLY)
            setns(fd, CLONE_NEWNET)
            os.close(fd)
        _serve(listener)
    finally:
        os._exit(0)


def _serve(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            while True:
                request = conn.recv(2)
                if len(request) < 2:
                    break
                family = _FAMILIES.get(request[:1])
                count = request[1]
                if family is None or not count:
                    break
                socks = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
                fds = [s.fileno() for s in socks]
                socket.send_fds(conn, [b"s" * count], fds)
                for s in socks:
                    s.close()
