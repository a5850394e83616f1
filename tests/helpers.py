"""Helpers shared by the tests: running models, comparing outputs, calling the CLI, correlated inputs.

Plain functions, imported by test modules (``from helpers import run``) and by ``conftest.py``; no test module
imports another test module.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx

from qonnx.runtime import make_session


def run(path, feeds, **kw):
    """Run a model on CPU in ONNX Runtime, precise QDQ (see runtime/session.py)."""
    return make_session(path, "cpu", **kw).run(None, feeds)


def sqnr_db(ref: np.ndarray, y: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    err = ((ref - y.astype(np.float64)) ** 2).sum()
    return float("inf") if err == 0 else float(10 * np.log10((ref**2).sum() / err))


def qonnx_cli(*args, cwd=None):
    """``python -m qonnx.cli ARGS`` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "qonnx.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def assert_one_line_error(res, *fragments):
    """The CLI failed with exit code 2 and one line on stderr holding each fragment, no traceback."""
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qonnx: error: "), res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def onnx_io(path):
    """The graph's inputs and outputs of a saved model: {name: [dim_param or dim_value, ...]}, each in order."""
    model = onnx.load(str(path), load_external_data=False)

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {i.name: dims(i) for i in model.graph.input}, {o.name: dims(o) for o in model.graph.output}


def correlated(rng, rows, k, rank=None, seed=0):
    """Inputs whose features are strongly correlated (a few directions dominate), as LLM activations are.

    The directions depend on ``seed`` only: samples drawn with other ``rng`` come from the same distribution.
    """
    rank = rank or k // 4
    mix = np.random.default_rng(seed).standard_normal((rank, k))
    x = rng.standard_normal((rows, rank)) @ mix + 0.1 * rng.standard_normal((rows, k))
    x[:, 3] *= 8  # an outlier feature
    return x.astype(np.float32)


def hessian(x):
    """2/n X^T X, as GPTQ and AWQ collect it."""
    return (2.0 / len(x) * x.astype(np.float64).T @ x).astype(np.float32)
