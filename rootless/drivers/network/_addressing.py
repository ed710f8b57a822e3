"""The child network's addresses from --cidr, as rootlesskit lays them out:
gateway .2, DNS .3, child .100. One place for slirp4netns and pasta."""
import _socket

from ...errors import UsageError

DEFAULT_MTU = 65520


class Addressing:
    __slots__ = ("cidr", "child", "gateway", "dns", "prefixlen")

    def __init__(self, cidr: str):
        network, self.prefixlen = _network(cidr)
        if self.prefixlen > 25:
            raise UsageError(f"--cidr={cidr}: too small, the child's address is .100: use a "
                             f"prefix of /25 or shorter")
        self.cidr = f"{_text(network)}/{self.prefixlen}"
        self.gateway = _text(network + 2)
        self.dns = _text(network + 3)
        self.child = _text(network + 100)


def _network(cidr: str) -> tuple[int, int]:
    """The network's first address (an int) and its prefix length. A dotted quad and a
    prefix are read without ipaddress (0.3 MiB, on every run's path); anything else,
    and every error, goes through it."""
    address, slash, prefix = cidr.partition("/")
    if slash and prefix.isascii() and prefix.isdigit() and int(prefix) <= 32:
        try:
            packed = _socket.inet_pton(_socket.AF_INET, address)
        except (OSError, ValueError):
            packed = None
        if packed is not None and _socket.inet_ntop(_socket.AF_INET, packed) == address:
            bits = int(prefix)
            mask = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
            return int.from_bytes(packed, "big") & mask, bits
    import ipaddress

    try:
        network = ipaddress.IPv4Network(cidr, strict=False)
    except ValueError as exc:
        raise UsageError(f"--cidr={cidr}: {exc}; use an IPv4 network such as "
                         f"10.0.2.0/24") from None
    return int(network.network_address), network.prefixlen


def _text(address: int) -> str:
    return _socket.inet_ntop(_socket.AF_INET, address.to_bytes(4, "big"))


def effective_mtu(mtu: int) -> int:
    return mtu or DEFAULT_MTU
