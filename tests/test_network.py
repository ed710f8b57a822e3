"""The user-mode network drivers (slirp4netns, pasta) through the real thing: real
helpers, real traffic, rootless-run started as the unprivileged test user.

Network safety: traffic goes only to loopback or into namespaces a test created. From
the child, the gateway 10.0.2.2 is the host's 127.0.0.1, except with pasta and
--disable-host-loopback (--no-map-gw), where pasta sends it out for real: that case runs
only inside a sandbox netns of its own (see `sandbox_netns`). Every other pasta run says
--disable-host-loopback=false explicitly, whatever rootless-run's default is.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from test_core import Lines, wait_until

HELPERS = ("slirp4netns", "pasta")
PACKAGES = {"slirp4netns": "slirp4netns", "pasta": "passt"}
SERVER = ("import http.server, sys\n"
          "s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), "
          "http.server.SimpleHTTPRequestHandler)\n"
          "print(s.server_address[1], flush=True)\n"
          "s.serve_forever()\n")


def net_flags(driver: str, host_loopback: bool = True) -> list[str]:
    """--net=DRIVER, with the host-loopback mapping stated, not left to the default."""
    return [f"--net={driver}", f"--disable-host-loopback={'false' if host_loopback else 'true'}"]


def helper_processes(user, name: str) -> list[tuple[int, str, str]]:
    """Live processes of `user` whose argv[0] is the helper `name` (pasta re-executes
    itself as pasta.avx2, with the same argv)."""
    return [p for p in user.processes()
            if p[2] and os.path.basename(p[2].split()[0]).startswith(name)]


def helper_and_command_up(user, name: str):
    """For wait_until: the helper `name` runs, and so does the command `sleep 60`."""
    return (any(p[2] == "sleep 60" for p in user.processes())
            and helper_processes(user, name))


def slirp4netns_argv(user) -> list[str]:
    """The argv of the one slirp4netns the user runs."""
    helpers = helper_processes(user, "slirp4netns")
    assert len(helpers) == 1, helpers
    with open(f"/proc/{helpers[0][0]}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


def json_docs(text: str) -> list:
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def http_server():
    """`serve(prefix=[])`: an HTTP server on 127.0.0.1 (of the netns `prefix` runs it in,
    e.g. ["ip", "netns", "exec", NAME]) serving /token. Returns (port, token)."""
    procs, dirs = [], []

    def serve(prefix: list[str] = ()) -> tuple[int, str]:
        directory = tempfile.mkdtemp(prefix="rlt-www-")
        dirs.append(directory)
        token = "rlt-" + uuid.uuid4().hex
        with open(os.path.join(directory, "token"), "w") as f:
            f.write(token)
        proc = subprocess.Popen([*prefix, sys.executable, "-c", SERVER], cwd=directory,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
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


def curl(port: int) -> list[str]:
    return ["curl", "-sS", "-m", "3", f"http://10.0.2.2:{port}/token"]


@pytest.fixture
def sandbox_netns():
    """A network namespace whose only way out is a veth into a second, empty netns:
    packets for the "outside" (10.0.2.2 with pasta --no-map-gw) vanish there.
    Returns the name of the first; both are deleted at teardown."""
    name = "rlt-sbx-" + uuid.uuid4().hex[:6]
    peer = name + "-p"
    created = []

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    try:
        for ns in (name, peer):
            ip("netns", "add", ns)
            created.append(ns)
        # no dummy module here: a veth whose other end sits alone in `peer`
        ip("-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1", "netns", peer)
        ip("-n", name, "addr", "add", "192.0.2.1/24", "dev", "d0")
        ip("-n", name, "link", "set", "d0", "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", peer, "link", "set", "d1", "up")
        ip("-n", name, "route", "add", "default", "dev", "d0")
        yield name
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def run_in_netns(user, netns: str, args: list[str], timeout: float = 60):
    return subprocess.run(["ip", "netns", "exec", netns, *user.argv(args)], env=user.env(),
                          cwd="/tmp", capture_output=True, text=True, timeout=timeout)


# -- addresses, routes, MTU -----------------------------------------------------------

ADDRESSING = [  # (extra flags, ifname, address, gateway, mtu)
    pytest.param([], "tap0", "10.0.2.100", "10.0.2.2", 65520, id="defaults"),
    pytest.param(["--mtu=1500", "--cidr=10.0.3.0/24", "--ifname=eth7"],
                 "eth7", "10.0.3.100", "10.0.3.2", 1500, id="mtu-cidr-ifname"),
]


@pytest.mark.parametrize("driver", HELPERS)
@pytest.mark.parametrize("flags,ifname,address,gateway,mtu", ADDRESSING)
def test_child_interface(user, rootless_run, driver, flags, ifname, address, gateway, mtu):
    r = user.run([rootless_run, *net_flags(driver), *flags, "--", "sh", "-c",
                  "ip -j addr show; ip -j route show; ip -j link show"])
    assert r.returncode == 0, r.stderr
    addrs, routes, links = json_docs(r.stdout)
    assert sorted(link["ifname"] for link in links) == sorted(["lo", ifname])
    link = next(link for link in links if link["ifname"] == ifname)
    assert link["mtu"] == mtu
    assert "UP" in link["flags"]
    iface = next(a for a in addrs if a["ifname"] == ifname)
    inet = [(a["local"], a["prefixlen"]) for a in iface["addr_info"] if a["family"] == "inet"]
    assert inet == [(address, 24)]
    default = [rt for rt in routes if rt["dst"] == "default"]
    assert len(default) == 1, routes
    assert (default[0]["gateway"], default[0]["dev"]) == (gateway, ifname)
    # and the helper went with the run
    assert wait_until(lambda: not helper_processes(user, driver), 3), \
        f"{driver} still running after the run: {helper_processes(user, driver)}"


SEGMENT = ("import socket, sys\n"
           "s = socket.create_connection(('10.0.2.2', int(sys.argv[1])), timeout=5)\n"
           "print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG))\n"
           "print(open('/sys/class/net/tap0/mtu').read().strip())\n")


@pytest.mark.parametrize("mtu,slirp_mtu,mss", [
    (0, 21885, 21845),    # the default 65520: slirp4netns works with the cap
    (65520, 21885, 21845),
    (1500, 1500, 1460),   # under the cap: as asked
], ids=["default", "65520", "1500"])
def test_slirp4netns_segments_fit_its_window(user, rootless_run, start, http_server,
                                             mtu, slirp_mtu, mss):
    """libslirp's TCP window is 65535 bytes, unscaled: at MTU 65520 the child would send
    32767-byte segments (half the window) and stall on libslirp's window updates.
    slirp4netns works at MTU 21885 instead, three segments to a window, while the
    interface keeps the MTU asked for."""
    port, _ = http_server()
    flags = [*net_flags("slirp4netns"), *([f"--mtu={mtu}"] if mtu else [])]
    r = user.run([rootless_run, *flags, "--", sys.executable, "-c", SEGMENT, str(port)])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(mss), str(mtu or 65520)]
    assert 3 * mss <= 65535
    proc = start([rootless_run, *flags, "--", "sleep", "60"])
    assert wait_until(lambda: helper_and_command_up(user, "slirp4netns"), 15), \
        (user.processes(), proc.poll())
    assert f"--mtu={slirp_mtu}" in slirp4netns_argv(user)
    proc.terminate()
    proc.wait(timeout=15)


DATAGRAM_SIZES = (1000, 21856, 21857, 40000, 65000)  # around slirp4netns' MTU, and over
UDP_ECHO = ("import socket, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.settimeout(5)\n"
            "for size in map(int, sys.argv[2:]):\n"
            "    payload = bytes(range(256)) * (size // 256) + b'x' * (size % 256)\n"
            "    s.sendto(payload, ('10.0.2.2', int(sys.argv[1])))\n"
            "    data = s.recv(65536)\n"
            "    print(len(data), data == payload)\n")


def test_slirp4netns_big_datagrams_both_ways(user, rootless_run):
    """Datagrams bigger than slirp4netns' capped MTU, up to the interface's, go to the
    host and back whole (back, slirp4netns fragments them, and the child reassembles)."""
    host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    host.bind(("127.0.0.1", 0))
    host.settimeout(0.2)
    done = threading.Event()

    def echo():
        while not done.is_set():
            try:
                data, peer = host.recvfrom(65536)
            except TimeoutError:
                continue
            host.sendto(data, peer)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    try:
        r = user.run([rootless_run, *net_flags("slirp4netns"), "--", sys.executable, "-c",
                      UDP_ECHO, str(host.getsockname()[1]), *map(str, DATAGRAM_SIZES)])
    finally:
        done.set()
        thread.join(timeout=5)
        host.close()
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"{n} True" for n in DATAGRAM_SIZES]


# -- the host's loopback through the gateway ------------------------------------------

@pytest.mark.parametrize("driver,host_loopback", [
    ("slirp4netns", True), ("pasta", True),
    ("slirp4netns", False),  # pasta without the mapping: only in a sandbox, below
], ids=["slirp4netns", "pasta", "slirp4netns-disable-host-loopback"])
def test_host_loopback_through_gateway(user, rootless_run, http_server, driver,
                                       host_loopback):
    port, token = http_server()
    r = user.run([rootless_run, *net_flags(driver, host_loopback), "--", *curl(port)])
    if host_loopback:
        assert (r.returncode, r.stdout) == (0, token), r.stderr
    else:
        assert r.returncode != 0, "the host's 127.0.0.1 was reachable"
        assert token not in r.stdout


def test_pasta_disable_host_loopback_in_sandbox(user, rootless_run, http_server,
                                                sandbox_netns):
    prefix = ["ip", "netns", "exec", sandbox_netns]
    # Nothing but the veth to an empty netns: no way out to the real network.
    routes = json.loads(subprocess.run([*prefix, "ip", "-j", "route", "show"], check=True,
                                       capture_output=True, text=True).stdout)
    assert {rt["dev"] for rt in routes} == {"d0"}, routes
    port, token = http_server(prefix)
    reachable = run_in_netns(user, sandbox_netns,
                             [rootless_run, *net_flags("pasta", True), "--", *curl(port)])
    assert (reachable.returncode, reachable.stdout) == (0, token), reachable.stderr
    blocked = run_in_netns(user, sandbox_netns,
                           [rootless_run, *net_flags("pasta", False), "--", *curl(port)])
    assert blocked.returncode != 0, "the sandbox's 127.0.0.1 was reachable"
    assert token not in blocked.stdout


# -- resolv.conf and hosts ------------------------------------------------------------



ETC_FSTYPE = "awk '$5 == \"/etc\" { for (i = 7; $i != \"-\"; i++) ; t = $(i+1) } END { print t }' " \
             "/proc/self/mountinfo"


@pytest.mark.parametrize("driver", HELPERS)
@pytest.mark.parametrize("cidr,dns", [("", "10.0.2.3"), ("10.0.3.0/24", "10.0.3.3")],
                         ids=["default-cidr", "cidr-10.0.3"])
@pytest.mark.parametrize("copy_up", [False, True], ids=["no-copy-up", "copy-up-etc"])
def test_resolver_files(user, rootless_run, rootlesskit_link, state_dir, driver, cidr, dns,
                        copy_up):
    def snapshot():
        st = os.stat("/etc/resolv.conf")
        with open("/etc/resolv.conf", "rb") as f:
            return f.read(), st.st_mtime_ns, st.st_ino

    before = snapshot()
    with open("/etc/hosts") as f:
        hosts = f.read()
    # rootlesskit's defaults copy nothing up; rootless-run is told to copy /etc up.
    program, extra = (rootless_run, ["--copy-up=/etc"]) if copy_up else (rootlesskit_link, [])
    if cidr:
        extra.append(f"--cidr={cidr}")
    r = user.run([program, f"--state-dir={state_dir}", *net_flags(driver), *extra, "--",
                  "sh", "-c", f"{ETC_FSTYPE}; cat /etc/resolv.conf; echo --; cat /etc/hosts; "
                  f"echo --; cat {state_dir}/resolv.conf"])
    assert r.returncode == 0, r.stderr
    fstype, rest = r.stdout.split("\n", 1)
    assert (fstype == "tmpfs") == copy_up, f"/etc inside is {fstype!r}"
    resolv, inside_hosts, state_resolv = rest.split("--\n")
    assert resolv == f"nameserver {dns}\n"
    assert inside_hosts == hosts
    assert state_resolv == resolv, "STATE/resolv.conf during the run"
    assert snapshot() == before, "the host's /etc/resolv.conf changed"


# -- the helper dies while the command runs -------------------------------------------

@pytest.mark.parametrize("driver", HELPERS)
def test_helper_death_ends_run(user, rootless_run, start, state_dir, driver):
    proc = start([rootless_run, f"--state-dir={state_dir}", *net_flags(driver), "--",
                  "sleep", "60"])

    assert wait_until(lambda: helper_and_command_up(user, driver), 15), \
        (user.processes(), proc.poll())
    helpers = helper_processes(user, driver)
    if driver == "pasta":  # the daemon, not the short-lived starter
        with open(os.path.join(state_dir, "pasta.pid")) as f:
            pid = int(f.read())
        assert pid in [p[0] for p in helpers], (pid, helpers)
    else:
        assert len(helpers) == 1, helpers
        pid = helpers[0][0]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rootless-run still running 15 s after {driver} died")
    assert time.monotonic() - t0 < 15
    assert code != 0
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and driver in lines[0] and "error" in lines[0], stderr
    assert wait_until(lambda: not user.processes(), 3), \
        f"left running after {driver} died: {user.processes()}"


# -- bad input: one line, exit 1, no namespace ----------------------------------------

@pytest.fixture
def spy_binaries(user):
    """Wrappers of slirp4netns and pasta that log each call: `calls()` are the argument
    lines of the calls that were not a --help probe (those would have started a network)."""
    directory = tempfile.mkdtemp(prefix="rlt-spy-")
    os.chmod(directory, 0o755)
    logdir = os.path.join(directory, "log")
    os.mkdir(logdir, 0o700)
    os.chown(logdir, user.uid, user.gid)
    paths = {}
    for name in HELPERS:
        path = paths[name] = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\necho "$*" >> {logdir}/calls\nexec {shutil.which(name)} "$@"\n')
        os.chmod(path, 0o755)

    def calls() -> list[str]:
        try:
            with open(os.path.join(logdir, "calls")) as f:
                return [line for line in f.read().splitlines() if line != "--help"]
        except FileNotFoundError:
            return []

    yield paths, calls
    shutil.rmtree(directory)


BAD_NET_INPUT = [  # (driver, flags, what the error line must name)
    ("slirp4netns", ["--slirp4netns-binary=/nonexistent"],
     ["slirp4netns", "apt-get install slirp4netns"]),
    ("pasta", ["--pasta-binary=/nonexistent"], ["pasta", "apt-get install passt"]),
    *[(d, ["--cidr=banana"], ["--cidr=banana"]) for d in HELPERS],
    *[(d, ["--cidr=10.0.2.0/28"], ["--cidr=10.0.2.0/28", "small"]) for d in HELPERS],
    *[(d, ["--mtu=67"], ["--mtu=67"]) for d in HELPERS],
    *[(d, ["--mtu=70000"], ["--mtu=70000"]) for d in HELPERS],
    *[(d, ["--mtu=1200", "--ipv6"], ["--mtu=1200", "IPv6"]) for d in HELPERS],
    *[(d, [f"--ifname={name}"], [f"--ifname={name}", why]) for d in HELPERS
      for name, why in (("", "empty"), ("averyveryverylongif0", "15"), ("a/b", "'/'"),
                        ("tap 0", "space"), ("..", "not a name"))],
    ("slirp4netns", ["--slirp4netns-sandbox=bogus"], ["--slirp4netns-sandbox=bogus"]),
    ("slirp4netns", ["--slirp4netns-seccomp=bogus"], ["--slirp4netns-seccomp=bogus"]),
]


def _bad_run(user, rootless_run, user_tmp, spy, driver, flags, outer=()):
    paths, _ = spy
    marker = f"/tmp/rlt-marker-{uuid.uuid4().hex[:8]}"
    binary = [] if any(f.startswith(f"--{driver}-binary") for f in flags) else \
        [f"--{driver}-binary={paths[driver]}"]
    try:
        r = user.run([rootless_run, *net_flags(driver), *binary, *flags, "--", "touch", marker],
                     env={"TMPDIR": user_tmp}, outer=outer)
        ran = os.path.exists(marker)
    finally:
        if os.path.exists(marker):
            os.unlink(marker)
    return r, ran


@pytest.mark.parametrize("driver,flags,needles", [
    pytest.param(d, f, n, id=f"{d} {' '.join(f)}") for d, f, n in BAD_NET_INPUT])
def test_bad_network_input(user, rootless_run, user_tmp, spy_binaries, driver, flags, needles):
    r, ran = _bad_run(user, rootless_run, user_tmp, spy_binaries, driver, flags)
    assert_one_line_error(r, *needles)
    assert not ran, "the command ran"
    assert spy_binaries[1]() == [], f"{driver} was started"
    assert os.listdir(user_tmp) == [], "a temp state dir was left behind"


@pytest.fixture
def tun_not_accessible(tmp_path):
    """A prefix for user.run: /dev/net/tun closed to the user, in a mount namespace of
    its own (a root-only file bound over it), so that other test runs keep theirs."""
    closed = tmp_path / "tun"
    closed.write_text("")
    closed.chmod(0o600)
    return ("unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" /dev/net/tun && exec "$@"', str(closed))


@pytest.mark.parametrize("driver", HELPERS)
def test_dev_net_tun_not_accessible(user, rootless_run, user_tmp, spy_binaries, driver,
                                    tun_not_accessible):
    r, ran = _bad_run(user, rootless_run, user_tmp, spy_binaries, driver, [],
                      outer=tun_not_accessible)
    assert_one_line_error(r, "/dev/net/tun")
    assert not ran, "the command ran"
    assert spy_binaries[1]() == [], f"{driver} was started"
    assert os.listdir(user_tmp) == []


# -- slirp4netns sandbox and seccomp --------------------------------------------------

@pytest.mark.parametrize("value", ["true", "auto", "false", None],
                         ids=["true", "auto", "false", "default"])
def test_slirp4netns_sandbox_and_seccomp(user, rootless_run, start, http_server, value):
    port, token = http_server()
    flags = [] if value is None else [f"--slirp4netns-sandbox={value}",
                                      f"--slirp4netns-seccomp={value}"]
    proc = start([rootless_run, *net_flags("slirp4netns"), *flags, "--", "sh", "-c",
                  " ".join(curl(port)) + "; echo; read line"], stdin=subprocess.PIPE)
    lines = Lines(proc.stdout)
    assert lines.next(timeout=20) == token, "no connectivity to the host's loopback"
    argv = slirp4netns_argv(user)
    proc.stdin.write("done\n")
    proc.stdin.flush()
    assert proc.wait(timeout=15) == 0, proc.stderr.read()
    enabled = value in ("true", "auto")  # Debian's slirp4netns 1.2.0 has both
    assert ("--enable-sandbox" in argv) == enabled, argv
    assert ("--enable-seccomp" in argv) == enabled, argv


# -- what slirp4netns watches ----------------------------------------------------------

@pytest.mark.parametrize("port_driver", ["builtin", "slirp4netns"])
def test_slirp4netns_polls_only_the_fds_it_needs(user, rootless_run, start, state_dir,
                                                 port_driver):
    """slirp4netns polls every fd it watches once per packet: the API socket only for
    the port driver that uses it, and no exit fd where setpriv's parent-death signal
    does that job (test_core's SIGKILL test checks that it does)."""
    proc = start([rootless_run, f"--state-dir={state_dir}", *net_flags("slirp4netns"),
                  f"--port-driver={port_driver}", "--", "sleep", "60"])
    assert wait_until(lambda: helper_and_command_up(user, "slirp4netns"), 15), \
        (user.processes(), proc.poll())
    argv = slirp4netns_argv(user)
    api = os.path.join(state_dir, "slirp4netns.sock")
    assert not any(a.startswith("--exit-fd") for a in argv), argv
    assert (f"--api-socket={api}" in argv) == (port_driver == "slirp4netns"), argv
    assert os.path.exists(api) == (port_driver == "slirp4netns")
    proc.terminate()  # forwarded to the command
    proc.wait(timeout=15)
    assert wait_until(lambda: not user.processes(), 5), user.processes()


def test_slirp4netns_exit_fd_without_setpriv(user, rootless_run, spawned, user_tmp,
                                             state_dir):
    """Without setpriv on PATH, slirp4netns gets --exit-fd, and still goes when the
    supervisor is SIGKILLed."""
    bin_dir = tempfile.mkdtemp(prefix="rlt-nosetpriv-")
    try:
        os.chmod(bin_dir, 0o755)
        for tool in ("newuidmap", "newgidmap", "slirp4netns", "sh", "sleep"):
            os.symlink(shutil.which(tool), os.path.join(bin_dir, tool))
        # env sets PATH after setpriv (the harness's own step) has been found
        proc = user.popen(["/usr/bin/env", f"PATH={bin_dir}", rootless_run,
                           f"--state-dir={state_dir}", *net_flags("slirp4netns"),
                           "--port-driver=builtin", "--", "sleep", "60"],
                          env={"TMPDIR": user_tmp})
        spawned.append(proc)
        assert wait_until(lambda: helper_and_command_up(user, "slirp4netns"), 15), \
            (user.processes(), proc.poll(), proc.poll() is not None and proc.stderr.read())
        argv = slirp4netns_argv(user)
        assert any(a.startswith("--exit-fd=") for a in argv), argv
        proc.kill()
        proc.wait(timeout=10)
        assert wait_until(lambda: not user.processes(), 3), \
            f"still running after SIGKILL of the supervisor: {user.processes()}"
    finally:
        shutil.rmtree(bin_dir)


# -- --detach-netns -------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["slirp4netns", "pasta", "none"])
def test_detach_netns(user, rootless_run, http_server, driver):
    """The command keeps the host's network; the new netns is at STATE/netns, configured
    by the driver, and reachable with nsenter (traffic through it included)."""
    port, token = http_server()
    host_netns = os.stat("/proc/self/ns/net").st_ino
    script = ('stat -L -c %i /proc/self/ns/net; '
              'nsenter --net="$ROOTLESSKIT_STATE_DIR/netns" ip -j addr; echo; ')
    if driver != "none":
        script += 'nsenter --net="$ROOTLESSKIT_STATE_DIR/netns" ' + " ".join(curl(port))
    r = user.run([rootless_run, *net_flags(driver), "--detach-netns", "--", "sh", "-c", script])
    assert r.returncode == 0, r.stderr
    inode, _, rest = r.stdout.partition("\n")
    assert int(inode) == host_netns  # the command's own network is the host's
    links = {link["ifname"]: link for link in json_docs(rest.split("\n\n")[0])[0]}
    assert links["lo"]["operstate"] in ("UNKNOWN", "UP") and "UP" in links["lo"]["flags"]
    if driver == "none":
        assert set(links) == {"lo"}
        return
    assert set(links) == {"lo", "tap0"}
    assert links["tap0"]["mtu"] == 65520  # slirp4netns' own is capped; the child's is not
    addrs = [a["local"] for a in links["tap0"]["addr_info"] if a["family"] == "inet"]
    assert addrs == ["10.0.2.100"]
    assert rest.rstrip().endswith(token)  # a real connection out of the detached netns


def test_detach_netns_needs_a_network_namespace(user, rootless_run):
    r = user.run([rootless_run, "--net=host", "--detach-netns", "--", "true"])
    assert_one_line_error(r, "--detach-netns", "--net")


# -- rootless-run's defaults and their opt-outs -----------------------------------------

def test_defaults_copy_up_etc_and_no_host_loopback(user, rootless_run, http_server):
    port, token = http_server()
    r = user.run([rootless_run, "--", "sh", "-c",
                  "stat -f -c %T /etc; " + " ".join(curl(port)) + " || echo unreachable"])
    assert r.returncode == 0, r.stderr
    fs, _, fetched = r.stdout.partition("\n")
    assert fs == "tmpfs"
    assert token not in fetched and "unreachable" in fetched


def test_defaults_can_be_turned_off(user, rootless_run, http_server):
    port, token = http_server()
    r = user.run([rootless_run, "--copy-up=none", "--disable-host-loopback=false", "--",
                  "sh", "-c", "stat -f -c %T /etc; " + " ".join(curl(port))])
    assert r.returncode == 0, r.stderr
    fs, _, fetched = r.stdout.partition("\n")
    assert fs != "tmpfs"
    assert fetched.strip() == token
