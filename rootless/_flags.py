"""The command-line flags: one table, one parser, the help text made from the table.

Hand-written rather than argparse: it keeps start-up fast, accepts Go-style forms
rootlesskit users type (`-net=host`, `--pidns=true`, `--publish=SPEC`), and gives
one-line errors.
"""
from .errors import UsageError

BOOL, STR, INT, LIST = "bool", "str", "int", "list"


class Flag:
    __slots__ = ("names", "field", "kind", "help", "choices", "metavar")

    def __init__(self, names: tuple[str, ...], field: str, kind: str, help: str,
                 choices: tuple[str, ...] = (), metavar: str = "VALUE"):
        self.names, self.field, self.kind, self.help = names, field, kind, help
        self.choices, self.metavar = choices, metavar


FLAGS: tuple[Flag, ...] = (
    Flag(("--debug",), "debug", BOOL, "verbose log to stderr"),
    Flag(("--print-semver",), "print_semver", STR, "print that component of the version "
         "as a decimal integer, and exit", metavar="{major|minor|patch}"),
    Flag(("--state-dir",), "state_dir", STR, "state directory (if not given: a temp dir "
         "removed on exit)", metavar="DIR"),
    Flag(("--name",), "name", STR, "ours: name the instance; its state dir is then "
         "$XDG_RUNTIME_DIR/rootless/NAME unless --state-dir is given, and rootless-ctl "
         "--name NAME finds it", metavar="NAME"),
    # No fixed choices: drivers of other packages register through an entry point.
    Flag(("--net",), "net", STR, "network driver (auto: slirp4netns, else pasta, else none; "
         "others from installed plugins)",
         metavar="{auto|host|none|slirp4netns|pasta|lxc-user-nic}"),
    Flag(("--slirp4netns-binary",), "slirp4netns_binary", STR, "path of slirp4netns", metavar="PATH"),
    Flag(("--pasta-binary",), "pasta_binary", STR, "path of pasta", metavar="PATH"),
    Flag(("--vpnkit-binary",), "vpnkit_binary", STR, "accepted for rootlesskit's scripts: "
         "--net=vpnkit is not available (no vpnkit in Debian)", metavar="PATH"),
    Flag(("--lxc-user-nic-binary",), "lxc_user_nic_binary", STR, "path of LXC's setuid "
         "lxc-user-nic (if not given: /usr/libexec/lxc/lxc-user-nic, else found on PATH)",
         metavar="PATH"),
    Flag(("--lxc-user-nic-bridge",), "lxc_user_nic_bridge", STR, "the bridge --net=lxc-user-nic "
         "plugs the namespace into (granted to you in /etc/lxc/lxc-usernet)", metavar="BRIDGE"),
    Flag(("--slirp4netns-sandbox",), "slirp4netns_sandbox", STR, "slirp4netns --enable-sandbox",
         ("auto", "true", "false")),
    Flag(("--slirp4netns-seccomp",), "slirp4netns_seccomp", STR, "slirp4netns --enable-seccomp",
         ("auto", "true", "false")),
    Flag(("--mtu",), "mtu", INT, "MTU of the child interface (0: 65520 for slirp4netns/pasta, "
         "the bridge's for lxc-user-nic, 1500 otherwise)", metavar="N"),
    Flag(("--cidr",), "cidr", STR, "child network (gateway .2, DNS .3, child .100)", metavar="CIDR"),
    Flag(("--ifname",), "ifname", STR, "interface name in the child netns (eth0 for "
         "lxc-user-nic)", metavar="NAME"),
    Flag(("--disable-host-loopback",), "disable_host_loopback", BOOL,
         "the child cannot reach the host's 127.0.0.1 through the gateway "
         "(=false to allow it)"),
    Flag(("--ipv6",), "ipv6", BOOL, "IPv6 routing (slirp4netns, pasta)"),
    Flag(("--copy-up",), "copy_up", LIST, "make DIR writable in the child (repeatable; the "
         "given list replaces the default one; none: no copy-up)", metavar="DIR"),
    Flag(("--copy-up-mode",), "copy_up_mode", STR, "copy-up mode", ("tmpfs+symlink",)),
    Flag(("--propagation",), "propagation", STR, "propagation of / in the child's mount "
         "namespace: with the r, of every mount below it too",
         ("rprivate", "rslave", "rshared", "private", "slave", "shared")),
    # No fixed choices either: port drivers of other packages register the same way.
    Flag(("--port-driver",), "port_driver", STR, "how published ports reach the child "
         "(auto: implicit with --net=pasta when it has ports to forward, else builtin with "
         "a network namespace, else none; others from installed plugins)",
         metavar="{auto|none|builtin|slirp4netns|implicit}"),
    Flag(("--pasta-auto-forward",), "pasta_auto_forward", BOOL,
         "ours, not rootlesskit's: with --net=pasta, pasta publishes every port the "
         "command listens on (its 127.0.0.1 services included) on all host addresses, "
         "found by a scan; needs --disable-host-loopback=false, no -p"),
    Flag(("-p", "--publish"), "publish", LIST,
         "publish a port: [PARENT_IP:]PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO (repeatable)",
         metavar="SPEC"),
    Flag(("--source-ip-transparent",), "source_ip_transparent", BOOL,
         "builtin port driver: the child sees the client's address"),
    Flag(("--pidns",), "pidns", BOOL, "new pid namespace (fresh /proc)"),
    Flag(("--cgroupns",), "cgroupns", BOOL, "new cgroup namespace"),
    Flag(("--utsns",), "utsns", BOOL, "new UTS namespace"),
    Flag(("--ipcns",), "ipcns", BOOL, "new IPC namespace"),
    Flag(("--detach-netns",), "detach_netns", BOOL,
         "keep the new netns at STATE/netns; the command keeps the host network"),
    Flag(("--reaper",), "reaper", STR, "reap orphaned processes as pid 1 (needs --pidns)",
         ("auto", "true", "false")),
    Flag(("--evacuate-cgroup2",), "evacuate_cgroup2", STR,
         "move the processes of our cgroup v2 into sub-group NAME (needs --pidns --cgroupns)",
         metavar="NAME"),
    Flag(("--reuse",), "reuse", BOOL, "join the instance running on --state-dir (its "
         "namespaces, network and ports) if there is one, else start it"),
    Flag(("--subid-source",), "subid_source", STR, "where subordinate ids come from",
         ("auto", "dynamic", "static")),
    Flag(("--notify",), "notify", STR, "systemd readiness (Type=notify): ready = we send "
         "READY=1 once the command runs with its network and ports, STOPPING=1 when it ends; "
         "none = NOTIFY_SOCKET is left to the command", ("none", "ready")),
)

_BY_NAME = {name: flag for flag in FLAGS for name in flag.names}
_TRUE = {"true", "1", "t", "yes"}
_FALSE = {"false", "0", "f", "no"}


def _bool(name: str, text: str) -> bool:
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise UsageError(f"{name}={text}: expected true or false")


def _convert(flag: Flag, name: str, text: str):
    if flag.kind == INT:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"{name}={text}: expected a whole number") from None
    if flag.choices and text not in flag.choices:
        raise UsageError(f"{name}={text}: expected one of {', '.join(flag.choices)}")
    return text


def parse(argv: list[str]) -> tuple[dict, str | None]:
    """Parse flags up to the command. Returns (field values, action) where action is
    "help", "version" or None. Values hold only what the user gave."""
    values: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if not arg.startswith("-") or arg == "-":
            break
        if arg in ("-h", "--help", "-help"):
            return values, "help"
        if arg in ("-v", "--version", "-version"):
            return values, "version"
        name, eq, inline = arg.partition("=")
        flag = _BY_NAME.get(name) or (_BY_NAME.get("-" + name) if not name.startswith("--") else None)
        if flag is None:
            raise UsageError(f"unknown flag {name} (see --help for the list)")
        name = flag.names[-1]
        if flag.kind == BOOL:
            values[flag.field] = _bool(name, inline) if eq else True
            i += 1
            continue
        if eq:
            text = inline
            i += 1
        elif i + 1 < len(argv):
            text = argv[i + 1]
            i += 2
        else:
            raise UsageError(f"{name} needs a value ({flag.metavar})")
        value = _convert(flag, name, text)
        if flag.kind == LIST:
            values.setdefault(flag.field, []).append(value)
        else:
            values[flag.field] = value
    values["command"] = argv[i:]
    return values, None


def help_text(program: str, defaults: dict) -> str:
    """The help. Every "(default: X)" in it is typed as is: --flag=X, or for a repeatable
    flag X is the flags themselves (see _as_typed)."""
    lines = [f"Usage: {program} [flags] [--] COMMAND [ARGS...]",
             "",
             "Run COMMAND as root in new user, mount and network namespaces, as an",
             "unprivileged user (a drop-in for rootlesskit). Without COMMAND: $SHELL.",
             "",
             "Flags:"]
    for flag in FLAGS:
        names = ", ".join(flag.names)
        if flag.kind != BOOL:
            names += " " + (("{" + "|".join(flag.choices) + "}") if flag.choices else flag.metavar)
        default = _as_typed(flag, defaults.get(flag.field))
        extra = f" (default: {default})" if default else ""
        lines.append(f"  {names}")
        lines.append(f"      {flag.help}{extra}")
    lines += ["  -h, --help", "      show this help", "  -v, --version", "      show the version"]
    return "\n".join(lines) + "\n"


def _as_typed(flag: Flag, value) -> str:
    """A default as the user would type it ("" for none worth showing: no value, false,
    0): true, not True; a list as the repeated flag, since each --copy-up takes one
    directory (as in rootlesskit, which reads --copy-up=/etc,/run as one)."""
    if value is None or value == "" or value is False or value == 0 and flag.kind == INT:
        return ""
    if flag.kind == BOOL:
        return "true"
    if flag.kind == LIST:
        return " ".join(f"{flag.names[-1]}={item}" for item in value)
    return str(value)
