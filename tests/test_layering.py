"""Dependencies run one way: protocol <- daemon <- client, the demo and the lab on top, the CLI entry point last.

Every import counts, at module level or inside a function (ast.walk sees both). A module may import its own
layer or a lower one; no two modules may import each other, directly or through others (no cycles).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "daemon", "client")
# (module prefix, layer): the first prefix that matches a module names its layer
LAYERS = (("client.cli", 4),                      # invariantctl's entry point: registers every command
          ("client.demo", 3), ("daemon.lab", 3),  # on top of the daemon and the client library
          ("client", 2), ("daemon", 1), ("protocol", 0))


def layer(module: str) -> int | None:
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    return None


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for py in (ROOT / pkg).rglob("*.py"):
            parts = py.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = py
    return out


def imports(module: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported project module) for every import in the file, relative ones resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = (node.module or "").removeprefix("invariantd.")
            # `from . import x` / `from .pkg import mod`: the names may be modules themselves
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            found += [(node.lineno, t) for t in (subs or [target])]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.removeprefix("invariantd.")) for a in node.names]
    return [(ln, t) for ln, t in found if t.split(".")[0] in PACKAGES]


def graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = modules()
    known = set(mods)
    edges, against = {}, []
    for mod, path in sorted(mods.items()):
        edges[mod] = set()
        for line, target in imports(mod, path, known):
            if target not in known:
                target = next((k for k in sorted(known, key=len, reverse=True) if target.startswith(k + ".")), target)
            if target != mod:
                edges[mod].add(target)
            if layer(target) is not None and layer(target) > layer(mod):
                against.append(f"{path.relative_to(ROOT)}:{line}: {mod} (layer {layer(mod)}) imports {target} "
                               f"(layer {layer(target)})")
    return edges, against


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan). A package's __init__ importing its own
    submodules is no cycle worth reporting; submodules importing the package are (both directions) counted."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_import_runs_down_the_layers():
    _, against = graph()
    assert not against, "\n".join(against)


def test_no_import_cycles():
    found = cycles(graph()[0])
    assert not found, found


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The test itself can fail: an import against the direction inside a function body is found."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from ..client import ctl\n    return ctl\n")
    assert imports("daemon.mod", src, {"client.ctl"}) == [(2, "client.ctl")]
    assert layer("client.ctl") > layer("daemon.mod")
