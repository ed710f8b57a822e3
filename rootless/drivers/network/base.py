"""What a network driver provides. Drivers never import cli, parent or child, and
never import trio at module level (the child imports the chosen driver)."""
from ...config import Config


class NetworkDriver:
    name: str = ""
    #: The child's address may change while the run lasts (the API's dynamicChildIP).
    dynamic_child_ip = False

    def __init__(self, config: Config):
        self.config = config

    def preflight(self) -> None:
        """Check what the driver needs (binaries, devices, flags) before any namespace
        exists; raise a RootlessError naming the cause and the fix."""

    def start(self, child_pid: int, state_dir: str, netns_path: str | None = None):
        """Parent side, once the child's namespaces exist: start helpers, wait until the
        network is up. The netns is the child's, or with --detach-netns the one at
        `netns_path` (owned by the child's user namespace). Returns a
        netinfo.NetworkInfo, or None for nothing to configure."""
        return None

    def helpers(self) -> list:
        """Helper processes whose death ends the run (see _helper.Helper)."""
        return []

    def stop(self) -> None:
        """Stop the helpers; idempotent."""

    @staticmethod
    def configure_child(info) -> None:
        """Child side, inside the new namespaces, before the command starts."""


class HelperDriver(NetworkDriver):
    """A driver whose network comes from a user-mode helper (slirp4netns, pasta) that
    configures the child's interface itself: addresses from --cidr, /dev/net/tun."""

    binary_flag = ""  # e.g. --slirp4netns-binary
    package = ""      # the Debian package that ships the binary

    def preflight(self) -> None:
        from ._addressing import Addressing, effective_mtu
        from ._helper import check_tun, find_binary

        self.binary = find_binary(self.binary_flag, self.binary_name(), self.package)
        self.addressing = Addressing(self.config.cidr)
        self.mtu = effective_mtu(self.config.mtu)
        check_tun()
        self.helper = None

    def binary_name(self) -> str:
        return getattr(self.config, self.binary_flag.removeprefix("--").replace("-", "_"))

    def info(self, **opaque: str):
        from ...wire.netinfo import NetworkInfo

        a = self.addressing
        return NetworkInfo(ifname=self.config.ifname, ip=a.child, netmask=a.prefixlen,
                           gateway=a.gateway, dns=(a.dns,), mtu=self.mtu, opaque=opaque)

    def helpers(self) -> list:
        return [self.helper] if self.helper else []
