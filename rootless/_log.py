"""One-line diagnostics on stderr: `rootless-run: warning: ...`, `rootless-run[child]: debug: ...`.

A successful run writes nothing of ours unless asked (--debug): only warnings that ask
the user to change something, and errors. What a run chose by itself is debug.

Logging never raises: a line that cannot be written (the log reader is gone: EPIPE; the
terminal hung up: EIO; a full or non-blocking pipe: EAGAIN) is dropped, and the run goes
on. A run that serves ports for weeks must not end because nobody reads its stderr.

`limited()` is for failures of one unit of work (a connection, a flow, a request): a
flood of them is one line per kind and interval, with a count of those left out.
"""
import os
import time

_start = time.monotonic()

_debug = False
_program = "rootless-run"
_role = ""

LIMIT_INTERVAL = 10.0  # seconds: one line per kind of failure at most this often
# kind -> [when its last line was written, how many were left out since]
_limited: dict[str, list] = {}


def configure(*, debug: bool, program: str) -> None:
    global _debug, _program
    _debug = debug
    _program = program


def set_role(role: str) -> None:
    """Called by the forked child so its lines say where they come from."""
    global _role
    _role = role


def printable(text: str) -> str:
    """`text` with what does not print (a newline, a terminal's escape sequence, a
    byte that is not UTF-8, all of which a user's value may hold) escaped as repr
    shows it: a message is one line, whatever it quotes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _emit(level: str, message: str) -> None:
    # os.write: the child may log between fork and exec, where buffered stdio is unsafe.
    where = f"{_program}[{_role}]" if _role else _program
    try:
        os.write(2, f"{where}: {level}: {printable(message)}\n".encode(errors="replace"))
    except OSError:
        pass  # nobody to tell: the line is lost, the run is not


def debug(message: str) -> None:
    if _debug:
        _emit("debug", f"{(time.monotonic() - _start) * 1000:.1f} ms: {message}")


def warning(message: str) -> None:
    _emit("warning", message)


def error(message: str) -> None:
    _emit("error", message)


def limited(kind: str, message: str, level: str = "warning") -> None:
    """`message` at `level`, unless a line of the same `kind` was written less than
    LIMIT_INTERVAL seconds ago: then it is counted, and the next line of that kind
    says how many were left out."""
    now = time.monotonic()
    entry = _limited.get(kind)
    if entry is not None and now - entry[0] < LIMIT_INTERVAL:
        entry[1] += 1
        return
    left_out = entry[1] if entry is not None else 0
    _limited[kind] = [now, 0]
    if left_out:
        message += f" (and {left_out} more like it in the last {LIMIT_INTERVAL:g} s)"
    _emit(level, message)
