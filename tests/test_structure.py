"""The package layering holds: no cycles between packages or inside core, no layer imports one above it."""

from __future__ import annotations

from pathlib import Path

import import_graph

REPO = Path(__file__).resolve().parent.parent


def test_layers_form_a_dag():
    assert import_graph.problems(REPO) == []


def test_checker_sees_a_violation(tmp_path):
    """The checker is not vacuous: core importing the pipeline, and a local import, are both reported."""
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
    found = import_graph.problems(tmp_path)
    assert any("qonnx.core imports qonnx.pipeline" in p for p in found), found
    assert any("cycle between packages: qonnx.core <-> qonnx.pipeline" in p for p in found), found
    assert any("function-local import of numpy without a reason" in p for p in found), found
    assert any("function-local import of qonnx.passes.x" in p for p in found), found
