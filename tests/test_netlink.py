"""rootless.linux.netlink's routing calls, encoded by hand (no pyroute2), against the kernel
in a network namespace of the test user's own: what they write is what `ip` reads
back, and a refusal is an OSError with the kernel's errno."""
from conftest import VENV_BIN

# Run in `unshare -Urn` as the test user: the calls the socket factory makes for
# clients' addresses (_transparent), then what `ip` shows of them.
CALLS = """
import errno, subprocess, sys
from rootless.drivers.port import _transparent as t

def show(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # as in the child
t.set_up_routing()
t.udp_rule("add", 5353)
print(show("-4", "route", "show", "table", str(t.TABLE)), end="")
print(show("-4", "rule", "show"), end="")
print(show("-6", "rule", "show"), end="")
try:
    t.set_up_routing()
except OSError as exc:
    print("again:", errno.errorcode[exc.errno])
t.udp_rule("del", 5353)
print("after del:", "5353" in show("-4", "rule", "show") + show("-6", "rule", "show"))
"""


def test_routing_for_clients_addresses_as_ip_shows_it(user):
    r = user.run(["unshare", "-Urn", f"{VENV_BIN}/python3", "-c", CALLS])
    assert r.returncode == 0, r.stderr
    lines = [" ".join(line.split()) for line in r.stdout.splitlines()]
    assert "local default dev lo scope host" in lines, r.stdout
    # Both families: the mark's rule and the UDP port's, each to the table.
    for priority in ("100:", "101:"):
        assert len([line for line in lines if line.startswith(priority)]) == 2, r.stdout
    assert "100: from all fwmark 0x524c lookup 21068" in lines, r.stdout
    assert "101: from all ipproto udp sport 5353 lookup 21068" in lines, r.stdout
    assert "again: EEXIST" in lines, r.stdout  # as `ip route add` says it
    assert "after del: False" in lines, r.stdout
