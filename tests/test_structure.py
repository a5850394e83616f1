"""The package layering holds (no cycles, no layer imports one above it); the user install brings every import."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import import_graph
import tomllib  # Python 3.11+

REPO = Path(__file__).resolve().parent.parent


def test_layers_form_a_dag():
    assert import_graph.problems(REPO) == []


def test_checker_sees_a_violation(tmp_path):
    """The checker is not vacuous: core importing the pipeline, and local imports, are reported."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"qonnx" = "qonnx"\n"qonnx.passes" = "passes"\n'
    )
    for folder in ("qonnx", "qonnx/core", "qonnx/pipeline", "passes"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "qonnx/core/quant.py").write_text("from qonnx.pipeline import run\n")
    (tmp_path / "qonnx/pipeline/run.py").write_text(
        "from qonnx.core import quant\n\ndef f():\n    import numpy\n    from qonnx.passes import x\n"
    )
    (tmp_path / "passes/x.py").write_text("")
    (tmp_path / "qonnx/cli").mkdir()
    (tmp_path / "qonnx/cli/__init__.py").write_text("")
    (tmp_path / "qonnx/cli/cmd.py").write_text(
        "def f():\n    from qonnx.pipeline import run\n\n"
        "def g():\n    from qonnx.core import quant  # deferred: loads slowly\n\n"
        "def h():\n    from qonnx.passes import x  # loads slowly\n"
    )
    (tmp_path / "qonnx/pipeline/late.py").write_text("def f():\n    from qonnx.core import quant  # deferred: slow\n")
    found = import_graph.problems(tmp_path)
    assert any("qonnx.core imports qonnx.pipeline" in p for p in found), found
    assert any("cycle between packages: qonnx.core <-> qonnx.pipeline" in p for p in found), found
    assert any("function-local import of numpy without a reason" in p for p in found), found
    assert any("function-local import of qonnx.passes.x" in p for p in found), found
    # in qonnx.cli, only a same-line "deferred: <reason>" comment excuses a function-local qonnx import
    local = [p for p in found if "function-local import of qonnx" in p]
    assert any("cmd.py:2: function-local import of qonnx.pipeline.run" in p for p in local), found
    assert any("cmd.py:8: function-local import of qonnx.passes.x" in p for p in local), found
    assert not any("cmd.py:5:" in p for p in local), found
    assert any("late.py:2: function-local import of qonnx.core.quant" in p for p in local), found  # not in cli


def test_the_readme_install_brings_every_import():
    """Every third-party module the packages import (deferred imports too) is a dependency of the README's
    user install, ``pip install -e ".[reference]"``: core dependencies or that extra, not the dev extra."""
    assert 'pip install -e ".[reference]"' in (REPO / "README.md").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def name(requirement):
        return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group()).lower()

    installed = {name(r) for r in project["dependencies"] + project["optional-dependencies"]["reference"]}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for folder in ("qonnx", "passes", "runtime", "models"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top == "qonnx":
                        continue
                    if not {name(d) for d in distributions.get(top, [top])} & installed:
                        missing.setdefault(top, f"{path.relative_to(REPO)}:{node.lineno}")
    assert missing == {}, f"imported but not installed by the README's install: {missing}"
