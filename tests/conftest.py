from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qonnx.models import build_decoder_stack
from qonnx.runtime import make_session


def run(path, feeds, **kw):
    """Run a model on CPU in ONNX Runtime, precise QDQ (see runtime/session.py)."""
    return make_session(path, "cpu", **kw).run(None, feeds)


def sqnr_db(ref: np.ndarray, y: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    err = ((ref - y.astype(np.float64)) ** 2).sum()
    return float("inf") if err == 0 else float(10 * np.log10((ref**2).sum() / err))


def matmul_model(
    path: Path,
    w: np.ndarray,
    *,
    opset: int = 17,
    elem=TensorProto.FLOAT,
    nodes=None,
    initializers=None,
    inputs=None,
    k=None,
    weight_name="w",
) -> Path:
    """x [batch, K] @ w -> y, or a custom node list."""
    k = k if k is not None else w.shape[0]
    inits = [numpy_helper.from_array(w, weight_name)] if initializers is None else initializers
    nodes = nodes or [helper.make_node("MatMul", ["x", weight_name], ["y"], name="mm")]
    g = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", elem, ["batch", k])],
        [helper.make_tensor_value_info("y", elem, ["batch", "n"])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A decoder-shaped model whose K (72, 200) is not a multiple of the block sizes used."""
    return build_decoder_stack(tmp_path / "tiny.onnx", hidden=72, intermediate=200, layers=2, vocab=100)


@pytest.fixture
def tiny_input(rng):
    return {"x": rng.standard_normal((2, 5, 72)).astype(np.float32)}
