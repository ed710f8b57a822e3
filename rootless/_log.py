"""One-line diagnostics on stderr: `rootless-run: warning: ...`, `rootless-run[child]: debug: ...`."""
import os
import time

_start = time.monotonic()

_debug = False
_program = "rootless-run"
_role = ""


def configure(*, debug: bool, program: str) -> None:
    global _debug, _program
    _debug = debug
    _program = program


def set_role(role: str) -> None:
    """Called by the forked child so its lines say where they come from."""
    global _role
    _role = role


def _emit(level: str, message: str) -> None:
    # os.write: the child may log between fork and exec, where buffered stdio is unsafe.
    where = f"{_program}[{_role}]" if _role else _program
    os.write(2, f"{where}: {level}: {message}\n".encode(errors="replace"))


def debug(message: str) -> None:
    if _debug:
        _emit("debug", f"{(time.monotonic() - _start) * 1000:.1f} ms: {message}")


def info(message: str) -> None:
    _emit("info", message)


def warning(message: str) -> None:
    _emit("warning", message)


def error(message: str) -> None:
    _emit("error", message)
