"""Port specs: the one parser and validator for -p, API bodies and rootless-ctl.

Text form, as rootlesskit's `ParsePortSpec`:

    [PARENT_IP:]PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO

IPv6 addresses go in brackets (`[::1]:8080:[fd00::100]:80/tcp6`). Where we differ from
rootlesskit 1.1 (which requires the parent IP and rejects parent port 0):

- the parent IP may be left out: it is then the wildcard of the protocol's family,
  0.0.0.0, or :: for tcp6/udp6/sctp6 (0.0.0.0 could not be bound there);
- parent port 0 asks the driver for an automatic port.

An empty parent IP (API body without `parentIP`, or text `:8080:80/tcp`, which
rootlesskit's scanner also accepts) means "all host addresses", as in rootlesskit;
an empty child IP means the driver's default. Both stay empty: the drivers decide.
"""
import _socket

from ._log import printable
from .ports import PortSpec
from .errors import PortSpecError

PROTOS = ("tcp", "tcp4", "tcp6", "udp", "udp4", "udp6", "sctp", "sctp4", "sctp6")
_PROTO_HINT = "use " + ", ".join(PROTOS[:-1]) + " or " + PROTOS[-1]
SYNTAX = "[PARENT_IP:]PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO"
_EXAMPLE = '"127.0.0.1:8080:80/tcp"'


def _digits(text: str) -> bool:
    """ASCII digits only: int() would take "+80", " 80", "٨٠". (Not re: re and the
    enum it loads are 1 MiB of every run that has a -p.)"""
    return text.isascii() and text.isdigit()



def parse(text: str) -> PortSpec:
    """The spec `text` describes, validated and normalized; PortSpecError if it has none."""
    where = f"in {_quote(text)}"
    body = text.strip()
    if not body:
        raise PortSpecError(f"empty port spec: use {SYNTAX}, e.g. {_EXAMPLE}")
    addresses, slash, proto = body.rpartition("/")
    if not slash:
        # rootlesskit has no default protocol either ("missing proto").
        raise PortSpecError(f'missing "/PROTO" at the end of {_quote(text)}: add /tcp or '
                            f"/udp, e.g. {_EXAMPLE}")
    if not proto:
        raise PortSpecError(f'missing protocol after "/" {where}: {_PROTO_HINT}')
    fields = _split(addresses, where)
    try:
        spec = _assign(fields, proto, where)
    except PortSpecError:
        # "::1:8080:80/tcp" and the like: the colons of an unbracketed IPv6 address.
        if _has_bare_ipv6(fields):
            raise PortSpecError(f"IPv6 addresses need brackets {where}: e.g. "
                                f'"[::1]:8080:80/tcp" or "[::]:8080:[fd00::100]:80/tcp6"'
                                ) from None
        raise
    return validate(spec, text=text)


def validate(spec: PortSpec, *, text: str | None = None) -> PortSpec:
    """Check a spec from any source; returns it with its IPs in canonical form.

    `text`: what the user wrote, quoted in errors (default: the spec's text form)."""
    where = f"in {_quote(text if text is not None else format(spec))}"
    if not isinstance(spec.proto, str) or spec.proto not in PROTOS:
        if spec.proto == "":
            raise PortSpecError(f"missing protocol {where}: {_PROTO_HINT}")
        raise PortSpecError(f"unknown protocol {_quote(str(spec.proto))} {where}: {_PROTO_HINT}")
    _check_range(spec.parentPort, "parent", 0, where)   # 0: an automatic port (ours)
    _check_range(spec.childPort, "child", 1, where)
    parent_ip = _ip(spec.parentIP, "parent", where)
    child_ip = _ip(spec.childIP, "child", where)
    # Only the parent IP must match the proto's family: the parent listens with the
    # proto as given, while the child's end is dialled whatever its family
    # (rootlesskit drops the 4/6 suffix there).
    if parent_ip is not None:
        family = spec.proto[-1]
        ip, version = parent_ip
        if family in "46" and str(version) != family:
            other = "6" if family == "4" else "4"
            base = spec.proto[:-1]
            raise PortSpecError(
                f"parent IP {ip} is IPv{version} but {spec.proto} is "
                f"IPv{family} only {where}: use {base} or {base}{other}, or an IPv{family} "
                f"address")
    return spec.replace(
        parentIP="" if parent_ip is None else parent_ip[0],
        childIP="" if child_ip is None else child_ip[0],
    )


def written(text: str) -> str:
    """A text `parse` accepted, as messages name it: without the blanks around it
    (parse ignores them), the only characters of such a text that may not print."""
    return text.strip()


def format(spec: PortSpec) -> str:  # noqa: A001 - the module's own vocabulary
    """The text form of `spec`; `parse(format(s)) == s` for any valid normalized spec."""
    return (f"{_ip_text(spec.parentIP, parent=True)}{spec.parentPort}:"
            f"{_ip_text(spec.childIP, parent=False)}{spec.childPort}/{spec.proto}")


# -- helpers ----------------------------------------------------------------------

def _assign(fields: list[tuple[str, bool]], proto: str, where: str) -> PortSpec:
    """The spec from the ":"-separated fields (before validation)."""
    none = ("", False)
    if len(fields) == 1:
        raise PortSpecError(f'missing ":" between parent and child port {where}: '
                            f"use {SYNTAX}, e.g. {_EXAMPLE}")
    if len(fields) > 4:
        raise PortSpecError(f'too many ":" {where}: use {SYNTAX}')
    if len(fields) == 2:
        parent_ip, parent_port, child_ip, child_port = None, fields[0], none, fields[1]
    elif len(fields) == 3:
        # PARENT_IP:PARENT_PORT:CHILD_PORT or PARENT_PORT:CHILD_IP:CHILD_PORT: a bare
        # number first is a port (no IP address is written as a bare number).
        first, bracketed = fields[0]
        if not bracketed and _digits(first):
            parent_ip, (parent_port, child_ip, child_port) = None, fields
        else:
            parent_ip, parent_port, child_ip, child_port = fields[0], fields[1], none, fields[2]
    else:
        parent_ip, parent_port, child_ip, child_port = fields
    if parent_ip is None:
        parent_ip_text = "::" if proto.endswith("6") else "0.0.0.0"
    else:
        parent_ip_text = parent_ip[0]
    return PortSpec(
        proto=proto,
        parentIP=parent_ip_text,
        parentPort=_port(parent_port, "parent", where),
        childIP=child_ip[0],
        childPort=_port(child_port, "child", where),
    )


def _split(addresses: str, where: str) -> list[tuple[str, bool]]:
    """`a:[b]:c` -> [("a", False), ("b", True), ("c", False)]: ":"-separated fields,
    a bracketed one holding an IPv6 address (its colons are not separators)."""
    fields: list[tuple[str, bool]] = []
    i = 0
    while True:
        if addresses.startswith("[", i):
            end = addresses.find("]", i)
            if end < 0:
                raise PortSpecError(f'missing "]" after {_quote(addresses[i:])} {where}: '
                                    f'write IPv6 addresses as "[::1]"')
            fields.append((addresses[i + 1:end], True))
            i = end + 1
            if i < len(addresses) and addresses[i] != ":":
                raise PortSpecError(f'expected ":" after {_quote(addresses[:i])} {where}: '
                                    f"use {SYNTAX}")
        else:
            end = addresses.find(":", i)
            end = len(addresses) if end < 0 else end
            fields.append((addresses[i:end], False))
            i = end
        if i >= len(addresses):
            return fields
        i += 1  # the ":"
        if i == len(addresses):
            fields.append(("", False))
            return fields


def _has_bare_ipv6(fields: list[tuple[str, bool]]) -> bool:
    """Whether consecutive unbracketed fields, joined again, make an IPv6 address."""
    if len(fields) > 12:
        return False  # not worth guessing
    for i in range(len(fields)):
        for j in range(i + 1, len(fields) + 1):
            if fields[j - 1][1]:
                break
            if j == i + 1:
                continue  # one field has no ":" to be misread
            import ipaddress

            try:
                ipaddress.IPv6Address(":".join(value for value, _ in fields[i:j]))
                return True
            except ValueError:
                pass
    return False


def _port(field: tuple[str, bool], which: str, where: str) -> int:
    value, bracketed = field
    if not value and not bracketed:
        raise PortSpecError(f"missing {which} port {where}: use {SYNTAX}, e.g. {_EXAMPLE}")
    if bracketed or not _digits(value):
        shown = f"[{value}]" if bracketed else value
        raise PortSpecError(f"{which} port {_quote(shown)} is not a number {where}: "
                            f"use {SYNTAX}, e.g. {_EXAMPLE}")
    # Long digit strings: out of range anyway (and int() refuses > 4300 digits).
    return int(value) if len(value) <= 10 else 1 << 40


def _check_range(port, which: str, low: int, where: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int):
        raise PortSpecError(f"{which} port {port!r} is not a number {where}")
    if not low <= port <= 65535:
        raise PortSpecError(f"{which} port {port if port < 1 << 40 else 'number'} is out of "
                            f"range ({low}-65535) {where}")


def _ip(text, which: str, where: str) -> tuple[str, int] | None:
    """None for "" (the default), else the address in canonical form and its version;
    IPv4-mapped IPv6 counts as IPv4, as with Go's net.ParseIP, which rootlesskit and
    its clients use."""
    if text == "":
        return None
    if isinstance(text, str) and _canonical_ipv4(text):
        return text, 4  # the common case, without ipaddress (0.3 MiB)
    import ipaddress

    try:
        if not isinstance(text, str) or "%" in text:
            raise ValueError  # zones: rootlesskit (net.ParseIP) refuses them too
        address = ipaddress.ip_address(text)
    except ValueError:
        raise PortSpecError(f"invalid {which} IP {_quote(str(text))} {where}: use an IPv4 "
                            f"address, or an IPv6 address (in brackets in the text form)"
                            ) from None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), address.version


def _canonical_ipv4(text: str) -> bool:
    """A dotted quad written as ipaddress writes it (no leading zeros)."""
    try:
        packed = _socket.inet_pton(_socket.AF_INET, text)
    except (OSError, ValueError):
        return False
    return _socket.inet_ntop(_socket.AF_INET, packed) == text


def _ip_text(ip: str, *, parent: bool) -> str:
    if not ip:
        # Empty child IP: left out. Empty parent IP (all addresses): a leading ":", the
        # one text rootlesskit reads as an empty parent IP; leaving it out would read
        # back as 0.0.0.0.
        return ":" if parent else ""
    return f"[{ip}]:" if ":" in ip else f"{ip}:"


def _quote(text: str, limit: int = 80) -> str:
    """`text` in double quotes for a one-line message: control characters escaped, a
    long text cut."""
    shown = printable(text)
    return f'"{shown[:limit]}..."' if len(shown) > limit else f'"{shown}"'
