"""The import graph of qonnx's packages, and the layering rules it must follow.

``python tests/import_graph.py`` prints the package graph and every rule broken (exit 1 if any);
``tests/test_structure.py`` runs the same checks. The layers, bottom to top::

    qonnx.core                      numerics, schemes, format emitters, targets, load/save, errors
    qonnx.passes  qonnx.models      graph passes / export recipes (on core)
    qonnx.runtime                   ONNX Runtime sessions, calibration, evaluation (on core, passes)
    qonnx.pipeline                  quantize, verification, analysis, lowering, report
    qonnx.cli                       the command line
    qonnx                           the facade (``qonnx.quantize``, ``qonnx.W4A16``, ...)
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import tomllib

#: Which packages each package may import (itself included).
ALLOWED: dict[str, set[str]] = {
    "qonnx.core": {"qonnx.core"},
    "qonnx.passes": {"qonnx.core", "qonnx.passes"},
    "qonnx.models": {"qonnx.core", "qonnx.models"},
    "qonnx.runtime": {"qonnx.core", "qonnx.passes", "qonnx.runtime"},
    "qonnx.pipeline": {"qonnx.core", "qonnx.passes", "qonnx.runtime", "qonnx.models", "qonnx.pipeline"},
    "qonnx.cli": {"qonnx.core", "qonnx.passes", "qonnx.runtime", "qonnx.models", "qonnx.pipeline", "qonnx.cli"},
    "qonnx": {"qonnx.core", "qonnx.pipeline", "qonnx"},
}


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from the importing module."""

    source: str  # importing module
    target: str  # imported qonnx module, or a third-party top-level name
    local: bool  # inside a function body
    line: int
    comment: str  # the trailing comment on the import line, if any


def modules(repo: Path) -> dict[str, Path]:
    """Every qonnx module name -> its file, with pyproject's package-dir mapping applied."""
    meta = tomllib.loads((repo / "pyproject.toml").read_text())
    dirs = meta["tool"]["setuptools"]["package-dir"]
    out: dict[str, Path] = {}
    for package, folder in dirs.items():
        base = repo / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
                continue
            name = ".".join([package, *parts])
            if dirs.get(name, folder) != folder and name != package:  # a mapped subpackage wins
                continue
            out.setdefault(name, path)
    return out


def package_of(module: str, mods: dict[str, Path]) -> str:
    """The layer a module belongs to: ``qonnx.X`` for a subpackage, ``qonnx`` for top-level modules."""
    parts = module.split(".")
    if len(parts) > 1 and ".".join(parts[:2]) in mods and mods[".".join(parts[:2])].name == "__init__.py":
        return ".".join(parts[:2])
    return "qonnx"


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports(mods: dict[str, Path]) -> list[Import]:
    """Every import statement of every module (TYPE_CHECKING blocks excluded)."""
    out: list[Import] = []
    for module, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        skip: set[int] = set()
        inside: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skip.update(id(x) for x in ast.walk(node))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inside.update(id(x) for x in ast.walk(node) if x is not node)
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            line = lines[node.lineno - 1]
            comment = line.split("#", 1)[1].strip() if "#" in line else ""
            for name in names:
                target = _resolve(name, mods) if name.split(".")[0] == "qonnx" else name.split(".")[0]
                if target and target != module:
                    out.append(Import(module, target, id(node) in inside, node.lineno, comment))
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted({*edges, *(w for ws in edges.values() for w in ws)}):
        if v not in index:
            visit(v)
    return found


def problems(repo: Path) -> list[str]:
    """Every layering rule the tree breaks, one line each (empty: all good).

    A function-local import of a qonnx module is one, except in ``qonnx.cli`` with a same-line comment that
    starts with ``deferred:`` and gives the reason (a command that must start work before a heavy import); a
    function-local third-party import needs a same-line comment giving its reason.
    """
    mods = modules(repo)
    found: list[str] = []
    package_edges: dict[str, set[str]] = {}
    core_edges: dict[str, set[str]] = {}
    for imp in imports(mods):
        if imp.target not in mods:  # third party
            if imp.local and not imp.comment:
                found.append(f"{mods[imp.source]}:{imp.line}: function-local import of {imp.target} without a reason")
            continue
        a, b = package_of(imp.source, mods), package_of(imp.target, mods)
        if imp.local and not (a == "qonnx.cli" and imp.comment.startswith("deferred:")):
            found.append(f"{mods[imp.source]}:{imp.line}: function-local import of {imp.target}")
        if b not in ALLOWED.get(a, {a}):
            found.append(f"{mods[imp.source]}:{imp.line}: {a} imports {imp.target} (layer {b} is above it)")
        if a != b:
            package_edges.setdefault(a, set()).add(b)
        elif a == "qonnx.core" and not imp.local:
            core_edges.setdefault(imp.source, set()).add(imp.target)
    found += [f"cycle between packages: {' <-> '.join(c)}" for c in _cycles(package_edges)]
    found += [f"cycle inside qonnx.core: {' <-> '.join(c)}" for c in _cycles(core_edges)]
    return found


def main() -> int:
    """Print the package graph and the rules broken."""
    repo = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    mods = modules(repo)
    graph: dict[str, set[str]] = {}
    for imp in imports(mods):
        if imp.target in mods:
            a, b = package_of(imp.source, mods), package_of(imp.target, mods)
            if a != b:
                graph.setdefault(a, set()).add(b)
    for package in sorted(graph):
        print(f"{package} -> {', '.join(sorted(graph[package]))}")
    broken = problems(repo)
    for line in broken:
        print(line)
    print(f"{len(broken)} problem(s)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
