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
