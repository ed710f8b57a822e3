"""implicit: pasta forwards the ports itself; this driver only chooses pasta's
forwarding options and keeps the API's list.

What Debian 12's pasta (passt 2023-03) can do, probed, not assumed:

- rules given at start: `-t ADDR/PORT:CHILD_PORT` (`-u` for UDP), repeatable, IPv6
  addresses without brackets; no address means all of the host's (dual-stack with
  IPv6, IPv4 only with --ipv4-only). A port number is forwarded once per protocol;
  rules cannot be added or removed while it runs (no runtime interface); the replies
  of a UDP port forwarded to another port number are lost (measured: `-u 18091:9001`
  delivers the datagram, never the answer), so UDP keeps its port number;
- `-t auto -u auto`: ports bound in the namespace are bound on all host addresses,
  found by a scan about once a second. This pasta rescans the namespace only when it
  also forwards the host's ports into the namespace (`-T auto -U auto`, its default):
  with `-T none` nothing is ever forwarded. So automatic forwarding makes the host's
  loopback services reachable on the namespace's loopback, which --disable-host-loopback
  forbids: it needs --disable-host-loopback=false.

Automatic forwarding publishes whatever the command listens on, its 127.0.0.1-only
services included, to every host address: it is never implied (rootlesskit never
does it), only asked for with our --pasta-auto-forward (and said under --debug).

The namespace end is pasta's to choose: its loopback for clients on the host's
loopback, its interface address for other clients.
"""
from ... import _log
from .base import FAMILY, PortDriver

RULES, AUTO, OFF = "rules", "auto", "off"


def mode(config) -> str:
    """RULES: the -p specs; AUTO: pasta's automatic forwarding (--pasta-auto-forward);
    OFF: neither, pasta forwards nothing."""
    if config.publish:
        return RULES
    return AUTO if config.pasta_auto_forward else OFF


def can_forward(config) -> bool:
    """Whether implicit forwards anything: --port-driver=auto picks it only then."""
    return mode(config) != OFF


def protos(config) -> tuple[str, ...]:
    # With --ipv4-only (no --ipv6) pasta binds no IPv6 socket on the host.
    v4 = ("tcp", "tcp4", "udp", "udp4")
    return v4 + ("tcp6", "udp6") if config.ipv6 else v4


def pasta_options(config) -> list[str]:
    """pasta's forwarding options for this configuration (all four directions)."""
    m = mode(config)
    if m == AUTO:
        # -T/-U auto: this pasta's namespace scan needs them (see the docstring)
        return ["-t", "auto", "-u", "auto", "-T", "auto", "-U", "auto"]
    options = []
    if m == RULES:
        for spec in initial_specs(config):
            options += ["-t" if FAMILY[spec.proto] == "tcp" else "-u", _rule(spec)]
    for flag in ("-t", "-u"):
        if flag not in options:
            options += [flag, "none"]
    return options + ["-T", "none", "-U", "none"]


def initial_specs(config) -> list:
    """The -p specs, parsed and checked against what pasta can do (UsageError)."""
    from ...errors import UsageError
    from ...portspec import format as text, parse, written

    specs, seen = [], {}
    for given in config.publish:
        spec = parse(given)
        problem = _unsupported(spec, config)
        if not problem and spec.parentPort == 0:
            problem = ("pasta cannot choose a free port: give a parent port number, or use "
                       "--port-driver=builtin")
        if not problem and FAMILY[spec.proto] == "udp" and spec.parentPort != spec.childPort:
            problem = (f"pasta (2023-03) loses the replies of a UDP port forwarded to "
                       f"another port number: publish {spec.childPort} as "
                       f"{spec.childPort} (e.g. -p {spec.parentIP or '0.0.0.0'}:"
                       f"{spec.childPort}:{spec.childPort}/{spec.proto})")
        if problem:
            raise UsageError(f"-p {written(given)}: {problem}")
        key = (FAMILY[spec.proto], spec.parentPort)
        if key in seen:
            raise UsageError(f"-p {written(given)}: {key[0]} port {spec.parentPort} is "
                             f"already published by -p {text(seen[key])}; pasta forwards a port "
                             f"number once per protocol (--port-driver=builtin does not "
                             f"have that limit)")
        seen[key] = spec
        specs.append(spec)
    return specs


def _unsupported(spec, config) -> str:
    """Why pasta cannot forward `spec` here, or ""."""
    if spec.proto not in protos(config):
        if FAMILY[spec.proto] == "sctp":
            return (f"{spec.proto} is not supported by the implicit port driver (it "
                    f"supports {', '.join(protos(config))})")
        return f"{spec.proto} needs --ipv6 with the implicit port driver (pasta)"
    if ":" in spec.parentIP and not config.ipv6:
        return f"the IPv6 parent IP {spec.parentIP} needs --ipv6 with the implicit port driver"
    if spec.childIP not in ("", "127.0.0.1", "::1", _child_address(config)):
        return (f"child IP {spec.childIP}: pasta chooses the namespace's end itself (its "
                f"loopback, or {_child_address(config)} for clients not on the host's "
                f"loopback); leave the child IP out, or use --port-driver=builtin")
    return ""


def _child_address(config) -> str:
    from ..network._addressing import Addressing

    return Addressing(config.cidr).child


def _rule(spec) -> str:
    """pasta's text for one spec: [ADDR/]PORT:CHILD_PORT."""
    ip = spec.parentIP
    # tcp/udp on a wildcard (or no) address: all addresses, both families, like the
    # builtin driver; tcp4 on 0.0.0.0 or tcp6 on :: stays in its family.
    wildcard = ip in ("", "0.0.0.0", "::")
    if wildcard and not spec.proto.endswith(("4", "6")):
        ip = ""
    return f"{ip + '/' if ip else ''}{spec.parentPort}:{spec.childPort}"


class ImplicitPortDriver(PortDriver):
    name = "implicit"

    def __init__(self, config):
        super().__init__(config)
        self.protos = protos(config)
        self.mode = mode(config)

    def preflight(self) -> None:
        from ...errors import UsageError

        if self.config.net != "pasta":
            raise UsageError(f"--port-driver=implicit needs --net=pasta (pasta forwards the "
                             f"ports itself); with --net={self.config.net} use "
                             f"--port-driver=builtin")
        self.initial = initial_specs(self.config) if self.mode == RULES else []
        if self.mode == AUTO and self.config.disable_host_loopback:
            raise UsageError("--pasta-auto-forward needs --disable-host-loopback=false: "
                             "this pasta (2023-03) finds the ports the namespace listens "
                             "on only while it maps the host's loopback into it; add "
                             "--disable-host-loopback=false, or publish with -p")
        self._say_what_is_forwarded()

    def _say_what_is_forwarded(self) -> None:
        """One line when what pasta forwards may surprise: everything (asked for with
        --pasta-auto-forward: said under --debug), or nothing (said always: it asks the
        user to publish something, or to use another port driver)."""
        if self.mode == AUTO:
            where = "all host addresses" if self.config.ipv6 else "all host IPv4 addresses"
            _log.debug(f"--pasta-auto-forward: pasta publishes every TCP and UDP port the "
                       f"command listens on, its 127.0.0.1 services included, on {where} "
                       f"with the same port number, as it finds them")
        elif self.mode == OFF:
            _log.warning("--port-driver=implicit: pasta forwards no port (no -p, and "
                         "--pasta-auto-forward is off); publish with -p, or use "
                         "--port-driver=builtin to publish through the API")

    def listen_early(self) -> list[int]:
        return []  # pasta forwards the -p ports itself: serve() only lists them

    async def serve(self, state_dir: str, *, task_status) -> None:
        import trio
        from ...ports import PortStatus

        # pasta forwards the -p ports since it started: listed, with nothing to close.
        for spec in self.initial:
            self._ports[self._next_id] = (PortStatus(id=self._next_id, spec=spec), None)
            self._next_id += 1
        task_status.started()
        await trio.sleep_forever()

    async def remove(self, ident: int) -> None:
        from ...ports import PortRequestInvalid

        if self.mode == RULES and ident in self._ports:
            raise PortRequestInvalid(f"port {ident} was published with -p: pasta (2023-03) "
                                     f"cannot stop forwarding it while it runs; restart without "
                                     f"it, or use --port-driver=builtin for ports that come and go")
        await super().remove(ident)

    async def _expose(self, spec):
        from ...ports import PortConflict, PortRequestInvalid

        if self.mode == RULES:
            raise PortRequestInvalid("pasta (2023-03) cannot add forwarding rules while it "
                                     "runs, and with -p its automatic forwarding is off: publish "
                                     "the port with -p at start, or use --port-driver=builtin")
        if self.mode == OFF:
            raise PortRequestInvalid("pasta forwards no port in this run (no -p, and "
                                     "--pasta-auto-forward is off) and cannot add one while it "
                                     "runs: publish with -p at start, start with "
                                     "--pasta-auto-forward --disable-host-loopback=false, or use "
                                     "--port-driver=builtin")
        # AUTO: pasta forwards whatever the namespace binds, on the same port number and
        # on all host addresses. Adding is bookkeeping, valid only for what pasta does.
        problem = _unsupported(spec, self.config)
        if problem:
            raise PortRequestInvalid(problem)
        if spec.parentPort == 0:
            spec = spec.replace(parentPort=spec.childPort)
        if spec.parentPort != spec.childPort:
            raise PortRequestInvalid(f"parent port {spec.parentPort} differs from child port "
                                     f"{spec.childPort}: pasta's automatic forwarding keeps the "
                                     f"port number; use the same port (or 0), or "
                                     f"--port-driver=builtin")
        if spec.parentIP not in ("", "0.0.0.0", "::"):
            raise PortRequestInvalid(f"parent IP {spec.parentIP}: pasta's automatic forwarding "
                                     f"listens on all host addresses, not on one; use 0.0.0.0, "
                                     f"publish with -p at start, or use --port-driver=builtin")
        for status, _ in self._ports.values():
            other = status.spec
            if (FAMILY[other.proto] == FAMILY[spec.proto]
                    and other.parentPort == spec.parentPort):
                raise PortConflict(f"{spec.proto} port {spec.parentPort} is already "
                                   f"published (id {status.id})")

        async def forget():  # pasta stops by itself once the namespace unbinds the port
            pass
        return spec, forget
