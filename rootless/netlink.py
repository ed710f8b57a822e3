"""Links, addresses and routes through netlink (pyroute2), in the caller's netns.

pyroute2 is imported here, lazily: it costs ~0.1 s, paid only by drivers that
configure interfaces.
"""


def set_link_up(ifname: str) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            raise OSError(f"no interface named {ifname}")
        ipr.link("set", index=index[0], state="up")


def add_local_table(table: int) -> None:
    """Make `table` deliver everything locally (both families): a packet routed by it
    goes to a local socket, whatever its destination address."""
    import socket
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.route("add", family=socket.AF_INET, dst="0.0.0.0/0", type="local", oif=lo,
                  table=table, scope="host")
        _ipv6_optional(ipr.route, "add", family=socket.AF_INET6, dst="::/0", type="local",
                       oif=lo, table=table)


def rule(command: str, table: int, priority: int, **match) -> None:
    """`ip rule add|del ... lookup table` for both families; `match` as pyroute2's
    rule() takes it (fwmark=..., or ip_proto=... with sport_range="P:P")."""
    import socket
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.rule(command, family=socket.AF_INET, table=table, priority=priority, **match)
        _ipv6_optional(ipr.rule, command, family=socket.AF_INET6, table=table,
                       priority=priority, **match)


def _ipv6_optional(call, *args, **kwargs) -> None:
    """IPv6 may be disabled in the netns: then there is nothing to route."""
    import errno
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code not in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
            raise
