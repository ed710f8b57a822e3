"""The run's configuration: a frozen value built by the CLI, no I/O here."""
import msgspec


class Config(msgspec.Struct, frozen=True, kw_only=True):
    program: str = "rootless-run"
    debug: bool = False
    state_dir: str = ""  # "" = a private temp dir removed on exit
    net: str = "host"
    slirp4netns_binary: str = "slirp4netns"
    pasta_binary: str = "pasta"
    slirp4netns_sandbox: str = "false"
    slirp4netns_seccomp: str = "false"
    mtu: int = 0
    cidr: str = "10.0.2.0/24"
    ifname: str = "tap0"
    disable_host_loopback: bool = False
    ipv6: bool = False
    copy_up: tuple[str, ...] = ()
    copy_up_mode: str = "tmpfs+symlink"
    propagation: str = "rprivate"
    port_driver: str = "none"
    publish: tuple[str, ...] = ()
    source_ip_transparent: bool = True
    pidns: bool = False
    cgroupns: bool = False
    utsns: bool = False
    ipcns: bool = False
    detach_netns: bool = False
    reaper: str = "auto"
    evacuate_cgroup2: str = ""
    subid_source: str = "auto"
    command: tuple[str, ...] = ()

    @property
    def new_netns(self) -> bool:
        return self.net != "host"

    @property
    def reap(self) -> bool:
        """Whether pid 1 of the pid namespace reaps orphans (rootlesskit's --reaper)."""
        return self.pidns and self.reaper != "false"
