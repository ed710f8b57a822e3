"""Network drivers. One module a driver; third parties register theirs in the
`rootless.network_drivers` entry-point group (name = "module:Class")."""
from .._registry import Registry
from .base import NetworkDriver

registry = Registry(
    "--net", "rootless.network_drivers",
    builtin={
        "host": "rootless.drivers.network.host:HostDriver",
        "none": "rootless.drivers.network.none:NoneDriver",
    },
    planned={
        "slirp4netns": "is not supported yet (the slirp4netns driver is being built); "
                       "use --net=host or --net=none for now",
        "pasta": "is not supported yet (the pasta driver is being built); "
                 "use --net=host or --net=none for now",
        "vpnkit": "is not supported by rootless-run: use --net=slirp4netns or --net=pasta",
        "lxc-user-nic": "is not supported by rootless-run: use --net=slirp4netns or --net=pasta",
        "gvisor-tap-vsock": "is not supported by rootless-run: use --net=slirp4netns or --net=pasta",
    },
)


def get(name: str) -> type[NetworkDriver]:
    return registry.get(name)


__all__ = ["NetworkDriver", "get", "registry"]
