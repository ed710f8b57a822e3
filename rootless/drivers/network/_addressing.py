"""The child network's addresses from --cidr, as rootlesskit lays them out:
gateway .2, DNS .3, child .100. One place for slirp4netns and pasta."""
import ipaddress

from ...errors import UsageError

DEFAULT_MTU = 65520


class Addressing:
    __slots__ = ("cidr", "network", "child", "gateway", "dns", "prefixlen")

    def __init__(self, cidr: str):
        try:
            network = ipaddress.IPv4Network(cidr, strict=False)
        except ValueError as exc:
            raise UsageError(f"--cidr={cidr}: {exc}; use an IPv4 network such as "
                             f"10.0.2.0/24") from None
        if network.num_addresses < 128:
            raise UsageError(f"--cidr={cidr}: too small, the child's address is .100: use a "
                             f"prefix of /25 or shorter")
        self.cidr = str(network)
        self.network = network
        self.prefixlen = network.prefixlen
        self.gateway = str(network.network_address + 2)
        self.dns = str(network.network_address + 3)
        self.child = str(network.network_address + 100)


def effective_mtu(mtu: int) -> int:
    return mtu or DEFAULT_MTU
