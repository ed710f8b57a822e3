"""What a user may tune through the environment (ROOTLESS_*): read where it is used,
with one warning for a value that is not one."""
import os

from . import _log


def seconds(name: str, default: float) -> float:
    """The positive number of seconds in $`name`, else `default` (with a warning if it
    was set to something else)."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        if float(text) > 0:
            return float(text)
    except ValueError:
        pass
    _log.warning(f"{name}={text!r} is not a positive number of seconds: using {default:g}")
    return default
