"""Properties of the REST API through a real instance: rootless-run
--net=slirp4netns --port-driver=builtin as the test user (in a network namespace of
the test's own: POSTs that succeed bind there), started once for the module, and
requests in raw bytes on its api.sock, so that h11 and the server are in the loop.

Any method, target, headers and body get one well-formed HTTP answer, 4xx for bad
input, never 5xx; a request that is not a valid DELETE of an existing id removes no
port (GET /v1/ports before and after). And on a sample, the real POST and the real
`rootless-ctl add-ports` answer what the in-process properties of
tests/test_properties_portspec.py say."""
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from urllib.parse import unquote_to_bytes

import msgspec
import pytest
from hypothesis import example, given, strategies as st

from conftest import RUN, VENV_BIN, answers, examples, sample
from hostile import any_text, pieces
from rootless.api.models import PortSpecBody
from test_properties_portspec import (BIND_FAILURES, api_answer, argv_specs, bodies, body_of,
                                      ctl_specs, outcome, stderr_line)

CTL = os.path.join(VENV_BIN, "rootless-ctl")
BASELINE = 2  # ports that exist before each example, for DELETEs to aim at


# -- the instance, for the whole module ------------------------------------------------

@pytest.fixture(autouse=True)
def nothing_left_behind():
    """conftest's fixture kills the test user's processes around each test: here the
    instance lives for the module, and its fixture checks, at the end, that nothing
    is left."""
    yield


class Instance:
    def __init__(self, user):
        self.user = user
        slot = os.environ.get("RLT_SLOT", "0")
        self.netns = f"rlt-a{slot}-{uuid.uuid4().hex[:6]}"
        self.state_dir = os.path.join(user.runtime_dir, "fuzz-" + uuid.uuid4().hex[:8])
        self.sock = os.path.join(self.state_dir, "api.sock")
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
        self.proc = user.popen([RUN, "--net=slirp4netns", "--port-driver=builtin",
                                f"--state-dir={self.state_dir}", "--", "sleep", "infinity"],
                               outer=("nsenter", f"--net=/run/netns/{self.netns}"),
                               stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not answers(self.sock):
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "api.sock did not answer"
            time.sleep(0.05)

    def close(self) -> list:
        """Stop it; the test user's processes left (there must be none)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        finally:
            # As conftest's fixture waits: the helper rootless-run SIGKILLs without
            # waiting (slirp4netns) may take a moment to finish dying.
            deadline = time.monotonic() + 3
            while (left := self.user.processes()) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid, _, _ in left:
                os.kill(pid, signal.SIGKILL)
            self.proc.stderr.close()
            subprocess.run(["rm", "-rf", self.state_dir], check=False)
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
        return left

    # -- a clean client, for the bookkeeping around each example --

    def call(self, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
        raw = exchange(self.sock, request(method.encode(), target.encode(), body))
        [(status, payload)] = parse_answers(raw, [method.encode()])
        return status, payload

    def ports(self) -> dict[int, dict]:
        status, payload = self.call("GET", "/v1/ports")
        assert status == 200, payload
        return {p["id"]: p for p in json.loads(payload) or []}

    def settle(self) -> dict[int, dict]:
        """Back to BASELINE ports on free ports of 127.0.0.1 (those an example added
        removed, those it removed added again); the ports."""
        ports = self.ports()
        for ident in sorted(ports)[BASELINE:]:
            assert self.call("DELETE", f"/v1/ports/{ident}")[0] == 200
        for _ in range(BASELINE - len(ports)):
            body = json.dumps({"proto": "tcp", "parentIP": "127.0.0.1", "childPort": 80})
            assert self.call("POST", "/v1/ports", body.encode())[0] == 201
        ports = self.ports()
        assert len(ports) == BASELINE, ports
        return ports


@pytest.fixture(scope="module")
def instance():
    from conftest import TEST_USER, User

    user = User(TEST_USER)
    for pid, _, _ in user.processes():  # as conftest's fixture does before a test
        os.kill(pid, signal.SIGKILL)
    running = Instance(user)
    try:
        yield running
        assert running.proc.poll() is None, "the instance ended during the tests"
    finally:
        left = running.close()
    assert not left, f"processes left running: {left}"


# -- raw HTTP ------------------------------------------------------------------------------

def exchange(sock: str, data: bytes, timeout: float = 10) -> bytes:
    """`data` on a new connection, then EOF our way; all that comes back until the
    server closes. A hang (no close within `timeout`) fails."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered early and closed: the answer is there to read
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break  # closed with our bytes unread, after its answer
            except TimeoutError:
                raise AssertionError(f"no end of the answer within {timeout} s: "
                                     f"{received[:200]!r}") from None
            if not chunk:
                return received
            received += chunk
        return received


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*")


def parse_answers(data: bytes, methods: list[bytes]) -> list[tuple[int, bytes]]:
    """The final answers in `data`, one to each request (of `methods`), each perhaps
    after interim 100s, each well-formed (status line, headers, a Content-Length and
    that many bytes of body; none to HEAD), and nothing after the last."""
    out = []
    for method in methods:
        status, body, data = _answer(data, method)
        out.append((status, body))
    assert data == b"", f"bytes after the answers: {data[:200]!r}"
    return out


def _answer(data: bytes, method: bytes) -> tuple[int, bytes, bytes]:
    while True:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"no whole answer: {head[:200]!r}"
        status_line, *lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(status_line)
        assert match, status_line
        headers = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            assert colon and name and name.strip() == name, line
            headers[name.lower()] = value.strip()
        status = int(match[1])
        if status == 100:
            continue
        length = int(headers[b"content-length"])
        body = b"" if method == b"HEAD" else data[:length]
        assert len(body) == (0 if method == b"HEAD" else length), (status_line, body)
        return status, body, data[len(body):]


# -- generated requests ------------------------------------------------------------------

_ascii = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=12)
methods = st.one_of(st.sampled_from(["GET", "POST", "DELETE", "HEAD", "PUT", "PATCH",
                                     "OPTIONS", "CONNECT", "TRACE", "get", "Delete", "BREW"]),
                    _ascii, pieces()).map(lambda m: m.encode("utf-8", "surrogatepass"))

_ID = "{id}"  # an existing port's id, put in when the request is sent
_GONE = "{gone}"  # an id no port has
_tails = st.sampled_from(["", "", "", "?", "?id=1", "#x", "/", "/x", "%2F1", "%00", ";x"])
_paths = st.one_of(
    st.sampled_from(["/v1/info", "/v1/ports", f"/v1/ports/{_ID}", f"/v1/ports/{_GONE}",
                     f"/v1/ports/%3{_ID}", "/v1/%69nfo", f"//v1/ports/{_ID}",
                     f"/v1/ports//{_ID}", f"/v1/ports/{_ID}/{_ID}", f"/v1/ports/0{_ID}",
                     f"/v1/ports/+{_ID}", f"/v1/ports/{_ID}%20", "/v1/ports/",
                     f"http://x/v1/ports/{_ID}", f"HTTP://x:1/v1/ports/{_ID}",
                     "*", "x", "/", "/v1", "/v2/info", "/v1/ports/" + "9" * 30]),
    st.builds("/v1/ports/{}".format, pieces()),
    any_text(max_size=30))
targets = st.builds("{}{}".format, _paths, _tails).map(
    lambda t: t.encode("utf-8", "surrogatepass"))

_header_sets = st.sampled_from(["plain", "plain", "plain", "no host", "chunked",
                                "two lengths", "bad length", "expect", "garbage",
                                "obs-fold", "http/1.0", "huge"])


def request(method: bytes, target: bytes, body: bytes, headers: str = "plain") -> bytes:
    """A request; `headers` makes it well-formed ("plain") or one of the ways clients
    get HTTP wrong."""
    version = b"HTTP/1.0" if headers == "http/1.0" else b"HTTP/1.1"
    lines = [method + b" " + target + b" " + version]
    if headers != "no host":
        lines.append(b"Host: x")
    if headers == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        length = {"two lengths": b"1\r\nContent-Length: 2", "bad length": b"-1"}.get(
            headers, b"%d" % len(body))
        lines.append(b"Content-Length: " + length)
    lines += {"expect": [b"Expect: 100-continue"], "garbage": [b"\x00\xff: x", b"no colon"],
              "obs-fold": [b"X: a", b" folded"], "huge": [b"X: " + b"a" * 70000]}.get(
        headers, [])
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def path_of(target: bytes) -> bytes:
    """The path a target names, read here apart from the router: origin or absolute
    form, the query left out, percent-decoded."""
    path = target.partition(b"?")[0]
    absolute = re.fullmatch(rb"(?i:https?)://[^/]*(/.*)?", path)
    if absolute:
        path = absolute[1] or b"/"
    return unquote_to_bytes(path)


def deleted_id(method: bytes, target: bytes) -> int | None:
    """The id `method` `target` asks to remove: a DELETE of /v1/ports/DIGITS."""
    found = re.fullmatch(rb"/v1/ports/([0-9]{1,19})", path_of(target))
    return int(found[1]) if method == b"DELETE" and found else None


def valid(method: bytes, target: bytes) -> bool:
    """Whether the request is one the API serves (else its answer is a 4xx)."""
    return ((method, path_of(target)) in ((b"GET", b"/v1/info"), (b"GET", b"/v1/ports"),
                                          (b"POST", b"/v1/ports"))
            or deleted_id(method, target) is not None)


# -- properties ----------------------------------------------------------------------------

_FIRST = request(b"GET", b"/v1/info", b"")  # a request before, on the same connection


@examples(150)
@given(methods, targets, _header_sets, bodies, st.booleans())
@example(b"DELETE", f"/v1/ports/{_ID}".encode(), "plain", b"", False)
@example(b"POST", b"/v1/ports", "plain", b'{"proto":"tcp","parentIP":"127.0.0.1","childPort":1}',
         True)
@example(b"HEAD", b"/v1/info", "plain", b"", True)
@example(b"HEAD", b"/v1/info", "no host", b"", False)
@example(b"HEAD", b"/v1/info", "no host", b"", True)
def test_any_request_gets_one_answer_and_removes_nothing_it_should_not(
        instance, method, target, headers, body, pipelined):
    """`pipelined`: after a GET on the same connection, sent at once."""
    before = instance.settle()
    ident, gone = min(before), max(before) + 1000
    target = target.replace(_ID.encode(), b"%d" % ident).replace(_GONE.encode(), b"%d" % gone)
    sent = request(method, target, body, headers)
    if pipelined:
        got = parse_answers(exchange(instance.sock, _FIRST + sent), [b"GET", method])
        assert got[0][0] == 200
        status, payload = got[1]
    else:
        [(status, payload)] = parse_answers(exchange(instance.sock, sent), [method])
    assert 200 <= status < 500, (status, payload)
    assert status >= 400 or valid(method, target), (sent[:200], status)
    if status >= 400 and method != b"HEAD":
        assert json.loads(payload)["message"].isprintable()
    after = instance.ports()
    removed = set(before) - set(after)
    added = set(after) - set(before)
    if removed:
        assert status == 200 and removed == {deleted_id(method, target)}, (sent[:200], removed)
    if status == 201:
        [new] = added
        assert json.loads(payload) == after[new]
    else:
        assert not added, (sent[:200], added)


# -- the in-process properties stand for the real API and rootless-ctl (a sample) ---------

BIND_STATUSES = (400, 409)


@sample(15, 300)
@given(st.one_of(bodies, argv_specs.map(lambda t: outcome(ctl_specs, t)).filter(
    lambda o: o[0]).map(lambda o: body_of(o[1][0]))))
def test_real_post_answers_as_the_in_process_api(instance, body):
    """POST /v1/ports to the real instance: what the router and the driver's checks
    answer in process (tests/test_properties_portspec.py), or, for a spec they
    accept, a bind failure of this host; a spec as published."""
    instance.settle()
    expected_status, expected = api_answer(body)
    status, payload = instance.call("POST", "/v1/ports", body)
    if expected_status != 201:
        assert (status, payload) == (expected_status, expected)
    elif status != 201:
        message = json.loads(payload)["message"]
        assert status in BIND_STATUSES and any(why in message for why in BIND_FAILURES), \
            (status, payload)
    else:
        spec = msgspec.json.decode(payload, type=dict)["spec"]
        wanted = msgspec.to_builtins(msgspec.json.decode(expected, type=dict)["spec"])
        if wanted.get("parentPort", 0) == 0:  # an automatic port: the one chosen
            wanted["parentPort"] = spec["parentPort"]
        assert msgspec.convert(spec, PortSpecBody) == msgspec.convert(wanted, PortSpecBody)


@sample(10, 200)
@given(argv_specs)
@example("0.0.0.0:80:80/tcp\n")
def test_real_rootless_ctl_add_ports_says_what_the_property_says(instance, text):
    instance.settle()
    r = subprocess.run(instance.user.argv([CTL, "--socket", instance.sock, "add-ports",
                                           text]),
                       env=instance.user.env(), cwd="/tmp", capture_output=True, timeout=60)
    ok, expected = outcome(ctl_specs, text)
    if not ok:
        if expected == "no spec: the help was printed":
            assert r.returncode == 0 and r.stdout.startswith(b"usage:")
        else:
            assert r.returncode == 1 and stderr_line(r.stderr, "rootless-ctl") == expected
        return
    status, answer = api_answer(body_of(expected[0]))
    if status != 201:  # the API refuses it, as it says
        message = json.loads(answer)["message"]
        assert r.returncode == 1 and stderr_line(r.stderr, "rootless-ctl") == \
            f"cannot add {text.strip()}: {message}"
    elif r.returncode != 0:
        line = stderr_line(r.stderr, "rootless-ctl")
        assert r.returncode == 1 and line.startswith(f"cannot add {text.strip()}: "), line
        assert any(why in line for why in BIND_FAILURES), line
    else:
        assert r.stderr == b"" and int(r.stdout) in instance.ports()
