"""Properties of port specs (rootless.portspec) as each entry point reaches them:
`rootless-run -p` (flags, then the port driver's preflight), the API's POST /v1/ports
body (the router, then the driver's bookkeeping) and `rootless-ctl add-ports` (its
argparse, then the spec it sends as the API body).

In process, through the exact functions each entry point calls: a spec or the one-line
PortSpecError (the API: a 4xx with a one-line message), never another exception; a
spec printed and parsed again is the same spec; the three agree on every input. On a
sample, the real `rootless-run -p SPEC -- true` (as the test user, in a network
namespace of the test's own: accepted specs are bound) says exactly what the
in-process property predicts. tests/test_properties_api.py does the same for POSTs
to a real instance and the real rootless-ctl."""
import json
import os
import subprocess

import msgspec
import pytest
from hypothesis import example, given, strategies as st

from conftest import RUN, examples, sample
from hostile import any_text, argv_able, joined, mangled, pieces
from rootless import cli, ctl, portspec
from rootless.api.models import ErrorBody, PortSpecBody, encode_hook, port_spec
from rootless.api.router import Router
from rootless.drivers.port.builtin import BuiltinPortDriver
from rootless.drivers.port.implicit import initial_specs as pasta_specs
from rootless.drivers.port.slirp4netns import Slirp4netnsPortDriver
from rootless.errors import PortSpecError, UsageError
from rootless.ports import PortSpec

# -- strategies -------------------------------------------------------------------------

IPS = ["127.0.0.1", "0.0.0.0", "10.0.2.100", "::1", "::", "fd00::100", "::ffff:127.0.0.1",
       "fe80::1%lo", "1.2.3", "256.0.0.1", "01.2.3.4", "localhost", ""]
PORTS = ["0", "1", "80", "1023", "1024", "8080", "32768", "65535", "65536", "99999"]
PROTOS = list(portspec.PROTOS) + ["TCP", "Udp6", "tcp ", "icmp", "tcp7", "6"]

_ip = st.sampled_from(IPS) | pieces()
_ip_field = st.one_of(st.just(""), _ip.map(lambda ip: ip + ":"),
                      _ip.map(lambda ip: f"[{ip}]:"))
_port = st.sampled_from(PORTS) | pieces()
_proto = st.sampled_from(PROTOS) | pieces()
# Most of these reach deep into the parser; the rest is anything at all.
_shaped = st.builds("{}{}:{}{}/{}".format, _ip_field, _port, _ip_field, _port, _proto)
# Blanks around a spec: parse ignores them, so they travel with an accepted spec.
_blanks = st.sampled_from(["", " ", "\t", "\n", "\r\n", "\x0b", "\x1c", "\u2028", "\u3000"])
_padded = st.builds("{}{}{}".format, _blanks, _shaped, _blanks)
spec_texts = st.one_of(_shaped, _padded, mangled(_shaped),
                       joined(pieces(":", "/", "[", "]", "tcp", "udp6", "127.0.0.1", "::1")),
                       any_text())


# The specs a real process gets: mostly publishable ones (on 127.0.0.1 and free high
# ports, so that some runs bind), with the blanks and odd bytes a shell passes on.
_free_ish = st.builds("127.0.0.1:{}:{}/{}".format, st.integers(20000, 60000),
                      st.integers(1, 65535), st.sampled_from(["tcp", "udp", "tcp4", "udp4"]))
argv_specs = st.one_of(_free_ish, mangled(_free_ish), spec_texts).filter(argv_able)

_value = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                   st.floats(), any_text(surrogates=False, max_size=20), st.sampled_from(
                       IPS + PROTOS + PORTS), st.lists(st.integers(), max_size=2))
_key = st.sampled_from(["proto", "parentIP", "parentPort", "childIP", "childPort", "id", ""])
_shaped_body = st.fixed_dictionaries(
    {"proto": st.sampled_from(PROTOS), "childPort": st.integers(-1, 70000)},
    optional={"parentIP": st.sampled_from(IPS), "parentPort": st.integers(-1, 70000),
              "childIP": st.sampled_from(IPS)}).map(lambda d: json.dumps(d).encode())
bodies = st.one_of(
    _shaped_body,
    st.dictionaries(_key, _value, max_size=6).map(lambda d: json.dumps(d).encode()),
    mangled(_shaped_body.map(bytes.decode)).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"null", b"[]", b'"tcp"', b'{"proto":"tcp","childPort":1}' * 2,
                     b'{"proto":"\\ud800","childPort":1}', b'{"proto":"tcp","childPort":1e400}',
                     b'{"proto":"tcp","childPort":' + b"9" * 5000 + b"}", b"\xff\xfe"]),
    st.binary(max_size=100))


# -- what each entry point does with a spec, in process -----------------------------------

def one_line(message: str) -> bool:
    """A message fit for one line of stderr: nothing that breaks or hides it."""
    return bool(message) and message.isprintable()


def cli_spec(text: str, driver: str = "builtin") -> PortSpec:
    """`rootless-run -p TEXT`: the flags, then the port driver's preflight (which
    parses the -p specs); the spec, or the UsageError the run would print."""
    net = {"builtin": "none", "slirp4netns": "slirp4netns", "implicit": "pasta"}[driver]
    config = cli.build_config("rootless-run", [f"--net={net}", f"--port-driver={driver}",
                                               "-p", text, "--", "true"])
    if driver == "implicit":
        return pasta_specs(config)[0]
    ports = {"builtin": BuiltinPortDriver, "slirp4netns": Slirp4netnsPortDriver}[driver](config)
    ports.preflight()
    return ports.initial[0] if driver == "builtin" else ports.initial[0][1]


def ctl_specs(text: str) -> list[PortSpec]:
    """`rootless-ctl add-ports TEXT`: its argparse, then what _run parses (and sends,
    encoded as Client.add_port encodes it). UsageError if it sends nothing."""
    parser, _ = ctl._parser()
    try:
        args = parser.parse_args(["add-ports", text])
    except SystemExit:  # "-h": the help, and no port
        raise UsageError("no spec: the help was printed") from None
    return [portspec.parse(t) for t in args.specs]


class _Bookkeeping(BuiltinPortDriver):
    """The builtin driver as the API reaches it (its checks and bookkeeping), but
    for the bind and the engine: a real instance binds (tests/test_properties_api.py
    shows the answers are the same, or a bind failure)."""

    def _publish_initial(self):
        pass

    def _publish(self, spec):
        return spec, lambda: None


_CONFIG = cli.build_config("rootless-run", ["--net=none", "--", "true"])


def api_answer(body: bytes) -> tuple[int, bytes]:
    """POST /v1/ports with `body` to a fresh instance: (HTTP status, body)."""
    router = Router(info=None, ports=_Bookkeeping(_CONFIG))
    return router.handle("POST", "/v1/ports", body)


def body_of(spec: PortSpec) -> bytes:
    """`spec` as the JSON body rootless-ctl sends for it."""
    return msgspec.json.encode(spec, enc_hook=encode_hook)


def api_spec(body: bytes) -> PortSpec | str:
    """The spec the API publishes for `body`, or its error message (a 4xx)."""
    status, answer = api_answer(body)
    assert status < 500, (status, answer)
    if status == 201:
        return port_spec(msgspec.convert(msgspec.json.decode(answer)["spec"], PortSpecBody))
    assert 400 <= status < 500, (status, answer)
    message = msgspec.json.decode(answer, type=ErrorBody).message
    assert one_line(message), message
    return message


def outcome(function, *args):
    """(True, value) or (False, the one-line message of the UsageError)."""
    try:
        return True, function(*args)
    except UsageError as exc:
        assert one_line(str(exc)), str(exc)
        return False, str(exc)


# -- properties ---------------------------------------------------------------------------

@examples(500)
@given(spec_texts)
@example("127.0.0.1:8080:80/tcp")
def test_parse_gives_a_spec_or_one_line(text):
    """A spec, valid and normalized (validate leaves it as it is), or PortSpecError."""
    ok, spec = outcome(portspec.parse, text)
    if ok:
        assert portspec.validate(spec) == spec


@examples(500)
@given(spec_texts)
def test_printed_and_parsed_again_is_the_same_spec(text):
    try:
        spec = portspec.parse(text)
    except PortSpecError:
        return
    printed = portspec.format(spec)
    assert portspec.parse(printed) == spec
    assert portspec.format(portspec.parse(printed)) == printed


@examples(300)
@given(spec_texts)
@example("0.0.0.0:80:80/sctp\n")
def test_cli_ctl_and_api_agree_on_text(text):
    """-p TEXT and `rootless-ctl add-ports TEXT` accept the same texts, as the same
    spec; the API publishes exactly that spec from the body ctl sends."""
    cli_ok, cli_result = outcome(cli_spec, text)
    ctl_ok, ctl_result = outcome(ctl_specs, text)
    if ctl_ok:
        [ctl_result] = ctl_result
        published = api_spec(body_of(ctl_result))
        if ctl_result.proto.startswith("sctp"):  # the builtin driver has no SCTP
            assert isinstance(published, str) and "sctp" in published
            assert not cli_ok and "sctp" in cli_result
            return
        assert published == ctl_result
    assert cli_ok == ctl_ok, (cli_result, ctl_result)
    if cli_ok:
        assert cli_result == ctl_result


@examples(300)
@given(bodies)
def test_api_body_gives_a_spec_or_4xx_and_the_text_of_that_spec_is_accepted(body):
    """Any body: 201 with a spec, or a 4xx with a one-line message, never 5xx; the
    spec published is one that -p and rootless-ctl accept, as the same spec."""
    published = api_spec(body)
    if isinstance(published, PortSpec):
        text = portspec.format(published)
        assert cli_spec(text) == published
        assert ctl_specs(text) == [published]


@examples(200)
@given(spec_texts, st.sampled_from(["builtin", "slirp4netns", "implicit"]))
@example("\t1:1/sctp\n", "builtin")
@example("127.0.0.1:8080:[::1]:80/tcp\n", "slirp4netns")
@example("127.0.0.1:0:80/tcp\n", "implicit")
def test_each_port_driver_takes_p_or_says_why_in_one_line(text, driver):
    """The -p specs as each driver's preflight checks them (what it cannot do):
    a spec, or one line."""
    outcome(cli_spec, text, driver)


# -- the real rootless-run, on a sample ----------------------------------------------------

@pytest.fixture(scope="module")
def netns():
    """A network namespace with only its loopback: what accepted specs bind."""
    import uuid

    name = f"rlt-p{os.environ.get('RLT_SLOT', '0')}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


BIND_FAILURES = ("is in use on the host", "is not an address of this host",
                 "is privileged on this host", "cannot listen on", "is already published")


def stderr_line(stderr: bytes, program: str = "rootless-run") -> str:
    """The one error line of a failed run (fails on anything else)."""
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1, text
    prefix = f"{program}: error: "
    assert text.startswith(prefix), text
    return text[len(prefix):-1]


@sample(15, 300)
@given(argv_specs)
@example("0.0.0.0:80:80/tcp\n")
@example("127.0.0.1:40001:80/tcp")
def test_real_rootless_run_p_says_what_the_property_says(user, netns, user_tmp, text):
    """The real `rootless-run -p TEXT -- true`, as the test user: the in-process
    UsageError line exactly, or (a spec) the command runs, or one line saying why the
    port cannot be bound."""
    r = subprocess.run(user.argv([RUN, "--net=none", "--port-driver=builtin", "-p", text,
                                  "--", "true"], outer=("nsenter", f"--net=/run/netns/{netns}")),
                       env=user.env({"TMPDIR": user_tmp}), cwd=user_tmp, capture_output=True,
                       timeout=60)
    ok, expected = outcome(cli_spec, text)
    assert r.stdout == b""
    if not ok:
        assert r.returncode == 1 and stderr_line(r.stderr) == expected, r.stderr
    elif r.returncode != 0:
        line = stderr_line(r.stderr)
        assert r.returncode == 1 and line.startswith(f"-p {text.strip()}: "), line
        assert any(why in line for why in BIND_FAILURES), line
    else:
        assert r.stderr == b""
