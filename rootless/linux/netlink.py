"""Links, addresses, routes and rules through netlink, in the caller's netns.

pyroute2 is imported here, lazily: it costs ~0.1 s, paid only by drivers that
configure interfaces. The routing of clients' addresses (`add_local_table`, `rule`)
is encoded by hand below: it runs in the long-lived socket factory, on a first
client's way.
"""
import struct


def set_link_up(ifname: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            raise OSError(f"no interface named {ifname}")
        ipr.link("set", index=index[0], state="up")


def add_local_table(table: int) -> None:
    """Make `table` deliver everything locally (both families): a packet routed by it
    goes to a local socket, whatever its destination address. OSError if it cannot."""
    import _socket as socket  # not socket.py: it loads enum (1 MiB)

    lo = socket.if_nametoindex("lo")
    with _Rtnetlink() as rt:
        for family, scope in ((socket.AF_INET, _RT_SCOPE_HOST),
                              (socket.AF_INET6, _RT_SCOPE_UNIVERSE)):
            rtmsg = _RTMSG.pack(family, 0, 0, 0, 0, _RTPROT_BOOT, scope, _RTN_LOCAL, 0)
            rt.request(_RTM_NEWROUTE, _CREATE, rtmsg + _u32(_RTA_OIF, lo)
                       + _u32(_RTA_TABLE, table), optional=family == socket.AF_INET6)


def rule(command: str, table: int, priority: int, *, fwmark: int = 0, fwmask: int = 0,
         ip_proto: int = 0, sport: int = 0) -> None:
    """`ip rule add|del [fwmark M/MASK] [ipproto P sport S] priority N lookup table`
    for both families. OSError if it cannot be."""
    import _socket as socket  # not socket.py: it loads enum (1 MiB)

    attributes = _u32(_FRA_PRIORITY, priority) + _u32(_FRA_TABLE, table)
    if fwmark:
        attributes += _u32(_FRA_FWMARK, fwmark) + _u32(_FRA_FWMASK, fwmask)
    if ip_proto:
        attributes += _attribute(_FRA_IP_PROTO, bytes([ip_proto]))
    if sport:
        attributes += _attribute(_FRA_SPORT_RANGE, _PORT_RANGE.pack(sport, sport))
    kind, flags = (_RTM_NEWRULE, _CREATE) if command == "add" else (_RTM_DELRULE, 0)
    with _Rtnetlink() as rt:
        for family in (socket.AF_INET, socket.AF_INET6):
            header = _FIB_RULE_HDR.pack(family, 0, 0, 0, 0, 0, 0, _FR_ACT_TO_TBL, 0)
            rt.request(kind, flags, header + attributes,
                       optional=family == socket.AF_INET6)


# rtnetlink, written by hand for the two calls above: the socket factory makes them
# (the first client of a port that shows clients' addresses, and each UDP port), and
# pyroute2's import there took 0.1-0.3 s of a CPU and 20 MiB, in a process of its own,
# on the first client's way. The constants are <linux/netlink.h>, <linux/rtnetlink.h>
# and <linux/fib_rules.h>.
_NLMSGHDR = struct.Struct("=IHHII")       # len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")      # family, dst_len, src_len, tos, table,
#                                           protocol, scope, type, flags
_FIB_RULE_HDR = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table,
#                                              res1, res2, action, flags
_NLATTR = struct.Struct("=HH")            # len, type
_NLMSGERR = struct.Struct("=i")           # error (the request follows)
_PORT_RANGE = struct.Struct("=HH")        # struct fib_rule_port_range: start, end
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_CREATE = _NLM_F_CREATE | _NLM_F_EXCL     # as `ip route add`, `ip rule add`
_NLMSG_ERROR = 2
_RTM_NEWROUTE, _RTM_NEWRULE, _RTM_DELRULE = 24, 32, 33
_RTA_OIF, _RTA_TABLE = 4, 15
_RTPROT_BOOT, _RT_SCOPE_UNIVERSE, _RT_SCOPE_HOST, _RTN_LOCAL = 3, 0, 254, 2
_FRA_PRIORITY, _FRA_FWMARK, _FRA_TABLE, _FRA_FWMASK = 6, 10, 15, 16
_FRA_IP_PROTO, _FRA_SPORT_RANGE = 22, 23
_FR_ACT_TO_TBL = 1


def _attribute(kind: int, payload: bytes) -> bytes:
    size = _NLATTR.size + len(payload)
    return _NLATTR.pack(size, kind) + payload + bytes(-size % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attribute(kind, struct.pack("=I", value))


class _Rtnetlink:
    """A NETLINK_ROUTE socket in the caller's netns, one acknowledged request at a time."""

    def __init__(self):
        import _socket as socket

        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                   socket.NETLINK_ROUTE)
        self._seq = 0

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self._sock.close()

    def request(self, kind: int, flags: int, body: bytes, optional: bool = False) -> None:
        """Send one request, wait for its acknowledgement; OSError with the kernel's
        errno if it refused. `optional`: a family the netns lacks (IPv6 disabled)
        means there is nothing to route, not an error."""
        import errno
        import os

        self._seq += 1
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind,
                                _NLM_F_REQUEST | _NLM_F_ACK | flags, self._seq, 0)
        self._sock.sendto(header + body, (0, 0))
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                size, reply, _, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                if reply == _NLMSG_ERROR and seq == self._seq:
                    error = -_NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)[0]
                    if not error or (optional and error in (errno.EAFNOSUPPORT,
                                                            errno.EOPNOTSUPP)):
                        return
                    raise OSError(error, os.strerror(error))
                offset += max(size + (-size % 4), _NLMSGHDR.size)
