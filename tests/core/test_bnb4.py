"""NF4 and FP4 weights as ONNX Runtime's MatMulBnb4: bytes as ORT's own quantizer writes them, run by ORT."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnxruntime.capi._pybind_state import quantize_matmul_bnb4

import qonnx
from qonnx.core import formats, numerics, quant
from qonnx.core.errors import ConfigError
from qonnx.runtime.session import make_session


def _matmul_model(w: np.ndarray) -> ir.Model:
    k, n = w.shape
    x = ir.Value(name="x", shape=ir.Shape([2, k]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="w", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(w))
    node = ir.node("MatMul", [x, weight], name="mm")
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 21}, name="g")
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("grid", [numerics.NF4, numerics.FP4])
def test_rtn_bytes_equal_onnxruntimes_quantizer(rng, grid):
    k, n, bs = 256, 24, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 3] *= 20
    qw = formats.emit(quant.quantize_scaled_kn(w, grid, bs), "bnb4", np.dtype(np.float32))
    packed = np.zeros((k * n + 1) // 2, np.uint8)
    absmax = np.zeros(k * n // bs, np.float32)
    quantize_matmul_bnb4(packed, np.ascontiguousarray(w.T), absmax, bs, {"fp4": 0, "nf4": 1}[grid.kind], n, k)
    np.testing.assert_array_equal(qw.arrays["B"], packed)
    np.testing.assert_array_equal(qw.arrays["absmax"], absmax)
    table = np.asarray(grid.values, np.float32)
    ref = table[grid.index(w / np.repeat(np.abs(w).reshape(k // bs, bs, n).max(1), bs, axis=0))] * np.repeat(
        np.abs(w).reshape(k // bs, bs, n).max(1), bs, axis=0
    )
    np.testing.assert_allclose(qw.dequantize(), ref, rtol=1e-6)


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
@pytest.mark.parametrize("algo", ["rtn", "gptq"])
def test_quantize_runs_in_onnxruntime(rng, tmp_path, scheme, algo):
    k, n = 128, 48
    w = rng.standard_normal((k, n)).astype(np.float32)
    cfg = qonnx.core.schemes.scheme_from_name(scheme, algo=algo)
    if algo == "gptq":  # a Hessian from correlated inputs, given as calibration feeds
        x = rng.standard_normal((64, 2, k)).astype(np.float32) @ rng.standard_normal((k, k)).astype(np.float32)
        np.savez(tmp_path / "cal.npz", x=x)
        cfg = qonnx.core.schemes.scheme_from_name(scheme, algo=qonnx.GPTQ(calib_data=str(tmp_path / "cal.npz")))
    summary = qonnx.quantize(_matmul_model(w), cfg, output=tmp_path / "q.onnx", verify=False)
    assert len(summary.quantized) == 1 and "MatMulBnb4" in [n.op_type for n in summary.model.graph]
    xs = rng.standard_normal((2, k)).astype(np.float32)
    got = make_session(tmp_path / "q.onnx").run(None, {"x": xs})[0]
    node = next(n for n in summary.model.graph if n.op_type == "MatMulBnb4")
    arrays = {"B": node.inputs[1].const_value.numpy(), "absmax": node.inputs[2].const_value.numpy()}
    attrs = {a.name: a.value for a in node.attributes.values()}
    deq = formats.QuantizedWeight("bnb4", arrays, attrs, k, n, 4).dequantize()
    np.testing.assert_allclose(got, xs @ deq, rtol=1e-4, atol=1e-4)  # ORT computes what the arrays say
    assert np.abs(xs @ w - got).max() < 0.25 * np.abs(xs @ w).max()  # and that is close to the float layer


def test_ragged_k_stays_float_and_bad_options_refused(rng, tmp_path):
    w = rng.standard_normal((96, 16)).astype(np.float32)  # K = 96 is not a multiple of 64
    with pytest.raises(qonnx.NothingToQuantizeError, match="K=96 is not a multiple of block_size 64"):
        qonnx.quantize(_matmul_model(w), qonnx.core.config.NF4(), verify=False)
    with pytest.raises(ConfigError, match="nf4 weights need bits=4 and symmetric=True"):
        qonnx.core.config.NF4(symmetric=False)
    with pytest.raises(ConfigError, match="format 'matmulnbits' stores int codes, not nf4"):
        qonnx.core.config.NF4(format="matmulnbits")
    with pytest.raises(ConfigError, match="hqq optimises integer zero points; nf4 has none"):
        qonnx.core.config.NF4(algo="hqq")
    with pytest.raises(ConfigError, match="MatMulBnb4 is blocked: block_size in"):
        qonnx.core.config.NF4(block_size=None)
