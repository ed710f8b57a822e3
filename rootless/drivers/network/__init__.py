"""Network drivers. One module a driver; third parties register theirs in the
`rootless.network_drivers` entry-point group (name = "module:Class")."""
from .._registry import Registry
from .base import NetworkDriver

# What to use when a rootlesskit driver is not available here (docs/performance.md).
_INSTEAD = ("use --net=slirp4netns (measured here from the namespace to the host: "
            "5.7 Gbit/s, against pasta's 1.0) or --net=pasta")

registry = Registry(
    "--net", "rootless.network_drivers",
    builtin={
        "host": "rootless.drivers.network.host:HostDriver",
        "none": "rootless.drivers.network.none:NoneDriver",
        "slirp4netns": "rootless.drivers.network.slirp4netns:Slirp4netnsDriver",
        "pasta": "rootless.drivers.network.pasta:PastaDriver",
        "lxc-user-nic": "rootless.drivers.network.lxc_user_nic:LxcUserNicDriver",
    },
    planned={
        "vpnkit": "is not available: vpnkit is a program of its own, which Debian does not "
                  "package; " + _INSTEAD,
        "gvisor-tap-vsock": "is not available: it is a Go library built into rootlesskit, not "
                            "a program rootless-run can start; " + _INSTEAD,
    },
    chosen_by_us=("auto",),  # choose_auto
)


def get(name: str) -> type[NetworkDriver]:
    return registry.get(name)


def choose_auto(config) -> tuple[str, str]:
    """--net=auto: (driver, why). slirp4netns first: measured here, Debian 12's pasta
    (2023-03) stalls, moving child-to-host TCP at 0.1-4.8 Gbps from run to run, never
    more than slirp4netns in the same run (5.7 Gbps; docs/performance.md); pasta when
    slirp4netns is missing. Never lxc-user-nic, though faster, even for a user granted
    a veth: it puts the namespace on a shared layer-2 network (docs/network.md, lxc-user-nic)."""
    from ...errors import RootlessError
    from ._helper import check_tun, find_binary

    missing = []
    for name, flag, package in (("slirp4netns", "--slirp4netns-binary", "slirp4netns"),
                                ("pasta", "--pasta-binary", "passt")):
        try:
            find_binary(flag, getattr(config, flag[2:].replace("-", "_")), package)
            check_tun()
        except RootlessError as exc:
            missing.append(f"{name}: {exc}")
            continue
        why = ("faster than Debian 12's pasta from the namespace to the host" if not missing
               else "slirp4netns is not usable")
        return name, why
    return "none", "no user-mode network helper works here (" + "; ".join(missing) + \
        "): the namespace has only loopback"


__all__ = ["NetworkDriver", "choose_auto", "get", "registry"]
