"""The scenarios of issue 6. Each has up to three sides, measured in turn every round:
`ours` (rootless-run), `rootlesskit` (Debian's, the same flags) and `limit` (what the
machine does without any supervisor: raw loopback, direct connections, raw pasta,
bare namespaces). A side returns {metric key: value} for one round. The soak (issue
17) runs its sides together instead, for minutes (`_soak.py`)."""
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from . import _soak, lxc_lab
from . import _workloads as w
from ._procs import Runner, Skip

SIDES = ("ours", "rootlesskit", "limit")

# Where to get a missing tool (Debian package names).
PACKAGES = {"iperf3": "iperf3", "slirp4netns": "slirp4netns", "pasta": "passt",
            "unshare": "util-linux", "python3": "python3"}

# rootless-run's pasta driver, by hand: the same addresses and MTU, no forwarding.
RAW_PASTA = ["pasta", "--config-net", "--ns-ifname", "tap0", "--mtu", "65520",
             "--address", "10.0.2.100", "--netmask", "24", "--gateway", "10.0.2.2",
             "--dns-forward", "10.0.2.3", "--ipv4-only", "--quiet",
             "-t", "none", "-u", "none", "-T", "none", "-U", "none", "--"]
ECHO_COMMAND = ["python3", "-c", w.ECHO_SERVER, str(w.ECHO_PORT)]
UDP_ECHO_COMMAND = ["python3", "-c", w.UDP_ECHO_SERVER, str(w.ECHO_PORT)]
IPERF_COMMAND = ["iperf3", "-s", "-p", str(w.IPERF_PORT)]
GATEWAY = "10.0.2.2"  # the host's 127.0.0.1, seen from the namespace


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool
    compare: bool = True  # a ratio means something (not for a loss percentage)


@dataclass
class Scenario:
    name: str  # for --only
    metrics: list[Metric]
    sides: dict[str, Callable[[], dict]]  # with `together`: side -> its binary
    rounds: int
    needs: tuple[str, ...] = ()
    limit_label: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # side -> why, known up front
    warmup: bool = False  # one unmeasured run of each side first (page cache)
    # All sides at once, not in rounds: {side: binary} -> _soak.Soak
    together: Callable[[dict[str, str]], "_soak.Soak"] | None = None
    # What the rounds run inside (a context manager made anew for the scenario); a
    # Skip as it starts skips the scenario.
    around: Callable | None = None


@dataclass
class Settings:
    startups: int
    rounds: int
    seconds: int
    connections: int
    soak_seconds: int

    @property
    def udp_clients(self) -> int:
        """UDP clients before memory-udp's last figure: a tenth of the connections
        (each is a flow, its socket kept for a minute)."""
        return max(2, self.connections // 10)


class Sides:
    """The commands of each side, for one benchmark run."""

    def __init__(self, runner: Runner, ours: str, theirs: str | None, settings: Settings):
        self.runner, self.ours, self.theirs, self.s = runner, ours, theirs, settings

    def binaries(self) -> dict[str, str]:
        return {"ours": self.ours, **({"rootlesskit": self.theirs} if self.theirs else {})}

    def each(self, make: Callable[[str], Callable[[], dict]]) -> dict:
        """{side: make(binary)} for ours and rootlesskit (when installed)."""
        return {side: make(binary) for side, binary in self.binaries().items()}

    def ctl(self) -> str | None:
        """The rootless-ctl installed with our rootless-run, if there is one."""
        path = os.path.join(os.path.dirname(os.path.realpath(self.ours)), "rootless-ctl")
        return path if os.path.exists(path) else None


class LxcLab:
    """The lab of a --net=lxc-user-nic scenario (lxc_lab.Lab: a netns with a bridge and
    dnsmasq, a grant for the benchmark's user), built as the scenario starts and
    removed as it ends; the supervisors run in it. A grant of two veths: the kernel
    frees a namespace (and its veth) after its last process is gone, in a work queue
    of its own; a start must not depend on the last one's being gone already (15
    back-to-back starts of each with a grant of one never did here)."""

    def __init__(self, sides: Sides):
        self.sides = sides
        self.lab: lxc_lab.Lab | None = None

    @contextmanager
    def __call__(self):
        why = lxc_lab.missing()
        if why:
            raise Skip(why)
        with lxc_lab.Lab(self.sides.runner.user, grant=2) as self.lab:
            try:
                yield
            finally:
                self.lab = None

    @property
    def prefix(self) -> list[str]:
        return self.lab.prefix


def build(sides: Sides) -> list[Scenario]:
    r, s = sides.runner, sides.s
    lxc = LxcLab(sides)

    def startup(flags):
        return lambda binary: lambda: {"ms": r.time_once([binary, *flags, "true"]) * 1000}

    def bare(flags):
        return lambda: {"ms": r.time_once(["unshare", *flags, "true"]) * 1000}

    def port_iperf(streams=1, udp=False, driver="builtin"):
        specs = ["127.0.0.1:{P}:%d/tcp" % w.IPERF_PORT]
        if udp:  # iperf3 keeps its control connection on TCP, the same port number
            specs.append("127.0.0.1:{P}:%d/udp" % w.IPERF_PORT)

        def make(binary):
            def side():
                supervisor = [binary, "--net=slirp4netns", f"--port-driver={driver}"]
                with w.published(r, supervisor, specs, IPERF_COMMAND,
                                 w.IPERF_PORT) as (_, port):
                    return w.iperf_client(r, [], "127.0.0.1", port, s.seconds,
                                          streams=streams, udp=udp)
            return side

        def limit():
            with w.iperf_server(r) as port:
                return w.iperf_client(r, [], "127.0.0.1", port, s.seconds, streams=streams,
                                      udp=udp)
        return sides.each(make) | {"limit": limit}

    def connection_rate(binary):
        def side():
            supervisor = [binary, "--net=slirp4netns", "--port-driver=builtin"]
            spec = ["127.0.0.1:{P}:%d/tcp" % w.ECHO_PORT]
            with w.published(r, supervisor, spec, ECHO_COMMAND, w.ECHO_PORT) as (_, port):
                return w.connections(r, port, seconds=s.seconds)
        return side

    def direct_connections():
        with w.echo_server(r) as port:
            return w.connections(r, port, seconds=s.seconds)

    def child_to_host(prefix):
        def side():
            with w.iperf_server(r) as port:
                return w.iperf_client(r, prefix, GATEWAY, port, s.seconds)
        return side

    def lxc_startup(binary):
        return lambda: {"ms": r.time_once([binary, "--net=lxc-user-nic", "true"],
                                          outer=lxc.prefix) * 1000}

    def lxc_bare():
        return {"ms": r.time_once(["unshare", "-Urmn", "true"], outer=lxc.prefix) * 1000}

    def to_bridge(flags):
        """iperf3 from the namespace to a server on the lab's bridge address."""
        def make(binary):
            def side():
                with w.iperf_server_in(r, lxc.lab, lxc_lab.ADDRESS) as port:
                    return w.iperf_client(r, [binary, *flags, "--"], lxc_lab.ADDRESS, port,
                                          s.seconds, outer=lxc.prefix)
            return side
        return make

    def loopback():
        with w.iperf_server(r) as port:
            return w.iperf_client(r, [], "127.0.0.1", port, s.seconds)

    def memory(binary):
        def side():
            supervisor = [binary, "--net=slirp4netns", "--port-driver=builtin"]
            spec = ["127.0.0.1:{P}:%d/tcp" % w.ECHO_PORT]
            with w.published(r, supervisor, spec, ECHO_COMMAND,
                             w.ECHO_PORT) as (proc, port):
                time.sleep(0.5)  # settle: nothing but the idle port
                idle = w.supervisor_usage(proc.pid, ECHO_COMMAND)
                # The first client pays what a supervisor loads only when one comes:
                # its wait, and the memory kept afterwards, are what a user sees.
                first_ms = w.connections(r, port, count=1)["seconds"] * 1000
                time.sleep(0.5)
                first = w.supervisor_usage(proc.pid, ECHO_COMMAND)
                if s.connections > 1:  # count=0 would mean no limit
                    w.connections(r, port, count=s.connections - 1)
                time.sleep(0.5)
                busy = w.supervisor_usage(proc.pid, ECHO_COMMAND)
            return {"first_ms": first_ms,
                    "pss_idle": idle["pss"], "rss_idle": idle["rss"],
                    "pss_first": first["pss"], "rss_first": first["rss"],
                    "pss_busy": busy["pss"], "rss_busy": busy["rss"]}
        return side

    def memory_udp(binary):
        def side():
            supervisor = [binary, "--net=slirp4netns", "--port-driver=builtin"]
            spec = ["127.0.0.1:{P}:%d/udp" % w.ECHO_PORT]
            with w.published(r, supervisor, spec, UDP_ECHO_COMMAND, w.ECHO_PORT,
                             udp=True) as (proc, port):
                time.sleep(0.5)  # settle: nothing but the idle port
                first_ms = w.udp_clients(r, port, 1)["seconds"] * 1000
                time.sleep(0.5)
                first = w.supervisor_usage(proc.pid, UDP_ECHO_COMMAND)
                w.udp_clients(r, port, s.udp_clients - 1)
                time.sleep(0.5)
                busy = w.supervisor_usage(proc.pid, UDP_ECHO_COMMAND)
            return {"first_ms": first_ms, "pss_first": first["pss"], "rss_first": first["rss"],
                    "pss_busy": busy["pss"], "rss_busy": busy["rss"]}
        return side

    def api_port(binary):
        def side():
            supervisor = [binary, "--net=slirp4netns", "--port-driver=builtin"]
            with w.with_api(r, supervisor, ECHO_COMMAND, w.ECHO_PORT) as (proc, sock):
                time.sleep(0.5)  # settle: nothing but the idle API
                port = w.free_port()
                start = time.perf_counter()
                w.api_add_port(sock, port, w.ECHO_PORT)  # the API's first client
                added = time.perf_counter()
                first_ms = w.connections(r, port, count=1)["seconds"] * 1000
                time.sleep(0.5)
                usage = w.supervisor_usage(proc.pid, ECHO_COMMAND)
            return {"add_ms": (added - start) * 1000, "first_ms": first_ms,
                    "pss": usage["pss"], "rss": usage["rss"]}
        return side

    scenarios = [
        Scenario("startup-host", [Metric("ms", "startup: X --net=host true", "ms", False)],
                 sides.each(startup(["--net=host"])) | {"limit": bare(["-Urm"])},
                 s.startups, ("unshare",), "unshare -Urm true", warmup=True),
        Scenario("startup-slirp4netns",
                 [Metric("ms", "startup: X --net=slirp4netns --copy-up=/etc "
                               "--disable-host-loopback true", "ms", False)],
                 sides.each(startup(["--net=slirp4netns", "--copy-up=/etc",
                                     "--disable-host-loopback"]))
                 | {"limit": bare(["-Urmn"])},
                 s.startups, ("slirp4netns", "unshare"), "unshare -Urmn true", warmup=True),
        Scenario("startup-lxc-user-nic",
                 [Metric("ms", "startup: X --net=lxc-user-nic true", "ms", False)],
                 sides.each(lxc_startup) | {"limit": lxc_bare}, s.startups,
                 ("unshare",), "unshare -Urmn true", warmup=True, around=lxc),
        Scenario("port-tcp-1", [Metric("gbps", "builtin port TCP host->child, 1 stream",
                                       "Gbit/s", True)],
                 port_iperf(1), s.rounds, ("iperf3", "slirp4netns"), "loopback iperf3"),
        Scenario("port-tcp-4", [Metric("gbps", "builtin port TCP host->child, 4 streams",
                                       "Gbit/s", True)],
                 port_iperf(4), s.rounds, ("iperf3", "slirp4netns"), "loopback iperf3"),
        Scenario("port-udp", [Metric("gbps", "builtin port UDP host->child (-b 0, 1400 B)",
                                     "Gbit/s", True),
                              Metric("loss", "  UDP datagrams lost", "%", False, False)],
                 port_iperf(udp=True), s.rounds, ("iperf3", "slirp4netns"),
                 "loopback iperf3"),
        Scenario("port-slirp4netns", [Metric("gbps", "slirp4netns port TCP host->child, "
                                                     "1 stream", "Gbit/s", True)],
                 port_iperf(1, driver="slirp4netns"), s.rounds, ("iperf3", "slirp4netns"),
                 "loopback iperf3"),
        Scenario("connections", [Metric("rate", "builtin port: short connections/s",
                                        "conn/s", True)],
                 sides.each(connection_rate) | {"limit": direct_connections}, s.rounds,
                 ("python3", "slirp4netns"), "direct"),
        Scenario("net-slirp4netns", [Metric("gbps", "net child->host TCP, slirp4netns",
                                            "Gbit/s", True)],
                 sides.each(lambda b: child_to_host([b, "--net=slirp4netns", "--"]))
                 | {"limit": loopback},
                 # Twice the rounds: libslirp's stalls of ~0.2 s (README, Performance)
                 # strike a third of the rounds of both sides at random.
                 2 * s.rounds, ("iperf3", "slirp4netns"), "loopback iperf3"),
        Scenario("net-pasta", [Metric("gbps", "net child->host TCP, pasta", "Gbit/s", True)],
                 {"ours": child_to_host([sides.ours, "--net=pasta", "--"]),
                  "limit": child_to_host(RAW_PASTA)},
                 s.rounds, ("iperf3", "pasta"), "raw pasta",
                 skipped={"rootlesskit": "rootlesskit 1.1 has no pasta driver"}),
        # Ours through slirp4netns in the same lab and rounds, in the limit's column:
        # the driver's point is its lead over slirp4netns (README, lxc-user-nic).
        Scenario("net-lxc-user-nic",
                 [Metric("gbps", "net child->bridge TCP, lxc-user-nic", "Gbit/s", True)],
                 sides.each(to_bridge(["--net=lxc-user-nic"]))
                 | {"limit": to_bridge(["--net=slirp4netns"])(sides.ours)},
                 s.rounds, ("iperf3", "slirp4netns"), "rootless-run --net=slirp4netns",
                 around=lxc),
        Scenario("memory",
                 [Metric("first_ms", "first client's answer through a published port",
                         "ms", False),
                  Metric("pss_idle", "memory PSS, idle, 1 port", "MiB", False),
                  Metric("rss_idle", "memory RSS, idle, 1 port", "MiB", False),
                  Metric("pss_first", "memory PSS after the first connection", "MiB",
                         False),
                  Metric("rss_first", "memory RSS after the first connection", "MiB",
                         False),
                  Metric("pss_busy", f"memory PSS after {s.connections} connections",
                         "MiB", False),
                  Metric("rss_busy", f"memory RSS after {s.connections} connections",
                         "MiB", False)],
                 sides.each(memory), min(s.rounds, 3), ("python3", "slirp4netns")),
        # A -p UDP port: each client (address and port) is a flow of its own.
        Scenario("memory-udp",
                 [Metric("first_ms", "first UDP client's answer through a published port",
                         "ms", False),
                  Metric("pss_first", "memory PSS after the first UDP client", "MiB", False),
                  Metric("rss_first", "memory RSS after the first UDP client", "MiB", False),
                  Metric("pss_busy", f"memory PSS after {s.udp_clients} UDP clients", "MiB",
                         False),
                  Metric("rss_busy", f"memory RSS after {s.udp_clients} UDP clients", "MiB",
                         False)],
                 sides.each(memory_udp), min(s.rounds, 3), ("python3", "slirp4netns")),
        # rootless Docker's way: no -p, every port added through the API
        # (rootlesskit-docker-proxy) as `docker run -p` starts a container.
        Scenario("api-port",
                 [Metric("add_ms", "the API's first request: add a TCP port", "ms", False),
                  Metric("first_ms", "  then the first client's answer through it", "ms",
                         False),
                  Metric("pss", "memory PSS after a port added through the API and a "
                                "client", "MiB", False),
                  Metric("rss", "memory RSS after a port added through the API and a "
                                "client", "MiB", False)],
                 sides.each(api_port), min(s.rounds, 3), ("python3", "slirp4netns")),
        Scenario("soak", soak_metrics(s.soak_seconds), sides.binaries(), 1,
                 ("python3", "slirp4netns"),
                 together=lambda chosen: _soak.run(r, chosen, sides.ctl(), s.soak_seconds)),
    ]
    if not sides.theirs:
        for scenario in scenarios:
            scenario.skipped.setdefault("rootlesskit", "rootlesskit is not installed "
                                                       "(apt-get install rootlesskit)")
    return scenarios


def soak_metrics(seconds: int) -> list[Metric]:
    name = f"soak {seconds // 60} min" if seconds % 60 == 0 else f"soak {seconds} s"
    return [
        Metric("fds", f"{name}: open fds, drift after warm-up", "fds/min", False, False),
        Metric("pss", f"{name}: memory PSS, drift after warm-up", "MiB/min", False, False),
        Metric("rss", f"{name}: memory RSS, drift after warm-up", "MiB/min", False, False),
        Metric("threads", f"{name}: threads, drift after warm-up", "threads/min", False,
               False),
        Metric("errors", f"{name}: errors seen by the clients", "errors", False, False),
        Metric("p50", f"{name}: short request p50 (median of the windows)", "us", False),
        Metric("p99", f"{name}: short request p99 (median of the windows)", "us", False),
    ]
