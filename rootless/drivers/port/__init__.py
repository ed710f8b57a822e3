"""Port drivers: how published ports reach the child. One module a driver; third
parties register theirs in the `rootless.port_drivers` entry-point group."""
from .._registry import Registry
from .base import PortDriver

registry = Registry(
    "--port-driver", "rootless.port_drivers",
    builtin={"none": "rootless.drivers.port.none:NoPortDriver",
             "builtin": "rootless.drivers.port.builtin:BuiltinPortDriver",
             "slirp4netns": "rootless.drivers.port.slirp4netns:Slirp4netnsPortDriver",
             "implicit": "rootless.drivers.port.implicit:ImplicitPortDriver"},
    chosen_by_us=("auto",),  # parent._auto_port_driver
)


def get(name: str) -> type[PortDriver]:
    return registry.get(name)


__all__ = ["PortDriver", "get", "registry"]
