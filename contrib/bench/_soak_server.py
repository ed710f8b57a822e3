"""The soak's servers, run as the command in the supervisor's namespace (stdlib only;
run from a copy the benchmark writes to the state dir: the user may not be able to
read this checkout).

    python3 soak_server.py TCP_PORT UDP_PORT

On 127.0.0.1 in the namespace: UDP_PORT echoes each datagram; TCP_PORT tells the
kind of a connection by its first byte:
  Q + 15 bytes   a short request: answered with the 16 bytes reversed, then EOF
  U + count (4 bytes, big-endian)   an upload: the client sends `count` bursts and
                 shuts down its side; answered with the byte count (8 bytes)
  D + count      a download: `count` bursts of BURST bytes, a pause after each, EOF
A client that resets or goes away ends its connection only."""
import socket
import struct
import sys
import threading
import time

BURST = 8 << 20
PAUSE = 0.25  # between bursts: the relay's bulk path starts and stops (docs/performance.md)
ZEROS = bytes(1 << 20)


def read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def upload(conn: socket.socket) -> None:
    total = 0
    while chunk := conn.recv(1 << 20):
        total += len(chunk)
    conn.sendall(struct.pack(">Q", total))


def download(conn: socket.socket, count: int) -> None:
    for _ in range(count):
        for _ in range(BURST // len(ZEROS)):
            conn.sendall(ZEROS)
        time.sleep(PAUSE)


def serve(conn: socket.socket) -> None:
    with conn:
        try:
            kind = read_exactly(conn, 1)
            if kind == b"Q":
                conn.sendall((kind + read_exactly(conn, 15))[::-1])
            elif kind == b"U":
                read_exactly(conn, 4)
                upload(conn)
            elif kind == b"D":
                download(conn, struct.unpack(">I", read_exactly(conn, 4))[0])
        except (OSError, EOFError):
            pass  # the client reset or went away: its connection only


def serve_udp(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65536)
        try:
            sock.sendto(data, peer)
        except OSError:
            pass  # one datagram


def main(tcp_port: int, udp_port: int) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", udp_port))
    threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
    # Listening last: once TCP listens (what the benchmark waits for) UDP is bound too.
    server = socket.create_server(("127.0.0.1", tcp_port), backlog=1024)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
