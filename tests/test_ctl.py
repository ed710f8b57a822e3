"""rootless-ctl and the sync API client (rootless.api.client), against a running
instance, as the test user. Debian's rootlessctl is the reference for the output: both
are run against the same socket and must print the same."""
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from types import SimpleNamespace

import pytest

from conftest import RUN, VENV_BIN, free_port, has_ipv6_loopback, wait_for_api

CTL = os.path.join(VENV_BIN, "rootless-ctl")

# The servers under test: Debian's rootlesskit 1.1.0 and ours, with the same flags.
SERVERS = {
    "rootlesskit": ["rootlesskit"],
    "rootless-run": [RUN],
}


@pytest.fixture(params=list(SERVERS))
def server(request, user, state_dir, spawned):
    """A running instance (slirp4netns, builtin port driver): .sock, .state_dir."""
    proc = user.popen([*SERVERS[request.param], "--net=slirp4netns", "--disable-host-loopback",
                       "--port-driver=builtin", f"--state-dir={state_dir}", "sleep", "60"])
    spawned.append(proc)
    sock = wait_for_api(proc, state_dir)
    return SimpleNamespace(kind=request.param, sock=sock, state_dir=state_dir, proc=proc)




def ctl(user, *args, env=None):
    return user.run([CTL, *args], env=env)


def ref(user, *args):
    """Debian's rootlessctl, the reference."""
    r = user.run(["rootlessctl", *args])
    assert r.returncode == 0, r.stderr
    return r.stdout


def ok(r) -> str:
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout


def one_line_error(r, *needles) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("rootless-ctl: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]




def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
            return False
        except OSError:
            return True


# -- info ---------------------------------------------------------------------------------

def test_info(user, server):
    out = ok(ctl(user, "--socket", server.sock, "info"))
    assert out == ref(user, "--socket", server.sock, "info")
    lines = out.splitlines()
    assert lines[0] == "- REST API version: 1.1.1"
    assert f"- State Directory: {server.state_dir}" in lines
    with open(os.path.join(server.state_dir, "child_pid")) as f:
        assert f"- Child PID: {int(f.read())}" in lines
    assert "- Network Driver: slirp4netns" in lines
    assert "  - DNS: [10.0.2.3]" in lines and "  - IP: 10.0.2.100" in lines
    assert "- Port Driver: builtin" in lines
    assert any(line.startswith("  - Supported protocols: [tcp ") for line in lines)


def test_info_json(user, server):
    out = ok(ctl(user, "--socket", server.sock, "info", "--json"))
    assert out == ref(user, "--socket", server.sock, "info", "--json")  # byte for byte
    info = json.loads(out)
    assert list(info)[:4] == ["apiVersion", "version", "stateDir", "childPID"]
    assert info["apiVersion"] == "1.1.1" and info["stateDir"] == server.state_dir
    assert info["networkDriver"]["childIP"] == "10.0.2.100"
    assert info["portDriver"]["driver"] == "builtin"
    assert out.startswith('{\n    "apiVersion": "1.1.1",\n')


def test_socket_from_state_dir_variable(user, server):
    out = ok(ctl(user, "info", env={"ROOTLESSKIT_STATE_DIR": server.state_dir}))
    assert f"- State Directory: {server.state_dir}" in out.splitlines()


# -- ports --------------------------------------------------------------------------------

def test_ports_round_trip(user, server):
    sock = server.sock
    empty = ok(ctl(user, "--socket", sock, "list-ports"))
    assert empty == ref(user, "--socket", sock, "list-ports")
    assert empty == "ID    PROTO    PARENTIP    PARENTPORT    CHILDIP    CHILDPORT    \n"
    assert ok(ctl(user, "--socket", sock, "list-ports", "--json")) == ""

    p1, p2 = free_port(), free_port()
    specs = [f"127.0.0.1:{p1}:80/tcp", f"127.0.0.1:{p2}:10.0.2.100:8080/udp"]
    if has_ipv6_loopback():
        specs.append(f"[::1]:{free_port('::1')}:[::2]:443/tcp6")
    out = ok(ctl(user, "--socket", sock, "add-ports", *specs))
    ids = out.split()
    assert len(ids) == len(specs) and all(i.isdigit() for i in ids), out
    assert len(set(ids)) == len(ids)
    assert port_in_use("127.0.0.1", p1)  # really bound on the host

    # the same as rootlessctl's, but for the order (rootlesskit's is a Go map's)
    table = ok(ctl(user, "--socket", sock, "list-ports"))
    header, *rows = table.splitlines()
    ref_header, *ref_rows = ref(user, "--socket", sock, "list-ports").splitlines()
    assert header == ref_header and sorted(rows) == sorted(ref_rows)
    assert len(rows) == len(specs)
    lines = ok(ctl(user, "--socket", sock, "list-ports", "--json")).splitlines()
    assert sorted(lines) == sorted(ref(user, "--socket", sock, "list-ports", "--json")
                                   .splitlines())
    statuses = {str(s["id"]): s["spec"] for s in map(json.loads, lines)}
    assert statuses[ids[0]] == {"proto": "tcp", "parentIP": "127.0.0.1", "parentPort": p1,
                                "childPort": 80}
    assert statuses[ids[1]] == {"proto": "udp", "parentIP": "127.0.0.1", "parentPort": p2,
                                "childPort": 8080, "childIP": "10.0.2.100"}
    # Go's field order, as rootlessctl prints it
    assert lines[[json.loads(x)["id"] for x in lines].index(int(ids[1]))] == (
        f'{{"id":{ids[1]},"spec":{{"proto":"udp","parentIP":"127.0.0.1","parentPort":{p2},'
        f'"childPort":8080,"childIP":"10.0.2.100"}}}}')

    assert ok(ctl(user, "--socket", sock, "remove-ports", *ids)).split() == ids
    assert ok(ctl(user, "--socket", sock, "list-ports", "--json")) == ""
    assert ok(ctl(user, "--socket", sock, "list-ports")) == empty


def test_add_ports_json(user, server):
    port = free_port()
    out = ok(ctl(user, "--socket", server.sock, "add-ports", "--json",
                 f"127.0.0.1:{port}:80/tcp4"))
    status = json.loads(out)
    assert out == (f'{{"id":{status["id"]},"spec":{{"proto":"tcp4","parentIP":"127.0.0.1",'
                   f'"parentPort":{port},"childPort":80}}}}\n')


@pytest.mark.parametrize("spec, needles", [
    ("127.0.0.1:8080:80", ['missing "/PROTO"', '"127.0.0.1:8080:80"']),
    ("127.0.0.1:99999:80/tcp", ["port 99999 is out of range", '"127.0.0.1:99999:80/tcp"']),
    ("127.0.0.1:8080:80/foo", ['unknown protocol "foo"']),
    ("8080/tcp", ['missing ":" between parent and child port']),
    ("[::1]:8080:80/tcp4", ["IPv6 but tcp4 is IPv4 only"]),
    ("::1:8080:80/tcp", ["IPv6 addresses need brackets"]),
])
def test_bad_spec_adds_nothing(user, server, spec, needles):
    good = f"127.0.0.1:{free_port()}:80/tcp"
    # checked before any request: the good spec before it is not added either
    one_line_error(ctl(user, "--socket", server.sock, "add-ports", good, spec), *needles)
    assert ok(ctl(user, "--socket", server.sock, "list-ports", "--json")) == ""


def test_conflict_is_reported(user, server):
    spec = f"127.0.0.1:{free_port()}:80/tcp"
    first = ok(ctl(user, "--socket", server.sock, "add-ports", spec)).strip()
    r = ctl(user, "--socket", server.sock, "add-ports", spec)
    one_line_error(r, f"cannot add {spec}: ")
    assert r.stdout == ""
    assert [json.loads(x)["id"] for x in
            ok(ctl(user, "--socket", server.sock, "list-ports", "--json")).splitlines()] \
        == [int(first)]


def test_unknown_id(user, server):
    one_line_error(ctl(user, "--socket", server.sock, "remove-ports", "99"),
                   "cannot remove port 99: ")


def test_remove_stops_at_the_first_unknown_id(user, server):
    ident = ok(ctl(user, "--socket", server.sock, "add-ports",
                   f"127.0.0.1:{free_port()}:80/tcp")).strip()
    r = ctl(user, "--socket", server.sock, "remove-ports", ident, "99")
    one_line_error(r, "99")
    assert r.stdout == f"{ident}\n"  # what was removed is said


@pytest.mark.parametrize("ident", ["abc", "-1", "1.5", "٣"])
def test_bad_id(user, server, ident):
    one_line_error(ctl(user, "--socket", server.sock, "remove-ports", ident),
                   f"port id {ident!r} is not a number")


# -- the sync client, directly ----------------------------------------------------------

def test_client(server):
    from rootless.api.client import Client
    from rootless.api.models import Info
    from rootless.ports import PortStatus
    from rootless.errors import ApiError, ApiUnreachable
    from rootless.portspec import parse

    client = Client(server.sock)
    info = client.info()
    assert isinstance(info, Info) and info.apiVersion == "1.1.1"
    assert info.stateDir == server.state_dir and info.portDriver.driver == "builtin"
    assert client.list_ports() == []
    spec = parse(f"127.0.0.1:{free_port()}:80/tcp")
    status = client.add_port(spec)
    assert isinstance(status, PortStatus) and status.spec == spec
    assert client.list_ports() == [status]
    with pytest.raises(ApiError) as error:
        client.add_port(spec)  # a conflict
    assert not isinstance(error.value, ApiUnreachable)
    assert error.value.status >= 400 and str(error.value)
    client.remove_port(status.id)
    assert client.list_ports() == []
    with pytest.raises(ApiError) as error:
        client.remove_port(status.id)
    assert error.value.status in (400, 404) and "\n" not in str(error.value)


def test_client_unreachable(tmp_path):
    from rootless.api.client import Client
    from rootless.errors import ApiUnreachable

    missing = str(tmp_path / "api.sock")
    with pytest.raises(ApiUnreachable, match=re.escape(f"no API socket at {missing}: the "
                                                       f"instance may not be running")):
        Client(missing).info()
    # a socket file nobody listens on (an instance killed with SIGKILL leaves one)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(missing)
    stale.close()
    with pytest.raises(ApiUnreachable, match=re.escape(f"nothing listens on {missing}")):
        Client(missing).list_ports()


# -- no server ----------------------------------------------------------------------------

def test_missing_socket(user, state_dir):
    sock = os.path.join(state_dir, "api.sock")
    one_line_error(ctl(user, "--socket", sock, "info"), sock, "may not be running")
    one_line_error(ctl(user, "list-ports", env={"ROOTLESSKIT_STATE_DIR": state_dir}),
                   sock, "may not be running")


def test_killed_instance(user, server):
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)
    assert os.path.exists(server.sock)  # SIGKILL: nobody removed it
    one_line_error(ctl(user, "--socket", server.sock, "info"), server.sock,
                   "may not be running")


def test_no_socket_given(user):
    r = ctl(user, "info")  # the harness's environment has no ROOTLESSKIT_STATE_DIR
    one_line_error(r, "--socket", "$ROOTLESSKIT_STATE_DIR")


def test_not_a_socket(user, user_tmp):
    one_line_error(ctl(user, "--socket", "/etc/passwd", "info"), "/etc/passwd is not a socket")
    own = os.path.join(user_tmp, "file")
    assert user.run(["touch", own]).returncode == 0
    one_line_error(ctl(user, "--socket", own, "info"), f"{own} is not a socket")
    one_line_error(ctl(user, "--socket", user_tmp, "info"), f"{user_tmp} is not a socket")


def test_socket_of_another_user(user):
    directory = tempfile.mkdtemp(prefix="rlt-ctl-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "api.sock")
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
            s.listen()
            os.chmod(path, 0o600)  # root's own, as an api.sock is its owner's only
            one_line_error(ctl(user, "--socket", path, "info"), f"permission denied on {path}")
    finally:
        shutil.rmtree(directory)


@pytest.mark.parametrize("args, needles", [
    (["bogus"], ["invalid choice: 'bogus'"]),
    (["info", "--bad"], ["unrecognized arguments: --bad"]),
    (["add-ports"], ["SPEC"]),
    (["remove-ports"], ["ID"]),
    (["help", "nope"], ["no help topic 'nope'"]),
])
def test_bad_command_line(user, args, needles):
    r = ctl(user, *args)
    one_line_error(r, *needles)
    assert r.stdout == ""


@pytest.mark.parametrize("args", [[], ["--help"], ["help"], ["help", "add-ports"],
                                  ["add-ports", "--help"]])
def test_help(user, args):
    out = ok(ctl(user, *args))
    assert out.startswith("usage: rootless-ctl")


def test_version(user):
    assert ok(ctl(user, "--version")).startswith("rootless-ctl version ")
