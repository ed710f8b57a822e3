"""--net=lxc-user-nic through the real thing: Debian's setuid lxc-user-nic, dnsmasq
serving DHCP and DNS on a bridge, rootless-run as the unprivileged test user.

Everything happens in a lab each test builds as root (contrib/bench/lxc_lab.py): a
network namespace of its own with the bridge lxcbr0 (10.0.3.1/24) and dnsmasq, and
a line granting the test user veths on it in /etc/lxc/lxc-usernet. rootless-run runs
inside that namespace (lxc-user-nic plugs the veth into the bridge of the namespace
it is called in); nothing is added to the machine's own. The lab, dnsmasq, the
grant and every veth go at teardown, also when the test fails.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from test_core import Lines, wait_until
from test_network import assert_one_line_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from contrib.bench import lxc_lab  # noqa: E402
from contrib.bench.lxc_lab import ADDRESS, BRIDGE, HOSTNAME, Lab  # noqa: E402

pytestmark = pytest.mark.skipif(bool(lxc_lab.missing()), reason=lxc_lab.missing() or "-")

NET = ["--net=lxc-user-nic"]
SERVER = ("import http.server, sys\n"
          "s = http.server.ThreadingHTTPServer((sys.argv[1], 0), "
          "http.server.SimpleHTTPRequestHandler)\n"
          "print(s.server_address[1], flush=True)\n"
          "s.serve_forever()\n")
LEASED = re.compile(rf"DHCPACK\({BRIDGE}\) (\S+) (\S+)")


@pytest.fixture
def lab(user):
    """`lab(**options)`: a Lab (see lxc_lab.Lab) for the test user, built now and
    removed whole at teardown."""
    made = []

    def make(**options) -> Lab:
        built = Lab(user.name, **options)
        made.append(built)
        built.start()
        return built

    yield make
    for built in reversed(made):
        built.close()


@pytest.fixture
def served(lab):
    """`served(lab, address)`: an HTTP server (as root) on `address` in the lab,
    serving /token; returns (port, token)."""
    procs, dirs = [], []

    def serve(where: Lab, address: str = ADDRESS) -> tuple[int, str]:
        directory = tempfile.mkdtemp(prefix="rlt-www-")
        dirs.append(directory)
        token = "rlt-" + uuid.uuid4().hex
        with open(os.path.join(directory, "token"), "w") as f:
            f.write(token)
        proc = subprocess.Popen(where.prefix + [sys.executable, "-c", SERVER, address],
                                cwd=directory, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        procs.append(proc)
        port = Lines(proc.stdout).next(timeout=10)
        assert port and port.isdigit(), f"the test server did not start: {port!r}"
        return int(port), token

    yield serve
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
    for directory in dirs:
        shutil.rmtree(directory, ignore_errors=True)


def leases(where: Lab) -> list[tuple[str, str]]:
    """(address, MAC) of each DHCPACK dnsmasq logged, in order."""
    return LEASED.findall(where.dhcp_log())


def bridge_ports(where: Lab) -> list[str]:
    """The veths plugged into the lab's bridge."""
    out = where.run(["ip", "-j", "link", "show", "master", BRIDGE], check=True).stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


def sections(text: str) -> list[str]:
    return [part.strip() for part in text.split("---")]


def ctl(rootless_run: str) -> str:
    return os.path.join(os.path.dirname(rootless_run), "rootless-ctl")


# -- the network it gives ---------------------------------------------------------------

def test_lease_address_route_and_resolver(user, rootless_run, lab):
    """eth0 gets the address, mask, router and DNS server of the lease; resolv.conf
    names that server, and it answers; the lease is released when the run ends."""
    where = lab()
    script = ("ip -j addr show eth0; echo ---; ip -j route show; echo ---; "
              "cat /etc/resolv.conf; echo ---; getent hosts " + HOSTNAME)
    r = user.run([rootless_run, *NET, "--", "sh", "-c", script], outer=where.prefix)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr  # rootless-run's defaults: loopback already off
    addrs, routes, resolv, hosts = sections(r.stdout)
    link = json.loads(addrs)[0]
    assert link["mtu"] == 1500 and "UP" in link["flags"]  # the bridge's MTU
    inet = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
    assert len(inet) == 1 and inet[0][1] == 24, inet
    ip = inet[0][0]
    assert ip.startswith("10.0.3.") and ip != ADDRESS
    assert (ip, link["address"]) in leases(where), where.dhcp_log()
    default = [rt for rt in json.loads(routes) if rt["dst"] == "default"]
    assert [(rt["gateway"], rt["dev"]) for rt in default] == [(ADDRESS, "eth0")]
    assert resolv == f"nameserver {ADDRESS}"
    assert hosts.split() == [ADDRESS, HOSTNAME]
    assert wait_until(lambda: f"DHCPRELEASE({BRIDGE}) {ip} {link['address']}"
                      in where.dhcp_log(), 5), where.dhcp_log()
    assert wait_until(lambda: bridge_ports(where) == [], 5), bridge_ports(where)


def test_fetch_from_the_bridge_and_no_host_loopback(user, rootless_run, rootlesskit_link,
                                                    lab, served):
    """A server on the bridge's address answers; one on the lab's 127.0.0.1 is out of
    reach (--disable-host-loopback is implied, and said under rootlesskit's name,
    whose default leaves it off, as rootlesskit says it)."""
    where = lab()
    port, token = served(where)
    local_port, _ = served(where, "127.0.0.1")
    r = user.run([rootlesskit_link, *NET, "--", "sh", "-c",
                  f"curl -sS -m 3 http://{ADDRESS}:{port}/token; echo; "
                  f"curl -sS -m 3 http://{ADDRESS}:{local_port}/token || echo unreachable"],
                 outer=where.prefix)
    assert r.returncode == 0, r.stderr
    fetched, second = r.stdout.split("\n", 1)
    assert fetched == token
    assert "unreachable" in second
    warnings = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "--disable-host-loopback is implied" in warnings[0], \
        r.stderr


@pytest.mark.parametrize("flags,ifname,mtu", [
    pytest.param(["--mtu=1400", "--ifname=lan0"], "lan0", 1400, id="mtu-ifname"),
    pytest.param(["--ifname=tap0"], "tap0", 1500, id="ifname-given"),
])
def test_mtu_and_ifname(user, rootless_run, lab, flags, ifname, mtu):
    where = lab()
    r = user.run([rootless_run, *NET, *flags, "--", "ip", "-j", "addr", "show"],
                 outer=where.prefix)
    assert r.returncode == 0, r.stderr
    links = {link["ifname"]: link for link in json.loads(r.stdout)}
    assert set(links) == {"lo", ifname}
    assert links[ifname]["mtu"] == mtu
    assert [a["local"] for a in links[ifname]["addr_info"] if a["family"] == "inet"]


def test_cidr_is_refused(user, rootless_run):
    r = user.run([rootless_run, *NET, "--cidr=10.0.9.0/24", "--", "true"])
    assert_one_line_error(r, "--cidr", "--net=lxc-user-nic", "DHCP")


def test_help_names_the_driver_and_its_flags(user, rootless_run):
    r = user.run([rootless_run, "--help"])
    assert r.returncode == 0, r.stderr
    for text in ("lxc-user-nic", "--lxc-user-nic-binary", "--lxc-user-nic-bridge",
                 "eth0 for lxc-user-nic"):
        assert text in r.stdout, text


# -- published ports and the API ----------------------------------------------------------

def test_published_port_and_api(user, rootless_run, start, state_dir, lab):
    """-p through the builtin driver (auto's choice here); the API says the leased
    address is the child's (dynamic, as rootlesskit says), and a port added to that
    address reaches the command there."""
    where = lab()
    token = "rlt-" + uuid.uuid4().hex
    server = ("import http.server\n"
              "class H(http.server.BaseHTTPRequestHandler):\n"
              "    def do_GET(self):\n"
              "        self.send_response(200); self.end_headers()\n"
              f"        self.wfile.write(b'{token}')\n"
              "http.server.ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()\n")
    proc = start([rootless_run, *NET, f"--state-dir={state_dir}", "-p",
                  "127.0.0.1:18080:8080/tcp", "--", sys.executable, "-c", server],
                 outer=where.prefix)
    sock = os.path.join(state_dir, "api.sock")
    assert wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, 20)
    assert proc.poll() is None, proc.stderr.read()

    def fetch(port):
        # Before the server listens, the relay closes the client's connection (as
        # rootlesskit's does): curl's "empty reply", which only --retry-all-errors
        # retries. The first client used to wait ~0.1 s for trio, time enough for it.
        return where.run(["curl", "-sS", "-m", "3", "--retry", "20", "--retry-all-errors",
                          "--retry-delay", "0", f"http://127.0.0.1:{port}/"]).stdout

    assert fetch(18080) == token
    r = user.run([ctl(rootless_run), "--socket", sock, "info", "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    net, ports = info["networkDriver"], info["portDriver"]
    assert (net["driver"], net["dns"], net["dynamicChildIP"]) == \
        ("lxc-user-nic", [ADDRESS], True), net
    assert net["childIP"] in [ip for ip, _ in leases(where)], (net, where.dhcp_log())
    assert ports["driver"] == "builtin"
    r = user.run([ctl(rootless_run), "--socket", sock, "add-ports",
                  f"127.0.0.1:18081:{net['childIP']}:8080/tcp"])
    assert r.returncode == 0, r.stderr
    assert fetch(18081) == token
    proc.terminate()
    proc.wait(timeout=15)


# -- the lease over the run's life --------------------------------------------------------

def test_lease_is_renewed_while_the_run_lasts(user, rootless_run, start, state_dir, lab):
    """Renewed at T1 (2 s here: dnsmasq's shortest lease is 2 minutes), again and
    again, on the same address; the address stays on eth0."""
    where = lab(lease="2m", renew_after=2)
    r = user.run([rootless_run, *NET, f"--state-dir={state_dir}", "--", "sh", "-c",
                  "ip -4 -j addr show eth0; sleep 7; echo ---; ip -4 -j addr show eth0; "
                  "echo ---; cat $ROOTLESSKIT_STATE_DIR/dhcp.log"],
                 outer=where.prefix, timeout=60)
    assert r.returncode == 0, r.stderr
    before, after, log = sections(r.stdout)
    assert before == after
    ip = json.loads(before)[0]["addr_info"][0]["local"]
    acks = [lease for lease in leases(where) if lease[0] == ip]
    assert len(acks) >= 3, where.dhcp_log()  # the lease, and at least two renewals
    assert len({mac for _, mac in acks}) == 1
    assert log.count(f"renewed {ip}") >= 2, log


def test_lease_taken_back_ends_the_run(user, rootless_run, start, lab):
    """The server refuses the renewal (DHCPNAK: the address left its range): the
    namespace must not keep it, and the run ends, in one line saying so."""
    where = lab(lease="2m", renew_after=2)
    proc = start([rootless_run, *NET, "--", "sleep", "60"], outer=where.prefix)
    assert wait_until(lambda: leases(where) or proc.poll() is not None, 20)
    ip = leases(where)[0][0]
    where.stop_dnsmasq()
    elsewhere = ("10.0.3.2", "10.0.3.100") if int(ip.rsplit(".", 1)[1]) > 100 else \
        ("10.0.3.150", "10.0.3.254")
    where.start_dnsmasq(lease="2m", renew_after=2, first=elsewhere[0], last=elsewhere[1])
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after the server refused {ip}: {where.dhcp_log()}")
    stderr = proc.stderr.read()
    assert code == 1, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and "took back the lease" in lines[0] and ip in lines[0], stderr
    assert "DHCPNAK" in where.dhcp_log()


def test_detach_netns(user, rootless_run, lab, served):
    """The command keeps the lab's network; the detached netns at STATE/netns has the
    lease, and traffic goes through it."""
    where = lab()
    port, token = served(where)
    inner = 'nsenter --net="$ROOTLESSKIT_STATE_DIR/netns" '
    r = user.run([rootless_run, *NET, "--detach-netns", "--", "sh", "-c",
                  "stat -L -c %i /proc/self/ns/net; echo ---; " + inner +
                  "ip -4 -j addr show eth0; echo ---; " + inner +
                  f"curl -sS -m 3 http://{ADDRESS}:{port}/token"], outer=where.prefix)
    assert r.returncode == 0, r.stderr
    inode, addrs, fetched = sections(r.stdout)
    assert int(inode) == os.stat(f"/run/netns/{where.name}").st_ino
    ip = json.loads(addrs)[0]["addr_info"][0]["local"]
    assert ip in [leased for leased, _ in leases(where)]
    assert fetched == token


# -- what ends a run ------------------------------------------------------------------------

def dhcp_client(user, parent: int) -> int | None:
    """The pid of the run's DHCP client: the parent's other child (the first being
    the namespaces' child), the leader of a process group of its own."""
    for pid, _, _ in user.processes():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent and int(fields[2]) == pid:
            return pid
    return None


def test_dhcp_client_death_ends_the_run(user, rootless_run, start, lab):
    where = lab()
    proc = start([rootless_run, *NET, "--", "sleep", "60"], outer=where.prefix)
    assert wait_until(lambda: any(p[2] == "sleep 60" for p in user.processes()), 20), \
        (proc.poll(), proc.poll() is not None and proc.stderr.read())
    client = dhcp_client(user, proc.pid)
    assert client, user.processes()
    os.kill(client, signal.SIGKILL)
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("rootless-run still running 20 s after its DHCP client died")
    stderr = proc.stderr.read()
    assert code == 1, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and "DHCP client" in lines[0] and "signal 9" in lines[0], stderr
    assert wait_until(lambda: not user.processes(), 3), user.processes()


def test_sigkill_of_the_supervisor_releases_the_lease(user, rootless_run, start, lab):
    """Its DHCP client has SIGTERM for a parent-death signal: it releases the lease
    and goes, with everything else."""
    where = lab()
    proc = start([rootless_run, *NET, "--", "sleep", "60"], outer=where.prefix)
    assert wait_until(lambda: any(p[2] == "sleep 60" for p in user.processes()), 20), \
        (proc.poll(), proc.poll() is not None and proc.stderr.read())
    ip, mac = leases(where)[0]
    proc.kill()
    proc.wait(timeout=10)
    assert wait_until(lambda: not user.processes(), 5), user.processes()
    assert wait_until(lambda: f"DHCPRELEASE({BRIDGE}) {ip} {mac}" in where.dhcp_log(), 5), \
        where.dhcp_log()


# -- errors: one line, before the command starts ------------------------------------------

def bad_run(user, rootless_run, user_tmp, flags, outer=()):
    """rootless-run with `flags` (in the lab `outer`), whose command would leave a
    marker: (the result, whether the command ran)."""
    marker = os.path.join(user_tmp, "ran")
    r = user.run([rootless_run, *NET, *flags, "--", "touch", marker],
                 env={"TMPDIR": user_tmp}, outer=outer, timeout=60)
    return r, os.path.exists(marker)


def assert_refused(r, ran, user, user_tmp, *needles) -> str:
    line = assert_one_line_error(r, *needles)
    assert not ran, "the command ran"
    assert os.listdir(user_tmp) == [], "the temp state dir was left behind"
    assert wait_until(lambda: not user.processes(), 3), user.processes()
    return line


def test_helper_missing(user, rootless_run, user_tmp):
    r, ran = bad_run(user, rootless_run, user_tmp, ["--lxc-user-nic-binary=/nonexistent"])
    assert_refused(r, ran, user, user_tmp, "/nonexistent", "not found",
                   "apt-get install lxc", "--lxc-user-nic-binary")


def test_helper_not_setuid(user, rootless_run, user_tmp):
    directory = tempfile.mkdtemp(prefix="rlt-nosuid-")
    try:
        os.chmod(directory, 0o755)
        copy = os.path.join(directory, "lxc-user-nic")
        shutil.copyfile(lxc_lab.LXC_USER_NIC, copy)
        os.chmod(copy, 0o755)  # root's, but not setuid
        r, ran = bad_run(user, rootless_run, user_tmp, [f"--lxc-user-nic-binary={copy}"])
    finally:
        shutil.rmtree(directory)
    assert_refused(r, ran, user, user_tmp, copy, "not setuid root", "chmod u+s")


@pytest.mark.parametrize("bridge,flags", [(False, []),
                                          (True, ["--lxc-user-nic-bridge=nosuchbr0"])],
                         ids=["no-lxcbr0", "named-bridge-missing"])
def test_bridge_missing(user, rootless_run, user_tmp, lab, bridge, flags):
    where = lab(bridge=bridge)
    r, ran = bad_run(user, rootless_run, user_tmp, flags, outer=where.prefix)
    name = "nosuchbr0" if flags else BRIDGE
    assert_refused(r, ran, user, user_tmp, f"the bridge {name} does not exist",
                   "--lxc-user-nic-bridge")


def test_no_grant(user, rootless_run, user_tmp, lab):
    where = lab(grant=0)
    where.add_grant(1, bridge="otherbr0")  # a grant, but not for this bridge
    r, ran = bad_run(user, rootless_run, user_tmp, [], outer=where.prefix)
    assert_refused(r, ran, user, user_tmp, "Quota reached",  # lxc-user-nic's own words
                   f"grants {user.name} no veth on {BRIDGE}",
                   f"'{user.name} veth {BRIDGE} 1'")
    assert bridge_ports(where) == []


def test_grant_used_up(user, rootless_run, user_tmp, start, lab):
    where = lab(grant=1)
    holder = start([rootless_run, *NET, "--", "sleep", "60"], outer=where.prefix)
    assert wait_until(lambda: any(p[2] == "sleep 60" for p in user.processes()), 20), \
        (holder.poll(), holder.poll() is not None and holder.stderr.read())
    r, ran = bad_run(user, rootless_run, user_tmp, [], outer=where.prefix)
    line = assert_one_line_error(r, "Quota reached", f"grant of 1 veth on {BRIDGE}",
                                 "used up")
    assert not ran, "the command ran"
    assert holder.poll() is None, line
    holder.terminate()
    holder.wait(timeout=15)
    assert wait_until(lambda: bridge_ports(where) == [], 5), bridge_ports(where)


def test_no_dhcp_answer(user, rootless_run, user_tmp, lab):
    where = lab(dhcp=False)
    t0 = time.monotonic()
    r, ran = bad_run(user, rootless_run, user_tmp, [], outer=where.prefix)
    assert time.monotonic() - t0 < 30  # a hang detector, not a timing check
    assert_refused(r, ran, user, user_tmp, f"no DHCP server answered on the bridge {BRIDGE}",
                   "within 10 s", "lxc-net")
    assert wait_until(lambda: bridge_ports(where) == [], 5), bridge_ports(where)


@pytest.mark.parametrize("options,missing", [
    ({"router": False}, "without a router"),
    ({"dns": False}, "without a DNS server"),
    ({"router": False, "dns": False}, "without a router or a DNS server"),
], ids=["no-router", "no-dns", "neither"])
def test_lease_without_router_or_dns(user, rootless_run, user_tmp, lab, options, missing):
    where = lab(**options)
    r, ran = bad_run(user, rootless_run, user_tmp, [], outer=where.prefix)
    assert_refused(r, ran, user, user_tmp, missing, "--dhcp-option")
    ip, mac = leases(where)[0]
    assert wait_until(lambda: f"DHCPRELEASE({BRIDGE}) {ip} {mac}" in where.dhcp_log(), 5)


def test_dhcp_library_cannot_load(user, rootless_run, user_tmp, lab):
    """A broken install (pyroute2 without its DHCP client): the client process says
    so before the namespace is plugged in, and the run is one line, not a traceback
    (the client is gone by the time the parent talks to it)."""
    where = lab()
    planted = tempfile.mkdtemp(prefix="rlt-broken-")
    try:
        os.chmod(planted, 0o755)
        os.mkdir(os.path.join(planted, "pyroute2"))
        with open(os.path.join(planted, "pyroute2", "__init__.py"), "w") as f:
            f.write("raise ImportError('planted by the test')\n")
        os.chmod(os.path.join(planted, "pyroute2"), 0o755)
        marker = os.path.join(user_tmp, "ran")
        r = user.run([rootless_run, *NET, "--", "touch", marker],
                     env={"TMPDIR": user_tmp, "PYTHONPATH": planted}, outer=where.prefix)
        ran = os.path.exists(marker)
    finally:
        shutil.rmtree(planted)
    assert_refused(r, ran, user, user_tmp, "cannot load pyroute2's DHCP client",
                   "planted by the test", "install pyroute2")
    assert bridge_ports(where) == []
