"""PATH lookup, in one place (shutil.which is not worth its import on the start path)."""
import os


def which(name: str, path: str | None = None) -> str | None:
    """The executable `name` resolves to, as a shell would find it, or None."""
    if "/" in name:
        return name if os.access(name, os.X_OK) and not os.path.isdir(name) else None
    if path is None:
        path = os.environ.get("PATH", os.defpath)
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None
