"""Port drivers: how published ports reach the child."""
from .._registry import Registry
from .base import PortDriver

registry = Registry(
    "--port-driver", "rootless.port_drivers",
    builtin={"none": "rootless.drivers.port.none:NoPortDriver",
             "builtin": "rootless.drivers.port.builtin:BuiltinPortDriver",
             "implicit": "rootless.drivers.port.implicit:ImplicitPortDriver"},
    planned={
        name: "is not supported yet (port forwarding is being built); use "
              "--port-driver=builtin"
        for name in ("slirp4netns",)
    },
)


def get(name: str) -> type[PortDriver]:
    return registry.get(name)


__all__ = ["PortDriver", "get", "registry"]
