"""slirp4netns: ports published by slirp4netns itself (its "hostfwd"), as rootlesskit's
slirp4netns port driver does it: an `add_hostfwd` / `remove_hostfwd` JSON request on
slirp4netns' API socket (STATE/slirp4netns.sock), one request per connection.

slirp4netns listens on the host and delivers to an address of the child's interface
(the child's .100 of --cidr by default), never to the child's loopback: a server in
the child listens there or on 0.0.0.0. IPv4 only, TCP and UDP.

What slirp4netns does not do, done here:
- parent port 0 (it refuses it): a free port is found by binding one, then asked for;
- its only error is "slirp_add_hostfwd failed": the same bind, tried first, names the
  cause (port in use, address not on this host, privileged port);
- child IPs it cannot deliver to (loopback, 0.0.0.0, IPv6) are refused with the fix.
"""
import errno
import os

from ... import _log
from .base import FAMILY, PortDriver, bind_failure

_TIMEOUT = 5.0   # seconds for one request: slirp4netns answers at once, or is stuck
_MAX_REPLY = 64 * 1024


class Slirp4netnsPortDriver(PortDriver):
    name = "slirp4netns"
    protos = ("tcp", "tcp4", "udp", "udp4")  # slirp4netns' hostfwd is IPv4 only
    disallow_loopback_child_ip = True        # tells rootlesskit-docker-proxy to use .100

    def preflight(self) -> None:
        from ...errors import UsageError
        from ..network._addressing import Addressing

        if self.config.net != "slirp4netns":
            raise UsageError(f"--port-driver=slirp4netns needs --net=slirp4netns (it uses "
                             f"slirp4netns' own forwarding), not --net={self.config.net}: "
                             f"add --net=slirp4netns, or use --port-driver=builtin")
        self.child_ip = Addressing(self.config.cidr).child
        self.initial = []
        if self.config.publish:  # portspec (re, ipaddress) only when there are specs
            from ...portspec import parse, written

            for text in self.config.publish:
                spec = parse(text)
                self._check(spec, where=f"-p {written(text)}")
                self.initial.append((written(text), spec))
        self._warned = False

    # -- parent side, in the service thread (trio) --

    async def serve(self, state_dir: str, *, task_status) -> None:
        import trio

        from ...errors import DriverError
        from ..network.slirp4netns import API_SOCKET
        from ...ports import PortError

        self._api = os.path.join(state_dir, API_SOCKET)
        # One change at a time: the conflict check, the free-port probe and slirp4netns'
        # bind must not interleave with another request's.
        self._lock = trio.Lock()
        for text, spec in self.initial:
            try:
                await self.add(spec)
            except PortError as exc:
                raise DriverError(f"-p {text}: {exc}") from None
        task_status.started()
        await trio.sleep_forever()

    async def add(self, spec):
        async with self._lock:
            return await super().add(spec)

    async def remove(self, ident: int) -> None:
        async with self._lock:
            await super().remove(ident)

    async def _expose(self, spec):
        from ...ports import PortConflict, PortError, PortHelperFailed

        self._check(spec, where=f"port {_text(spec)}")
        proto = FAMILY[spec.proto]
        host_ip = spec.parentIP or "0.0.0.0"  # "" is all addresses, as slirp4netns reads it
        if proto == "udp" and self.config.disable_host_loopback and not self._warned:
            _log.warning(_UDP_LOOPBACK_WARNING)  # once: it is about the run, not the port
            self._warned = True
        port = self._probe(proto, host_ip, spec.parentPort)
        reply = await self._call("add_hostfwd", {
            "proto": proto, "host_addr": host_ip, "host_port": port,
            "guest_addr": spec.childIP or self.child_ip, "guest_port": spec.childPort})
        if "error" in reply:
            raise PortConflict(f"slirp4netns cannot forward {host_ip}:{port}/{proto}: "
                               f"{_desc(reply)}")
        fwd = reply.get("return", {}).get("id")
        if not isinstance(fwd, int):
            raise PortHelperFailed(f"unexpected answer from slirp4netns to add_hostfwd: "
                                   f"{reply!r:.200}")
        if port != spec.parentPort:
            spec = spec.replace(parentPort=port)

        async def close():
            reply = await self._call("remove_hostfwd", {"id": fwd})
            if "error" in reply:
                raise PortError(f"slirp4netns did not remove {host_ip}:{port}/{proto}"
                                f": {_desc(reply)}")
        return spec, close

    def _check(self, spec, where: str) -> None:
        """What slirp4netns cannot do with `spec`, as a PortSpecError naming the fix (a
        usage error for -p, a 400 for the API)."""
        from ...errors import PortSpecError

        if spec.proto not in self.protos:
            raise PortSpecError(f"{where}: {spec.proto} is not supported by the slirp4netns "
                                f"port driver (it supports {', '.join(self.protos)}: "
                                f"slirp4netns forwards IPv4 TCP and UDP only)")
        if ":" in spec.parentIP:
            raise PortSpecError(f"{where}: slirp4netns listens on IPv4 addresses only, not "
                                f"{spec.parentIP}: use an IPv4 parent IP (e.g. 127.0.0.1 or "
                                f"0.0.0.0), or --port-driver=builtin")
        ip = spec.childIP
        if not ip:
            return
        why = ""
        if ":" in ip:
            why = "slirp4netns forwards to IPv4 addresses only"
        elif ip.startswith("127."):
            why = ("slirp4netns delivers to the child's network interface, not to its "
                   "loopback")
        elif ip == "0.0.0.0":
            why = "it is no address to deliver to"
        if why:
            raise PortSpecError(f"{where}: child IP {ip}: {why}; leave the child IP out (the "
                                f"child's {self.child_ip}) and have the server listen there "
                                f"or on 0.0.0.0, or use --port-driver=builtin")

    def _probe(self, proto: str, ip: str, port: int) -> int:
        """Bind what slirp4netns is about to bind: for port 0 (which slirp4netns
        refuses) the free port the kernel picks, and for a failure its cause, which
        slirp4netns does not say. Returns the port."""
        import socket

        kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
        with socket.socket(socket.AF_INET, kind) as probe:
            if proto == "tcp":  # as slirp4netns does: a port in TIME_WAIT is free to it
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as exc:
                raise self._bind_failure(exc, proto, ip, port) from None
            return probe.getsockname()[1]

    def _bind_failure(self, exc: OSError, proto: str, ip: str, port: int):
        """base.bind_failure, or the port of ours it overlaps (slirp4netns binds a
        port once per protocol, whatever the address)."""
        from ...ports import PortConflict

        where = f"{ip}:{port}/{proto}"
        if exc.errno == errno.EADDRINUSE:
            for status in self.list():
                other = status.spec
                if FAMILY[other.proto] == proto and other.parentPort == port:
                    return PortConflict(f"{where} overlaps port {status.id} "
                                        f"({other.parentIP or '0.0.0.0'}:{port}/"
                                        f"{other.proto}): remove it first, or pick another "
                                        f"parent port")
        return bind_failure(exc, proto, ip, port)

    async def _call(self, execute: str, arguments: dict) -> dict:
        """One request to slirp4netns' API, on a connection of its own."""
        import json  # not msgspec: its import is 3 MiB, and the API may never be used
        import socket

        import trio

        from ...ports import PortHelperFailed, PortsUnavailable

        request = json.dumps({"execute": execute, "arguments": arguments},
                             separators=(",", ":")).encode()
        reply = bytearray()
        with trio.move_on_after(_TIMEOUT) as timer:
            with trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                try:
                    await sock.connect(self._api)
                    # slirp4netns reads a request with a single read(2): one send, whole
                    # (far below a unix socket's buffer), then EOF as rootlesskit sends it.
                    if await sock.send(request) != len(request):
                        raise OSError(errno.EMSGSIZE, "request sent in part")
                    sock.shutdown(socket.SHUT_WR)
                    while chunk := await sock.recv(4096):
                        reply += chunk
                        if len(reply) > _MAX_REPLY:
                            raise OSError(errno.EMSGSIZE, "oversized answer")
                except OSError as exc:
                    raise PortsUnavailable(f"slirp4netns' API ({self._api}): "
                                           f"{exc.strerror or exc}; is slirp4netns still "
                                           f"running?") from None
        if timer.cancelled_caught:
            raise PortsUnavailable(f"slirp4netns did not answer {execute} within "
                                   f"{_TIMEOUT:.0f} s ({self._api})")
        try:
            answer = json.loads(bytes(reply))
        except ValueError:  # not JSON, or not UTF-8
            answer = None
        if not isinstance(answer, dict):
            raise PortHelperFailed(f"unexpected answer from slirp4netns to {execute}: "
                                   f"{bytes(reply)[:200]!r}")
        _log.debug(f"slirp4netns {execute} {arguments}: {answer}")
        return answer


_UDP_LOOPBACK_WARNING = (
    "with --disable-host-loopback, slirp4netns drops the answers of UDP ports to "
    "clients on the host's loopback (127.0.0.1): other clients are answered; to answer "
    "local ones too, add --disable-host-loopback=false")


def _desc(reply: dict) -> str:
    error = reply.get("error")
    desc = error.get("desc") if isinstance(error, dict) else None
    return str(desc or error)


def _text(spec) -> str:
    from ...portspec import format

    return format(spec)
