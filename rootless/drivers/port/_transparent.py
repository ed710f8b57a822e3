"""The client's source address, seen by the child: both halves.

Parent side: the socket the parent connects into the child's netns is made
transparent (IP_TRANSPARENT: it may bind an address that is not local there), bound
to the client's address, and marked. The parent may do this to a socket of the
child's netns because it owns the child's user namespace: it holds CAP_NET_ADMIN there.

Child side: the server's answers go to that non-local address, so the default route
would carry them out of the namespace (to slirp4netns). Policy routing brings them
back to lo, where the transparent socket receives them:
- TCP: with tcp_fwmark_accept, the accepted socket inherits the mark of our SYN;
  marked packets are looked up in a table that delivers everything locally;
- UDP has no accepted socket to carry a mark: a rule per published child port sends
  what the server answers from that port through the same table (rootlesskit v3 gave
  up on UDP for this reason; the cost here is that the server's own outgoing UDP from
  that very port stays inside the namespace).
"""
import _socket as socket  # the constants: not socket.py, which loads enum

# Loaded with this module, before the fork (rootless.linux is already): the socket
# factory's first request sets up the routing, and an import then was 1-1.5 ms of the
# first client's wait.
from ...linux import netlink

MARK = TABLE = 0x524C  # "RL"
_MARK_PRIORITY, _UDP_PRIORITY = 100, 101
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_BIND_ADDRESS_NO_PORT = 24


# -- child side (the socket factory's process, in the child's netns) -------------------

def set_up_routing() -> None:
    """Raises OSError when it cannot."""
    with open("/proc/sys/net/ipv4/tcp_fwmark_accept", "w") as f:
        f.write("1")
    netlink.add_local_table(TABLE)
    netlink.rule("add", TABLE, _MARK_PRIORITY, fwmark=MARK, fwmask=0xFFFFFFFF)


def udp_rule(command: str, port: int) -> None:
    netlink.rule(command, TABLE, _UDP_PRIORITY, ip_proto=socket.IPPROTO_UDP, sport=port)


# -- parent side --------------------------------------------------------------------------

def client_address(peer: tuple, family: int) -> str | None:
    """The client's IP as an address of `family`, or None if it has none there (an
    IPv6 client of an IPv4 child port, or the reverse). Dual-stack listeners see IPv4
    clients as ::ffff:a.b.c.d."""
    ip = peer[0]
    if family == socket.AF_INET:
        if ip.startswith("::ffff:") and "." in ip:
            return ip[7:]
        return None if ":" in ip else ip
    # An IPv4 client (::ffff:a.b.c.d) has no IPv6 address: a socket bound to the
    # mapped address cannot connect to an IPv6 one.
    return ip if ":" in ip and "." not in ip else None


def make_transparent(sock, family: int, ip: str, udp_port: int = 0) -> None:
    """Prepare `sock` (unbound, of the child's netns) to speak from `ip`. TCP binds
    port 0, chosen at connect; UDP binds `udp_port` (0: any)."""
    if family == socket.AF_INET:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        if sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    sock.bind((ip, udp_port))
