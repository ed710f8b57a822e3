"""`rootless-run` (also invoked as `rootlesskit` / `docker-rootlesskit`): arguments in,
Config out, errors mapped to one line on stderr and exit status 1."""
import os
import sys

from . import __version__, _flags, _log
from .config import DRIVER_IFNAMES, FIELDS, Config
from .errors import OutOfFds, RootlessError, UsageError

ROOTLESSKIT_NAMES = ("rootlesskit", "docker-rootlesskit")

# rootlesskit's defaults are Config's. rootless-run's own are safer and need no flags:
# the best network that works here, /etc writable (so resolv.conf can be replaced
# without touching the host's), /run writable (daemons keep their sockets and pid
# files there: dockerd needs it), and no way to the host's loopback services.
RUN_DEFAULTS: dict = {"net": "auto", "port_driver": "auto", "copy_up": ("/etc", "/run"),
                      "disable_host_loopback": True}


def defaults_for(program: str) -> dict:
    return {} if program in ROOTLESSKIT_NAMES else dict(RUN_DEFAULTS)


def build_config(program: str, argv: list[str]) -> Config | str:
    """A Config, or the text to print for --help/--version."""
    values, action = _flags.parse(argv)
    defaults = defaults_for(program)
    if action == "help":
        return _flags.help_text(program, {**FIELDS, **defaults})
    if action == "version":
        return f"{program} version {__version__} (rootlesskit API 1.1.1)\n"
    semver = values.pop("print_semver", "")
    if semver:  # an empty value is no value, as rootlesskit reads it
        return f"{version_component(semver)}\n"
    if "evacuate_cgroup2" in values:  # given, even empty
        from .integrations.cgroup import check_name
        check_name(values["evacuate_cgroup2"])
    merged = {**defaults, **values}
    if "name" in values:
        from .state.instances import check_name, named_dir
        check_name(values["name"])
        if not values.get("state_dir"):  # --state-dir wins
            merged["state_dir"] = named_dir(values["name"])
    _driver_defaults(merged, values)
    for field in ("copy_up", "publish", "command"):
        if field in merged:
            merged[field] = tuple(merged[field])
    if "none" in merged.get("copy_up", ()):
        merged["copy_up"] = tuple(d for d in merged["copy_up"] if d != "none")
    if not merged.get("command"):
        merged["command"] = (os.environ.get("SHELL") or "/bin/sh",)
    config = Config(program=program, **merged)
    validate(config)
    return config


SEMVER = ("major", "minor", "patch")


def version_component(name: str) -> int:
    """--print-semver: one number of our version's release (X, Y or Z of X.Y.Z,
    X.Y.Z.devN, X.YrcN...), as rootlesskit prints its own (and runs nothing)."""
    if name not in SEMVER:
        raise UsageError(f"--print-semver={name}: expected major, minor or patch")
    release = __version__.split("+")[0].split(".") + ["0", "0"]
    text = release[SEMVER.index(name)]
    digits = len(text) - len(text.lstrip("0123456789"))
    return int(text[:digits] or 0)


def _driver_defaults(merged: dict, given: dict) -> None:
    """Where a driver departs from the defaults, as rootlesskit does: lxc-user-nic
    names its interface eth0 unless --ifname says otherwise, and takes its address
    from the bridge's DHCP server, so that --cidr has nothing to set."""
    net = merged.get("net")
    if net in DRIVER_IFNAMES and "ifname" not in given:
        merged["ifname"] = DRIVER_IFNAMES[net]
    if net == "lxc-user-nic" and "cidr" in given:
        raise UsageError("--cidr does not go with --net=lxc-user-nic: the namespace's "
                         "address comes from the DHCP server on the bridge; drop --cidr")


def validate(config: Config) -> None:
    """Checks across flags; each names the flag and the fix."""
    if config.reaper == "true" and not config.pidns:
        raise UsageError("--reaper=true needs --pidns (only pid 1 of a pid namespace reaps "
                         "orphans): add --pidns, or use --reaper=auto")
    if config.evacuate_cgroup2 and not (config.pidns and config.cgroupns):
        raise UsageError("--evacuate-cgroup2 needs --pidns and --cgroupns: add both")
    if config.detach_netns and config.net == "host":
        raise UsageError("--detach-netns needs a network namespace: use it with --net "
                         "other than host")
    if config.mtu and not 68 <= config.mtu <= 65521:
        raise UsageError(f"--mtu={config.mtu} is out of range: use 68..65521, or 0 for the "
                         f"driver's default")
    if config.mtu and config.ipv6 and config.mtu < 1280:
        raise UsageError(f"--mtu={config.mtu} is too small for --ipv6: IPv6 needs at least 1280")
    if config.net not in ("host", "none"):
        _check_ifname(config.ifname)
    if config.pasta_auto_forward:
        _check_auto_forward(config)
    if config.reuse and not config.state_dir:
        raise UsageError("--reuse needs --state-dir DIR or --name NAME: the instance to "
                         "join or to start")
    for directory in config.copy_up:
        if not directory.startswith("/"):
            raise UsageError(f"--copy-up={directory}: needs an absolute path, e.g. /etc")


def _check_auto_forward(config: Config) -> None:
    """--pasta-auto-forward is pasta's own forwarding of every port: asked for alone."""
    if config.net != "pasta":
        raise UsageError(f"--pasta-auto-forward needs --net=pasta (it is pasta's own "
                         f"forwarding), not --net={config.net}: add --net=pasta, or drop "
                         f"the flag and publish with -p")
    if config.port_driver not in ("implicit", "auto"):
        raise UsageError(f"--pasta-auto-forward needs --port-driver=implicit (pasta "
                         f"forwards), not --port-driver={config.port_driver}: drop one")
    if config.publish:
        raise UsageError("--pasta-auto-forward and -p do not go together: pasta either "
                         "follows the -p rules or forwards every port; drop one")


def _check_ifname(name: str) -> None:
    """The kernel's rules for an interface name (dev_valid_name). slirp4netns would
    silently cut a long one to 15 bytes, and fail on others with an ioctl's errno."""
    problem = None
    if not name:
        problem = "is empty"
    elif not _is_text(name):
        problem = "has bytes that are not UTF-8 text"
    elif len(name.encode()) > 15:
        problem = f"is {len(name.encode())} bytes long, more than an interface name's 15"
    elif name in (".", ".."):
        problem = "is not a name an interface can have"
    elif any(c in "/:" or c.isspace() for c in name):
        problem = "has a '/', ':' or a space, which an interface name cannot have"
    if problem:
        raise UsageError(f"--ifname={name}: {problem}; use a name such as tap0")


def _is_text(value: str) -> bool:
    """Whether an argument is UTF-8 text (others reach us as lone surrogates), as the
    values sent to the child and the API must be."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "rootless-run"
    if program not in ROOTLESSKIT_NAMES:
        program = "rootless-run"
    _log.configure(debug=False, program=program)
    try:
        config = build_config(program, sys.argv[1:] if argv is None else argv)
        if isinstance(config, str):
            sys.stdout.write(config)
            return 0
        _log.configure(debug=config.debug, program=program)
        if config.reuse:
            from .enter import reuse
            return reuse(config)
        from .parent.run import run
        return run(config)
    except RootlessError as exc:
        _log.error(str(exc))
        return exc.exit_code
    except OSError as exc:
        # Out of fds, any step may fail (even an import): one line, not a traceback.
        error = OutOfFds.check(exc)
        if error is None:
            raise
        _log.error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
