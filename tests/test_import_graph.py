"""The shape of the tree: the import graph of rootless/, read from the source with ast
(every import, at module level or in a function, relative ones resolved), has no
cycle.

A function-level import is a cycle too: it hides one from the interpreter at start,
not from a reader, and a reorder of the imports makes it a crash. An edge goes from
a module to each module of ours it names, and to the packages whose __init__ that
import runs (less the importer's own packages, already running when it does)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "rootless"


def modules(root: str = ROOT) -> dict[str, str]:
    """Dotted name -> path of every module of the package (a package is its __init__)."""
    found = {}
    for directory, _, files in os.walk(os.path.join(root, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = path
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The modules of ours that module `name` (at `path`) imports, anywhere in it."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    named = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import x`: x is a module, or a name in .
                sub = f"{target}.{alias.name}"
                named.add(sub if sub in known else target)
    mine = set(_ancestors(name)) | {name}
    edges = set()
    for target in named:
        if target not in known:
            continue  # not ours (the standard library, msgspec, trio...)
        edges.update(m for m in [*_ancestors(target), target] if m in known and m not in mine)
    return edges


def graph(root: str = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as the modules along it, the first again at the end; None if none."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once explored
    for start in sorted(edges):
        if start in state:
            continue
        path, state[start] = [start], "open"
        pending = [iter(sorted(edges[start]))]
        while pending:
            step = next(pending[-1], None)
            if step is None:
                pending.pop()
                state[path.pop()] = "done"
            elif state.get(step) == "open":
                return path[path.index(step):] + [step]
            elif step not in state:
                state[step] = "open"
                path.append(step)
                pending.append(iter(sorted(edges[step])))
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_reader_finds_every_kind_of_import(tmp_path):
    """The reader sees what the test relies on: function-level and relative imports
    (`from . import x`, `from ..p import y`, a name from a package's __init__), and
    the packages an import runs; a cycle through them is found and shown."""
    files = {
        "__init__.py": "",
        "a.py": "import os\n\ndef f():\n    from .sub import b\n",
        "sub/__init__.py": "from .. import c\n",
        "sub/b.py": "from ..d import name\n",
        "c.py": "",
        "d.py": "from .sub.b import x\n",
        "e.py": "def g():\n    from . import a\n",
    }
    for relative, text in files.items():
        path = tmp_path / PACKAGE / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    edges = graph(str(tmp_path))
    assert edges == {
        "rootless": set(), "rootless.a": {"rootless.sub", "rootless.sub.b"},
        "rootless.sub": {"rootless.c"}, "rootless.sub.b": {"rootless.d"},
        "rootless.c": set(), "rootless.d": {"rootless.sub", "rootless.sub.b"},
        "rootless.e": {"rootless.a"},
    }
    assert find_cycle(edges) == ["rootless.sub.b", "rootless.d", "rootless.sub.b"]
    del edges["rootless.d"]
    edges["rootless.sub.b"] = set()
    assert find_cycle(edges) is None


# The API is where the port side meets HTTP: it depends on the drivers' interface
# (rootless.ports, the drivers' list/add/remove), never the reverse. Only the wiring
# may import it: rootless.parent.run binds api.sock before the command starts,
# rootless.parent.services serves it in the service thread, and rootless.ctl is its client
# (rootless-ctl). Everything else, the drivers, portspec and the port model first,
# knows nothing of HTTP.
API = "rootless.api"
API_WIRING = {"rootless.parent.run", "rootless.parent.services", "rootless.ctl"}
# What the drivers and the port model never import (STYLE.md): the API, and the
# programs that wire them (the drivers are handed a Config and called, nothing more).
WIRING = {API, "rootless.cli", "rootless.ctl", "rootless.parent", "rootless.child",
          "rootless.enter"}
PORT_SIDE = ("rootless.drivers", "rootless.ports", "rootless.portspec")


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_only_the_wiring_imports_the_api():
    offenders = {name: sorted(t for t in edges if _within(t, API))
                 for name, edges in graph().items()
                 if not _within(name, API) and name not in API_WIRING}
    offenders = {name: api for name, api in offenders.items() if api}
    assert not offenders, f"import rootless.api outside its wiring: {offenders}"


def test_the_port_side_imports_no_wiring():
    offenders = {name: sorted(t for t in edges if _within(t, *WIRING))
                 for name, edges in graph().items() if _within(name, *PORT_SIDE)}
    offenders = {name: wiring for name, wiring in offenders.items() if wiring}
    assert not offenders, f"the drivers' side imports the wiring: {offenders}"
