"""The port-spec parser and validator (rootless.portspec): the text form of -p,
rootless-ctl add-ports, and the checks on API bodies."""
import msgspec
import pytest

from rootless import portspec
from rootless.api.models import PortSpecBody, port_spec
from rootless.ports import PortSpec
from rootless.errors import PortSpecError, RootlessError, UsageError


def spec(proto="tcp", parentIP="", parentPort=8080, childIP="", childPort=80):
    return PortSpec(proto=proto, parentIP=parentIP, parentPort=parentPort, childIP=childIP,
                    childPort=childPort)


# -- parse: what each text means -------------------------------------------------------

PARSED = [
    # rootlesskit's own examples (pkg/port/portutil tests)
    ("127.0.0.1:8080:80/tcp", spec(parentIP="127.0.0.1")),
    ("127.0.0.1:8080:10.0.2.100:80/tcp", spec(parentIP="127.0.0.1", childIP="10.0.2.100")),
    ("[::1]:8080:80/tcp", spec(parentIP="::1")),
    ("[::1]:8080:[::2]:80/udp", spec("udp", "::1", 8080, "::2", 80)),
    # every protocol
    *[(f"127.0.0.1:8080:80/{p}", spec(p, "127.0.0.1")) for p in ("tcp", "tcp4", "udp", "udp4",
                                                                  "sctp", "sctp4")],
    *[(f"[::1]:8080:80/{p}", spec(p, "::1")) for p in ("tcp", "tcp6", "udp", "udp6", "sctp",
                                                        "sctp6")],
    ("[::]:8080:[fd00::100]:80/tcp6", spec("tcp6", "::", 8080, "fd00::100", 80)),
    # parent IP left out: the wildcard of the protocol's family
    ("8080:80/tcp", spec(parentIP="0.0.0.0")),
    ("8080:80/udp4", spec("udp4", "0.0.0.0")),
    ("8080:80/tcp6", spec("tcp6", "::")),
    ("8080:80/udp6", spec("udp6", "::")),
    ("8080:80/sctp6", spec("sctp6", "::")),
    ("8080:10.0.2.100:80/tcp", spec(parentIP="0.0.0.0", childIP="10.0.2.100")),
    ("8080:[fd00::100]:80/tcp6", spec("tcp6", "::", 8080, "fd00::100", 80)),
    # an empty field: rootlesskit's scanner reads it as "not given"
    (":8080:80/tcp", spec(parentIP="")),
    ("127.0.0.1:8080::80/tcp", spec(parentIP="127.0.0.1")),
    ("[]:8080:80/tcp", spec(parentIP="")),
    # brackets around an IPv4 address are fine too
    ("[127.0.0.1]:8080:[10.0.2.100]:80/tcp", spec(parentIP="127.0.0.1", childIP="10.0.2.100")),
    # port 0 for the parent: an automatic port (our extension); the edges of the range
    ("127.0.0.1:0:80/tcp", spec(parentIP="127.0.0.1", parentPort=0)),
    ("127.0.0.1:65535:1/tcp", spec(parentIP="127.0.0.1", parentPort=65535, childPort=1)),
    ("127.0.0.1:1:65535/tcp", spec(parentIP="127.0.0.1", parentPort=1, childPort=65535)),
    ("127.0.0.1:08080:080/tcp", spec(parentIP="127.0.0.1")),  # as Go's Atoi
    # surrounding blanks (a shell variable with a newline, say)
    ("  127.0.0.1:8080:80/tcp\n", spec(parentIP="127.0.0.1")),
    # normalized addresses
    ("[0:0:0:0:0:0:0:1]:8080:80/tcp", spec(parentIP="::1")),
    ("[FD00::0100]:8080:80/tcp6", spec("tcp6", "fd00::100")),
    ("8080:[fd00:0::100]:80/tcp", spec(parentIP="0.0.0.0", childIP="fd00::100")),
    # IPv4-mapped IPv6 is IPv4, as for Go's net.ParseIP
    ("[::ffff:127.0.0.1]:8080:80/tcp4", spec("tcp4", "127.0.0.1")),
    # the child's address is not tied to the proto's family (the parent listens with
    # it; the child's end is dialled whatever its family)
    ("127.0.0.1:8080:[::1]:80/tcp4", spec("tcp4", "127.0.0.1", 8080, "::1", 80)),
]


@pytest.mark.parametrize("text, expected", PARSED, ids=[t for t, _ in PARSED])
def test_parse(text, expected):
    assert portspec.parse(text) == expected


@pytest.mark.parametrize("text, expected", PARSED, ids=[t for t, _ in PARSED])
def test_round_trip(text, expected):
    got = portspec.parse(text)
    assert portspec.parse(portspec.format(got)) == got
    assert portspec.format(portspec.parse(portspec.format(got))) == portspec.format(got)


CANONICAL = [
    "127.0.0.1:8080:80/tcp",
    "127.0.0.1:8080:10.0.2.100:80/udp",
    "[::1]:8080:80/tcp6",
    "[::]:8080:[fd00::100]:80/tcp6",
    "0.0.0.0:0:80/sctp",
    ":8080:80/tcp",
    "[::1]:1:[::2]:65535/udp",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_format_of_canonical_text_is_the_text(text):
    assert portspec.format(portspec.parse(text)) == text


def test_format_of_api_specs():
    assert portspec.format(spec()) == ":8080:80/tcp"   # parentIP "" = all addresses
    assert portspec.format(spec(parentIP="::1", childIP="10.0.2.100")) == \
        "[::1]:8080:10.0.2.100:80/tcp"


# -- parse: every error ----------------------------------------------------------------

PARSE_ERRORS = [
    ("", "empty port spec"),
    ("   ", "empty port spec"),
    ("127.0.0.1:8080:80", 'missing "/PROTO" at the end of "127.0.0.1:8080:80"'),
    ("8080:80/", 'missing protocol after "/" in "8080:80/"'),
    ("127.0.0.1:8080:80/foo", 'unknown protocol "foo" in "127.0.0.1:8080:80/foo": use tcp, '
                              "tcp4, tcp6, udp, udp4, udp6, sctp, sctp4 or sctp6"),
    ("8080:80/TCP", 'unknown protocol "TCP"'),
    ("8080:80/tcp/udp", 'child port "80/tcp" is not a number'),  # the last "/" splits
    ("8080/tcp", 'missing ":" between parent and child port in "8080/tcp"'),
    ("/tcp", 'missing ":" between parent and child port'),
    ("99999:80/tcp", 'parent port 99999 is out of range (0-65535) in "99999:80/tcp"'),
    ("127.0.0.1:65536:80/tcp", "parent port 65536 is out of range (0-65535)"),
    ("127.0.0.1:8080:0/tcp", "child port 0 is out of range (1-65535)"),
    ("127.0.0.1:8080:99999/tcp", "child port 99999 is out of range (1-65535)"),
    ("127.0.0.1:8080:" + "9" * 5000 + "/tcp", "child port number is out of range"),
    ("127.0.0.1:http:80/tcp", 'parent port "http" is not a number'),
    ("127.0.0.1:+80:80/tcp", 'parent port "+80" is not a number'),
    ("127.0.0.1:8080:-80/tcp", 'child port "-80" is not a number'),
    ("127.0.0.1:8080:٨٠/tcp", 'child port "٨٠" is not a number'),
    ("127.0.0.1:8080: 80/tcp", 'child port " 80" is not a number'),
    ("[8080]:80/tcp", 'parent port "[8080]" is not a number'),
    (":80/tcp", 'missing parent port in ":80/tcp"'),
    ("127.0.0.1::80/tcp", "missing parent port"),
    ("127.0.0.1:8080:/tcp", "missing child port"),
    ("127.0.0.1:8080:80:/tcp", "missing child port"),
    ("localhost:8080:80/tcp", 'invalid parent IP "localhost" in "localhost:8080:80/tcp"'),
    ("127.0.0.256:8080:80/tcp", 'invalid parent IP "127.0.0.256"'),
    ("127.000.000.001:8080:80/tcp", 'invalid parent IP "127.000.000.001"'),
    ("8080:abc:80/tcp", 'invalid child IP "abc"'),
    ("127.0.0.1:8080:[fe80::1%eth0]:80/tcp", 'invalid child IP "fe80::1%eth0"'),
    ("[::1]:8080:80/tcp4", "parent IP ::1 is IPv6 but tcp4 is IPv4 only"),
    ("[::]:8080:80/udp4", "parent IP :: is IPv6 but udp4 is IPv4 only"),
    ("127.0.0.1:8080:80/tcp6", "parent IP 127.0.0.1 is IPv4 but tcp6 is IPv6 only"),
    ("0.0.0.0:8080:80/sctp6", "parent IP 0.0.0.0 is IPv4 but sctp6 is IPv6 only"),
    ("::1:8080:80/tcp", 'IPv6 addresses need brackets in "::1:8080:80/tcp"'),
    ("fe80::1:80/tcp", "IPv6 addresses need brackets"),
    ("8080:fd00::100:80/tcp", "IPv6 addresses need brackets"),
    ("1:2:3:4:5/tcp", 'too many ":" in "1:2:3:4:5/tcp"'),
    ("[::1:8080:80/tcp", 'missing "]" after "[::1:8080:80"'),
    ("[::1]8080:80/tcp", 'expected ":" after "[::1]"'),
    ("127.0.0.1:8080:80/tcp\x00x", r'unknown protocol "tcp\x00x"'),
]


@pytest.mark.parametrize("text, message", PARSE_ERRORS, ids=[t[:40] for t, _ in PARSE_ERRORS])
def test_parse_error(text, message):
    with pytest.raises(PortSpecError) as info:
        portspec.parse(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 300  # a huge input is cut in the message


def test_error_classes():
    assert issubclass(PortSpecError, UsageError)
    assert issubclass(PortSpecError, RootlessError)
    with pytest.raises(UsageError):
        portspec.parse("nonsense")


def test_errors_say_how_to_fix():
    for text, hint in [("8080/tcp", "[PARENT_IP:]PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO"),
                       ("127.0.0.1:8080:80", "add /tcp or /udp"),
                       ("[::1]:8080:80/tcp4", "use tcp or tcp6"),
                       ("::1:8080:80/tcp", '"[::1]:8080:80/tcp"')]:
        with pytest.raises(PortSpecError, match=hint.replace("[", r"\[").replace("]", r"\]")):
            portspec.parse(text)


# -- validate: specs from the API ---------------------------------------------------------

def test_validate_keeps_empty_ips():
    # rootlesskit: an empty parent IP means all host addresses, an empty child IP the
    # driver's default; the drivers decide, so they stay empty.
    assert portspec.validate(spec()) == spec()


def test_validate_normalizes_addresses():
    got = portspec.validate(spec(parentIP="0:0::1", childIP="::FFFF:10.0.2.100"))
    assert got == spec(parentIP="::1", childIP="10.0.2.100")
    assert portspec.validate(got) == got


def test_validate_accepts_what_parse_makes():
    for text, expected in PARSED:
        assert portspec.validate(portspec.parse(text)) == expected


def test_validate_from_json_body():
    body = b'{"proto":"tcp","parentIP":"127.0.0.1","parentPort":8080,"childPort":80}'
    got = portspec.validate(port_spec(msgspec.json.decode(body, type=PortSpecBody)))
    assert got == spec(parentIP="127.0.0.1")


VALIDATE_ERRORS = [
    (spec(proto=""), 'missing protocol in ":8080:80/"'),
    (spec(proto="icmp"), 'unknown protocol "icmp" in ":8080:80/icmp"'),
    (spec(parentPort=-1), "parent port -1 is out of range (0-65535)"),
    (spec(parentPort=65536), "parent port 65536 is out of range (0-65535)"),
    (spec(childPort=0), "child port 0 is out of range (1-65535)"),
    (spec(childPort=70000), "child port 70000 is out of range (1-65535)"),
    (spec(parentPort=True), "parent port True is not a number"),
    (spec(childPort="80"), "child port '80' is not a number"),
    (spec(parentIP="example.com"), 'invalid parent IP "example.com"'),
    (spec(parentIP="[::1]"), 'invalid parent IP "[::1]"'),
    (spec(childIP="10.0.2"), 'invalid child IP "10.0.2"'),
    (spec(childIP="10.0.2.100\n"), r'invalid child IP "10.0.2.100\n"'),
    (spec("tcp4", parentIP="::1"), "parent IP ::1 is IPv6 but tcp4 is IPv4 only"),
    (spec("udp6", parentIP="10.0.0.1"), "parent IP 10.0.0.1 is IPv4 but udp6 is IPv6 only"),
]


@pytest.mark.parametrize("bad, message", VALIDATE_ERRORS, ids=[m[:40] for _, m in VALIDATE_ERRORS])
def test_validate_error(bad, message):
    with pytest.raises(PortSpecError) as info:
        portspec.validate(bad)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_validate_quotes_the_given_text():
    with pytest.raises(PortSpecError, match='in "-p 1:2:3"'):
        portspec.validate(spec(childPort=0), text="-p 1:2:3")


def test_parse_reports_the_text_as_written():
    # not the normalized form: the user must recognize what they typed
    with pytest.raises(PortSpecError, match=r'in "8080:0/tcp"'):
        portspec.parse("8080:0/tcp")
