"""What a port driver provides.

Parent side: the bookkeeping every driver shares (ids, conflicts, the list the API
returns) lives here; a driver implements `_expose(spec)` (start forwarding, return a
closer) and may run tasks in `serve()`, under trio, in a thread of the parent's
services. The API calls add_now() and remove_now() from a thread of its own: by
default they run add() and remove() under trio (`run_in_trio`, which loads it); a
driver that can do without (the builtin one) overrides them. Child side:
`start_child()`, in the child's namespaces before the command. Drivers never import
trio at module level: the child imports them too.
"""
import errno

from ...config import Config
from ...errors import CAPACITY_ERRNOS

# Families of the protos: a conflict is the same family, parent IP and port.
FAMILY = {"tcp": "tcp", "tcp4": "tcp", "tcp6": "tcp", "udp": "udp", "udp4": "udp",
          "udp6": "udp", "sctp": "sctp", "sctp4": "sctp", "sctp6": "sctp"}


def bind_failure(exc: OSError, proto: str, ip: str, port: int):
    """Why the host's `ip`:`port` cannot be bound, and the fix, as a ports.PortError
    (its message alone for a -p). Every driver that binds on the host says it the same
    way."""
    from ...ports import PortConflict, PortRequestInvalid, PortsUnavailable

    where = f"{f'[{ip}]' if ':' in ip else ip}:{port}/{proto}"
    if exc.errno == errno.EADDRINUSE:
        return PortConflict(f"{where} is in use on the host: pick another parent port, or "
                            f"0 for a free one")
    if exc.errno == errno.EADDRNOTAVAIL:
        return PortRequestInvalid(f"{ip} is not an address of this host: use 127.0.0.1, "
                                  f"0.0.0.0 or one of the host's addresses")
    if exc.errno in CAPACITY_ERRNOS:  # the same request may do later
        return PortsUnavailable(f"cannot listen on {where} for now ({exc.strerror}): try "
                                f"again later")
    if exc.errno == errno.EACCES:
        return PortRequestInvalid(f"port {port} is privileged on this host: use a port from "
                                  f"{unprivileged_port_start()} up "
                                  f"(net.ipv4.ip_unprivileged_port_start)")
    return PortRequestInvalid(f"cannot listen on {where}: {exc.strerror}")


def unprivileged_port_start(
        path: str = "/proc/sys/net/ipv4/ip_unprivileged_port_start") -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().strip().decode("ascii")
    except (OSError, ValueError):
        return "1024"
    return text if text.isdigit() else "1024"


class PortDriver:
    name: str = ""
    protos: tuple[str, ...] = ()
    #: The child IP may not be a loopback address (the API's disallowLoopbackChildIP:
    #: rootlesskit-docker-proxy then forwards to the child's address instead).
    disallow_loopback_child_ip = False

    #: Set by the services: called with a message when the driver cannot go on (its
    #: own loop failed): the run ends.
    on_failure = None
    #: Set by the services: run_in_trio(async_function, *args) runs it under trio (in
    #: the services' trio thread, started if need be) and returns what it returns;
    #: ports.PortsUnavailable if trio cannot run it.
    run_in_trio = None
    #: The API's answers need serve() to have run (it lists the -p ports, or talks to a
    #: helper): trio loads with the API. False for a driver whose list and add_now()
    #: need no trio.
    needs_trio = True

    def __init__(self, config: Config):
        from ... import _threads

        self.config = config
        self._ports: dict[int, tuple] = {}  # id -> (ports.PortStatus, closer)
        self._next_id = 1
        # The API's thread and trio's may both register ports (an id each, once).
        self._ids = _threads.Lock()

    def preflight(self) -> None:
        """Check the driver can work with this network driver and these specs."""

    def opaque(self) -> dict[str, str]:
        """Driver data for the child, sent in ParentInitPortDriverCompleted."""
        return {}

    def listen_early(self) -> list[int] | None:
        """In the parent, before the command starts (so that a port that cannot be had
        is an error before anything runs): bind, with the standard library, what must
        listen from the start, and return the fds whose first traffic must load trio
        and serve(). None: serve() must run at once (by default, when there are -p
        ports to publish). Raise a RootlessError naming the -p and the fix."""
        return None if self.config.publish else []

    def close_early(self) -> None:
        """At the end of the run: close what the parent holds for the driver (bound by
        listen_early(), made by link_child()) and serve() did not take over."""

    def link_child(self) -> None:
        """Parent side, just before the child is forked: make what the child side
        inherits through the fork (the builtin driver: its socket factory's
        connection)."""

    def forked(self, in_child: bool) -> None:
        """Right after that fork, on each side: close what belongs to the other."""

    def components(self) -> list:
        """Parts the run cannot live without (drivers._component.Component): when one ends,
        the run ends."""
        return []

    @staticmethod
    def start_child(config, state_dir: str, netns: str | None) -> None:
        """Child side: start what the parent needs inside the namespaces (called on
        the parent's driver object, as the fork left it), once the command runs."""

    # -- parent side, in the service thread --

    def serve_light(self, ready: set[int]) -> list[int] | None:
        """The first traffic came on `ready` (fds listen_early() returned), before trio
        loaded: serve what can be served without it, and return the fds whose traffic
        still needs trio. None (the default): load trio and serve() now."""
        return None

    def shutdown(self) -> None:
        """At the end of the run, once trio's services have stopped: stop what
        serve_light() started."""


    async def serve(self, state_dir: str, *, task_status) -> None:
        """Run the driver's tasks; call task_status.started() once add() may be called."""
        import trio

        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def list(self) -> list:
        ports = dict(self._ports)  # another thread may add or remove meanwhile
        return [ports[ident][0] for ident in sorted(ports)]

    def prepare_api(self) -> None:
        """In the API's thread, before its first request (and after serve() started, if
        the driver needs_trio): make what its answers need."""

    def add_now(self, spec):
        """add(), from a thread other than trio's (the API's): blocks until done."""
        return self.run_in_trio(self.add, spec)

    def remove_now(self, ident: int) -> None:
        """remove(), from a thread other than trio's (the API's)."""
        self.run_in_trio(self.remove, ident)

    async def add(self, spec):
        spec = self._validated(spec)
        return self._register(*await self._expose(spec))

    def _validated(self, spec):
        """`spec`, validated; a ports.PortError if this driver cannot publish it now."""
        from ...portspec import validate
        from ...ports import PortConflict, PortRequestInvalid

        spec = validate(spec)
        if not self.protos:
            raise PortRequestInvalid(f"the {self.name} port driver cannot publish ports: "
                                     f"start with --port-driver=builtin")
        if spec.proto not in self.protos:
            raise PortRequestInvalid(f"protocol {spec.proto} is not supported by the "
                                     f"{self.name} port driver (it supports "
                                     f"{', '.join(self.protos) or 'none'})")
        for status, _ in self._ports.values():
            other = status.spec
            if (FAMILY[other.proto] == FAMILY[spec.proto] and other.parentIP == spec.parentIP
                    and other.parentPort == spec.parentPort and spec.parentPort != 0):
                raise PortConflict(f"{spec.proto} {spec.parentIP}:{spec.parentPort} is "
                                   f"already published (id {status.id})")
        return spec

    def _reserve_id(self) -> int:
        with self._ids:
            ident = self._next_id
            self._next_id += 1
        return ident

    def _register(self, spec, closer, ident: int | None = None):
        """Record a published port (under `ident`, if it was reserved)."""
        from ...ports import PortStatus

        status = PortStatus(id=self._reserve_id() if ident is None else ident, spec=spec)
        self._ports[status.id] = (status, closer)
        return status

    def _known(self, ident: int) -> tuple:
        """The (ports.PortStatus, closer) of port `ident`; PortNotFound if none has it."""
        from ...ports import PortNotFound

        entry = self._ports.get(ident)
        if entry is None:
            raise PortNotFound(f"unknown port id {ident}")
        return entry

    async def remove(self, ident: int) -> None:
        self._known(ident)
        _, closer = self._ports.pop(ident)
        await closer()  # returns once the port is closed: a client then finds it so

    async def _expose(self, spec):
        """Start forwarding `spec`; returns (the spec as bound, e.g. with the port
        chosen for parentPort 0, and an async function that stops it)."""
        raise NotImplementedError
