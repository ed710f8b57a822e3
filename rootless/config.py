"""The run's configuration: a frozen value built by the CLI, no I/O here.

A plain class, not a msgspec Struct or a dataclass: their imports (typing,
inspect) would sit on the path to the user's command.
"""

# field -> default (rootlesskit's defaults; rootless-run's own differ in cli.py)
FIELDS: dict[str, object] = {
    "program": "rootless-run",
    "debug": False,
    "state_dir": "",  # "" = a private temp dir removed on exit
    "name": "",  # ours: --name, the instance's name (its state dir unless --state-dir)
    "net": "host",
    "slirp4netns_binary": "slirp4netns",
    "pasta_binary": "pasta",
    "vpnkit_binary": "vpnkit",  # accepted, unused: --net=vpnkit is not available
    "lxc_user_nic_binary": "",  # "": where LXC installs it (drivers/network/lxc_user_nic)
    "lxc_user_nic_bridge": "lxcbr0",
    "slirp4netns_sandbox": "false",
    "slirp4netns_seccomp": "false",
    "mtu": 0,
    "cidr": "10.0.2.0/24",
    "ifname": "tap0",
    "disable_host_loopback": False,
    "ipv6": False,
    "copy_up": (),
    "copy_up_mode": "tmpfs+symlink",
    "propagation": "rprivate",
    "port_driver": "none",
    "publish": (),
    "source_ip_transparent": True,
    "pidns": False,
    "cgroupns": False,
    "utsns": False,
    "ipcns": False,
    "detach_netns": False,
    "reaper": "auto",
    "evacuate_cgroup2": "",
    "subid_source": "auto",
    "reuse": False,
    "notify": "none",  # ours: rootlesskit leaves readiness to the command
    "pasta_auto_forward": False,  # ours: rootlesskit never turns it on
    "command": (),
}


# The interface name in the namespace, for the drivers whose default is not
# FIELDS["ifname"] (rootlesskit's): used when --ifname is not given.
DRIVER_IFNAMES = {"lxc-user-nic": "eth0"}


class Config:
    __slots__ = tuple(FIELDS)

    def __init__(self, **values):
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise TypeError(f"unknown config fields: {', '.join(sorted(unknown))}")
        for name, default in FIELDS.items():
            object.__setattr__(self, name, values.get(name, default))

    def __setattr__(self, name, value):
        raise AttributeError("Config is frozen")

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in FIELDS) + ")"

    def replace(self, **values) -> "Config":
        return Config(**{**{n: getattr(self, n) for n in FIELDS}, **values})

    @property
    def new_netns(self) -> bool:
        """Whether the run creates a network namespace (detached or the child's own)."""
        return self.net != "host"

    @property
    def child_netns(self) -> bool:
        """Whether the child itself lives in the new network namespace."""
        return self.new_netns and not self.detach_netns

    @property
    def reap(self) -> bool:
        """Whether pid 1 of the pid namespace reaps orphans (rootlesskit's --reaper)."""
        return self.pidns and self.reaper != "false"
