"""rootless-ctl: the client of a running instance's API, mirroring Debian's `rootlessctl`
(same commands, flags and output formats, so scripts can use either), and finding and
stopping the user's instances (ours: see state/instances.py).

    rootless-ctl [INSTANCE] info [--json]
    rootless-ctl [INSTANCE] list-ports [--json]
    rootless-ctl [INSTANCE] add-ports [--json] SPEC...
    rootless-ctl [INSTANCE] remove-ports ID...
    rootless-ctl [INSTANCE] enter [--state-dir DIR | --name NAME] [-- CMD ARGS...]
    rootless-ctl [INSTANCE] stop [--timeout SECONDS] [NAME | STATE_DIR]
    rootless-ctl ps [--json]

INSTANCE is --name NAME, --state-dir DIR or --socket PATH (its api.sock); without
one, $ROOTLESSKIT_STATE_DIR, else the user's only running instance.

Any error: one line on stderr, exit status 1 (enter: the command's status otherwise;
stop: the run's). `enter` is dispatched before argparse, json or the API client are
imported: they would cost more than the whole join (see enter.py).
"""
import os
import sys

from . import __version__, _log
from .errors import ApiError, ApiUnreachable, RootlessError, UsageError

PROGRAM = "rootless-ctl"
STOP_TIMEOUT = 60.0  # seconds `stop` waits: dockerd may take a while to stop its containers


def _parser():
    """The parser, and the sub-parser of each command (for `help COMMAND`)."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        """argparse, but a bad command line is one line and status 1, like every error."""

        def error(self, message: str):
            raise UsageError(f"{message} (see {PROGRAM} --help)")

    parser = _Parser(prog=PROGRAM, allow_abbrev=False,
                     description="Client of the REST API of a running rootless-run "
                                 "(or rootlesskit) instance.")
    parser.add_argument("--debug", action="store_true", help="debug mode")
    parser.add_argument("--socket", metavar="PATH",
                        help="path to api.sock (in the --state-dir directory); default: "
                             "$ROOTLESSKIT_STATE_DIR/api.sock, else that of your only "
                             "running instance")
    parser.add_argument("--name", metavar="NAME",
                        help="the instance started with rootless-run --name NAME")
    parser.add_argument("--state-dir", metavar="DIR", help="the instance's state dir")
    parser.add_argument("-v", "--version", action="version",
                        version=f"{PROGRAM} version {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs = {}

    def command(name: str, text: str):
        subs[name] = commands.add_parser(name, help=text, description=text,
                                         allow_abbrev=False)
        return subs[name]

    sub = command("list-ports", "List ports")
    sub.add_argument("--json", action="store_true", help="print as JSON, one port a line")
    sub = command("add-ports", "Add ports")
    sub.add_argument("--json", action="store_true", help="print as JSON, one port a line")
    sub.add_argument("specs", nargs="+", metavar="SPEC",
                     help="[PARENT_IP:]PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO, like "
                          "`docker run -p`, e.g. 127.0.0.1:8080:80/tcp")
    sub = command("remove-ports", "Remove ports")
    sub.add_argument("ids", nargs="+", metavar="ID", help="port id, as list-ports shows")
    sub = command("info", "Show info")
    sub.add_argument("--json", action="store_true", help="print as JSON")
    sub = command("enter", "Run a command (default: your shell) inside a running instance's "
                           "namespaces, as root there")
    sub.add_argument("--state-dir", metavar="DIR",
                     help="the instance's state dir (default: the dir of --socket, "
                          "$ROOTLESSKIT_STATE_DIR, else your only running instance's)")
    sub.add_argument("--name", metavar="NAME",
                     help="the instance started with rootless-run --name NAME")
    sub.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                     help="the command and its arguments (default: $SHELL)")
    sub = command("ps", "List your running instances (named or not)")
    sub.add_argument("--json", action="store_true", help="print as JSON, one instance a line")
    sub = command("stop", "Stop an instance: SIGTERM to its supervisor (forwarded to its "
                          "command), wait until it has ended, exit with the run's status")
    sub.add_argument("instance", nargs="?", metavar="NAME | STATE_DIR",
                     help="the instance's name, or its state dir (as ps shows it)")
    sub.add_argument("--timeout", type=float, default=STOP_TIMEOUT, metavar="SECONDS",
                     help=f"how long to wait (default: {STOP_TIMEOUT:g})")
    sub = command("help", "Show the list of commands, or the help of one")
    sub.add_argument("topic", nargs="?", metavar="COMMAND")
    return parser, subs


def _enter_argv(argv: list[str]) -> tuple[bool, dict, list[str]] | None:
    """(--debug, the options naming the instance, enter's own arguments) when the
    command is `enter`."""
    debug, given, i = False, {}, 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if arg == "--debug":
            debug, i = True, i + 1
        elif flag in ("--socket", "--name", "--state-dir") and (eq or i + 1 < len(argv)):
            if not eq:
                value, i = argv[i + 1], i + 1
            given[flag[2:].replace("-", "_")] = value
            i += 1
        else:
            return (debug, given, argv[i + 1:]) if arg == "enter" else None
    return None


def main(argv: list[str] | None = None) -> int:
    _log.configure(debug=False, program=PROGRAM)
    argv = sys.argv[1:] if argv is None else argv
    try:
        entering = _enter_argv(argv)
        if entering is not None:
            debug, given, rest = entering
            _log.configure(debug=debug, program=PROGRAM)
            from .enter import main as enter

            code = enter(rest, **given)
            if code >= 0:
                return code
            argv = ["help", "enter"]  # enter --help
        parser, subs = _parser()
        args = parser.parse_args(argv)
        if args.command in (None, "help"):
            # rootlessctl without a command shows its help too (status 0)
            topic = getattr(args, "topic", None)
            if topic is not None and topic not in subs:
                raise UsageError(f"no help topic {topic!r}: the commands are "
                                 f"{', '.join(subs)}")
            (subs[topic] if topic else parser).print_help()
            return 0
        _log.configure(debug=args.debug, program=PROGRAM)
        return _run(args)
    except RootlessError as exc:
        _log.error(str(exc))
        return exc.exit_code  # 1; enter: 127/126 for a command that cannot run
    except BrokenPipeError:
        # Output cut short (`| head`): nothing to report; keep Python quiet at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args) -> int:
    if args.command == "ps":
        return _ps(args.json)
    if args.command == "stop":
        return _stop(args)
    # Imported here: --help and bad command lines need neither msgspec nor http.client.
    from . import portspec
    from .api.client import Client

    if args.command == "add-ports":
        # All specs checked first: a typo in the last one adds none of them.
        specs = [(text, portspec.parse(text)) for text in args.specs]
    if args.command == "remove-ports":
        ids = [_port_id(text) for text in args.ids]
    client = Client(_socket_path(args))
    _log.debug(f"API socket: {client.socket_path}")

    if args.command == "info":
        info = client.info()
        _out(_indented_json(_builtins(info)) if args.json else _info_text(info))
    elif args.command == "list-ports":
        ports = client.list_ports()
        if args.json:
            _out("".join(_status_json(status) + "\n" for status in ports))
        else:
            _out(_ports_table(ports))
    elif args.command == "add-ports":
        for text, spec in specs:
            try:
                status = client.add_port(spec)
            except ApiUnreachable:
                raise
            except ApiError as exc:
                raise ApiError(f"cannot add {portspec.written(text)}: {exc}", exc.status
                               ) from None
            _out(_status_json(status) + "\n" if args.json else f"{status.id}\n")
    elif args.command == "remove-ports":
        for ident in ids:
            try:
                client.remove_port(ident)
            except ApiUnreachable:
                raise
            except ApiError as exc:
                raise ApiError(f"cannot remove port {ident}: {exc}", exc.status) from None
            _out(f"{ident}\n")
    return 0


def _socket_path(args) -> str:
    if args.socket and not (args.name or args.state_dir):
        return args.socket  # as given: not necessarily in a state dir
    return os.path.join(_state_dir(args), "api.sock")


def _state_dir(args) -> str:
    from .state.instances import check_name, state_dir_for

    if args.name is not None:
        check_name(args.name)
    return state_dir_for(args.name, args.state_dir, args.socket)


# -- ps and stop (ours) ----------------------------------------------------------------------

_PS_API_TIMEOUT = 2.0  # seconds an instance's API gets to list its ports for ps


def _ps(as_json: bool) -> int:
    from .state.instances import running

    found = running()
    ports = [_ports_of(instance) for instance in found]
    if as_json:
        _out("".join(_instance_json(i, p) + "\n" for i, p in zip(found, ports)))
        return 0
    rows = [["NAME", "PID", "UPTIME", "DRIVERS", "PORTS", "COMMAND"]]
    for instance, published in zip(found, ports):
        record = instance.record
        rows.append([instance.label, str(record.pid), _duration(record.uptime()),
                     f"{record.net}/{record.port_driver}", _ports_text(published),
                     _command_text(record.command)])
    widths = [max(len(_log.printable(row[i])) for row in rows) + 3 for i in range(5)]
    _out("".join("".join(_log.printable(cell).ljust(w) for cell, w in zip(row, widths))
                 + _log.printable(row[-1]) + "\n" for row in rows))
    return 0


def _ports_of(instance):
    """The instance's published ports as its API lists them; None if it does not answer."""
    from .api.client import Client

    try:
        return Client(os.path.join(instance.path, "api.sock"),
                      timeout=_PS_API_TIMEOUT).list_ports()
    except ApiError as exc:
        _log.debug(f"ports of {instance.label}: {exc}")
        return None


def _ports_text(ports) -> str:
    from .portspec import format as written

    if ports is None:
        return "?"
    return ",".join(written(status.spec) for status in ports) or "-"


def _command_text(command: list[str]) -> str:
    import shlex

    return shlex.join(command)


def _duration(seconds: float) -> str:
    """45s, 3m07s, 2h05m, 3d04h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _instance_json(instance, ports) -> str:
    import json

    record = instance.record
    body = {"name": record.name or None, "stateDir": instance.path, "pid": record.pid,
            "uptime": int(record.uptime()), "command": record.command,
            "networkDriver": record.net, "portDriver": record.port_driver,
            "ports": None if ports is None else [_builtins(status) for status in ports]}
    return json.dumps(body, separators=(",", ":"))


def _stop(args) -> int:
    from .state.instances import check_name, find, stop

    if not args.timeout >= 0:
        raise UsageError(f"--timeout {args.timeout:g}: give a number of seconds, 0 or more")
    target = args.instance
    if target is None:
        path = _state_dir(args)
    elif args.name or args.state_dir or args.socket:
        raise UsageError(f"{target} and --name, --state-dir or --socket each name an "
                         f"instance: give one of them")
    elif "/" in target:
        path = target
    else:
        path = find(check_name(target, "instance name"))
        if path is None:
            raise UsageError(f"no instance named {target} is running (rootless-ctl ps "
                             f"lists the running ones)")
    return stop(path, args.timeout)


def _port_id(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise UsageError(f"port id {text!r} is not a number: use an ID that "
                         f"`{PROGRAM} list-ports` shows")
    return int(text)


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()  # each id is out before the next request can fail


# -- rootlessctl's output formats ---------------------------------------------------------

def _info_text(info) -> str:
    lines = [f"- REST API version: {info.apiVersion}",
             f"- Implementation version: {info.version}",
             f"- State Directory: {info.stateDir}",
             f"- Child PID: {info.childPID}"]
    net = info.networkDriver
    if net is not None:
        lines += [f"- Network Driver: {net.driver}", f"  - DNS: {_go_list(net.dns)}"]
        if net.childIP:
            lines.append(f"  - IP: {net.childIP}")
    port = info.portDriver
    if port is not None:
        lines += [f"- Port Driver: {port.driver}",
                  f"  - Supported protocols: {_go_list(port.protos)}"]
    return "\n".join(lines) + "\n"


def _go_list(items: list[str]) -> str:
    return "[" + " ".join(items) + "]"  # Go's %v of a []string


def _ports_table(ports) -> str:
    """Go's tabwriter as rootlessctl sets it up (minwidth 4, padding 4, spaces): every
    cell, the last one too, padded to its column's widest text plus 4."""
    rows = [["ID", "PROTO", "PARENTIP", "PARENTPORT", "CHILDIP", "CHILDPORT"]]
    rows += [[str(p.id), p.spec.proto, p.spec.parentIP, str(p.spec.parentPort),
              p.spec.childIP, str(p.spec.childPort)] for p in ports]
    widths = [max(4, max(len(row[i]) for row in rows) + 4) for i in range(len(rows[0]))]
    return "".join("".join(cell.ljust(w) for cell, w in zip(row, widths)) + "\n"
                   for row in rows)


def _status_json(status) -> str:
    """A PortStatus as rootlessctl prints it: compact, Go's field order (childPort
    before childIP) and omitempty."""
    import json

    spec = status.spec
    fields = {"proto": spec.proto, "parentIP": spec.parentIP, "parentPort": spec.parentPort,
              "childPort": spec.childPort, "childIP": spec.childIP}
    body = {"id": status.id, "spec": {k: v for k, v in fields.items() if v not in ("", 0)}}
    return _go_escape(json.dumps(body, separators=(",", ":"), ensure_ascii=False))


def _indented_json(value) -> str:
    import json

    # Go's json.MarshalIndent(v, "", "    "), plus the newline rootlessctl prints.
    return _go_escape(json.dumps(value, indent=4, ensure_ascii=False)) + "\n"


def _builtins(value):
    """An API model (a Struct, or a port model's PortStatus) as JSON's builtins."""
    import msgspec

    from .api.models import encode_hook

    # keeps omit_defaults: Go's omitempty
    return msgspec.to_builtins(value, enc_hook=encode_hook)


def _go_escape(text: str) -> str:
    """Go's encoder escapes these even in valid UTF-8 (HTML safety); they can only
    occur inside JSON strings, so replacing them in the whole text is safe."""
    for char, escape in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


if __name__ == "__main__":
    sys.exit(main())
