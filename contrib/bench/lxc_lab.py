"""A lab for --net=lxc-user-nic, built as root and removed whole: a network namespace
of its own holding the bridge (lxcbr0, 10.0.3.1/24, as lxc-net makes it) and dnsmasq
serving DHCP and DNS on it, and a line granting a user veths on that bridge in
/etc/lxc/lxc-usernet. Nothing is added to the machine's own network namespace:
lxc-user-nic plugs the veth into the bridge of the namespace it is run in, so the
supervisors run inside the lab (`prefix`), as the user.

The tests (tests/test_lxc_user_nic.py) and the benchmark's net-lxc-user-nic scenario
share it. dnsmasq runs as lxc-net runs it (authoritative, --strict-order,
--bind-interfaces), with --no-ping unless asked: lxc-net's default ping check makes
it wait 3 s before every first offer, which would be all a start-up figure shows.
"""
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

USERNET = "/etc/lxc/lxc-usernet"
LXC_USER_NIC = "/usr/libexec/lxc/lxc-user-nic"
DNSMASQ = "/usr/sbin/dnsmasq"
BRIDGE = "lxcbr0"
ADDRESS = "10.0.3.1"
HOSTNAME = "lab.test"  # dnsmasq answers it with ADDRESS: a real lookup through the lease


def missing() -> str:
    """Why a lab cannot be built here, or ""."""
    if os.getuid() != 0:
        return "building the lxc-user-nic lab (a netns, a bridge, dnsmasq) needs root"
    for path, package in ((LXC_USER_NIC, "lxc"), (DNSMASQ, "dnsmasq-base")):
        if not os.path.exists(path):
            return f"{path} is not installed (apt-get install {package})"
    return ""


class Lab:
    """`with Lab(user) as lab:` ... `lab.prefix + argv` runs argv in the lab."""

    def __init__(self, user: str, *, grant: int = 1, bridge: bool = True, dhcp: bool = True,
                 router: bool = True, dns: bool = True, ping: bool = False,
                 lease: str = "1h", renew_after: int = 0):
        self.user, self.grant, self.bridge, self.dhcp = user, grant, bridge, dhcp
        self.dnsmasq_options = dict(router=router, dns=dns, ping=ping, lease=lease,
                                    renew_after=renew_after)
        self.name = "rlt-lxc-" + uuid.uuid4().hex[:8]
        self.prefix = ["ip", "netns", "exec", self.name]
        self.dir = ""
        self.dnsmasq: subprocess.Popen | None = None
        self._usernet_line = ""
        self._created_usernet = False
        self._netns = False

    def __enter__(self) -> "Lab":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rlt-lxc-lab-")
        _ip("netns", "add", self.name)
        self._netns = True
        _ip("-n", self.name, "link", "set", "lo", "up")
        if self.bridge:
            _ip("-n", self.name, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", self.name, "addr", "add", f"{ADDRESS}/24", "dev", BRIDGE)
            _ip("-n", self.name, "link", "set", BRIDGE, "up")
        if self.grant:
            self.add_grant(self.grant)
        if self.bridge and self.dhcp:
            self.start_dnsmasq(**self.dnsmasq_options)

    def add_grant(self, count: int, bridge: str = BRIDGE) -> None:
        """`USER veth BRIDGE COUNT`, marked as ours: lxc-user-nic reads 4 fields and
        ignores the rest of a line, and close() removes exactly this line."""
        self._usernet_line = f"{self.user} veth {bridge} {count} # {self.name}\n"
        os.makedirs(os.path.dirname(USERNET), exist_ok=True)
        self._created_usernet = not os.path.exists(USERNET)
        with _locked(USERNET) as f:
            text = f.read()
            if text and not text.endswith("\n"):
                text += "\n"
            _rewrite(f, text + self._usernet_line)
        os.chmod(USERNET, 0o644)

    def remove_grant(self) -> None:
        if not self._usernet_line:
            return
        with _locked(USERNET) as f:
            lines = f.read().splitlines(keepends=True)
            if self._usernet_line in lines:
                lines.remove(self._usernet_line)
            _rewrite(f, "".join(lines))
            empty = not lines
        if empty and self._created_usernet:
            os.unlink(USERNET)
        self._usernet_line = ""

    def start_dnsmasq(self, *, router: bool = True, dns: bool = True, ping: bool = False,
                      lease: str = "1h", renew_after: int = 0,
                      first: str = "10.0.3.2", last: str = "10.0.3.254") -> None:
        argv = [DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--strict-order",
                "--bind-interfaces", f"--listen-address={ADDRESS}", f"--interface={BRIDGE}",
                "--except-interface=lo", f"--dhcp-range={first},{last},{lease}",
                "--dhcp-no-override", "--dhcp-authoritative",
                f"--dhcp-leasefile={self.dir}/leases", f"--pid-file={self.dir}/dnsmasq.pid",
                f"--log-facility={self.dir}/dnsmasq.log", "--log-dhcp",
                "--no-resolv", "--no-hosts", f"--address=/{HOSTNAME}/{ADDRESS}"]
        if not ping:
            argv.append("--no-ping")
        if not router:
            argv.append("--dhcp-option=3")  # an empty option: none sent
        if not dns:
            argv.append("--dhcp-option=6")
        if renew_after:  # T1, T2: dnsmasq's shortest lease is 2 minutes
            argv += [f"--dhcp-option=option:T1,{renew_after}",
                     f"--dhcp-option=option:T2,{renew_after * 2}"]
        self.dnsmasq = subprocess.Popen(self.prefix + argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not _serving_dhcp(self.dnsmasq.pid):
            if self.dnsmasq.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {self.dnsmasq.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError("dnsmasq did not listen on port 67 within 10 s")
            time.sleep(0.02)

    def stop_dnsmasq(self) -> None:
        if self.dnsmasq is not None:
            self.dnsmasq.send_signal(signal.SIGTERM)
            try:
                self.dnsmasq.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.dnsmasq.kill()
                self.dnsmasq.wait()
            self.dnsmasq.stderr.close()
            self.dnsmasq = None

    def dhcp_log(self) -> str:
        try:
            with open(os.path.join(self.dir, "dnsmasq.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def leases(self) -> list[list[str]]:
        """dnsmasq's lease file: EXPIRY MAC IP NAME CLIENT-ID lines, split."""
        try:
            with open(os.path.join(self.dir, "leases")) as f:
                return [line.split() for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """`argv` in the lab, as root."""
        return subprocess.run(self.prefix + argv, capture_output=True, text=True, **kw)

    def close(self) -> None:
        """Everything the lab added, also after a failure half-way: dnsmasq, the grant,
        what still runs in the netns, the netns (and with it the bridge and every veth
        lxc-user-nic plugged into it), the temp dir."""
        self.stop_dnsmasq()
        self.remove_grant()
        if self._netns:
            _kill_inside(self.name)
            subprocess.run(["ip", "netns", "del", self.name], check=False,
                           capture_output=True)
            self._netns = False
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _serving_dhcp(pid: int) -> bool:
    """Whether process `pid` has a UDP socket on port 67 (in its network namespace)."""
    try:
        with open(f"/proc/{pid}/net/udp") as f:
            return any(line.split()[1].endswith(":0043") for line in list(f)[1:])
    except OSError:
        return False


def _kill_inside(name: str) -> None:
    """SIGKILL what still runs in the lab's netns (a supervisor a test left), so that
    the netns goes with `ip netns del`."""
    result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in result.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


class _locked:
    """The file at `path` opened for update (created if need be) under an exclusive
    flock: other tests' edits of it wait."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self):
        self.f = open(self.path, "a+")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        self.f.seek(0)
        return self.f

    def __exit__(self, *_):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _rewrite(f, text: str) -> None:
    f.seek(0)
    f.truncate()
    f.write(text)
    f.flush()
