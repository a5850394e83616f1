"""HQQ: less error than round to nearest, codes from the stored parameters, ONNX Runtime computes what numpy says."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import matmul_model
from helpers import run
from onnx import TensorProto, helper, numpy_helper

import qonnx
from qonnx.core import numerics, quant
from qonnx.core.config import W2A16, W3A16, W4A16, W8A16
from qonnx.passes.hqq import hqq_quantize, lp_error


def with_outliers(rng, k, n, rate=0.01):
    """Weights of an LLM's scale with a few large entries, which widen their blocks' ranges."""
    w = (0.02 * rng.standard_normal((k, n))).astype(np.float32)
    w[rng.random(w.shape) < rate] *= 12
    return w


def block_errors(w, qm, p):
    """sum |w - w'|^p per (block, column) [nblocks, N]."""
    e = np.abs(w - qm.dequantize()).astype(np.float64) ** p
    rows = np.arange(w.shape[0]) // qm.block_size
    return np.stack([e[rows == b].sum(0) for b in range(quant.num_blocks(w.shape[0], qm.block_size))])


@pytest.mark.parametrize(
    ("bits", "zero_point", "gain"), [(4, "float", 0.99), (3, "float", 0.99), (2, "float", 0.99), (3, "integer", 1.0)]
)
@pytest.mark.parametrize(("k", "block_size"), [(320, 128), (72, None)])  # ragged last block; one per column
def test_lower_error_than_rtn(rng, bits, zero_point, gain, k, block_size):
    w = with_outliers(rng, k, 96)
    rtn = quant.quantize_kn(w, bits, block_size, False)
    qm = hqq_quantize(w, bits=bits, block_size=block_size, zero_point=zero_point, device="cpu")
    assert lp_error(w, qm, 0.7) <= gain * lp_error(w, rtn, 0.7)  # the norm HQQ minimises
    # each (block, column) keeps its iterate of least squared error: never worse than where it started
    assert (block_errors(w, qm, 2) <= block_errors(w, rtn, 2) * (1 + 1e-5) + 1e-12).all()
    assert lp_error(w, qm, 2) <= gain * lp_error(w, rtn, 2)
    # a QuantizedMatrix in qonnx's conventions: codes in range, shapes, zero points as asked
    assert qm.q.min() >= 0 and qm.q.max() <= 2**bits - 1 and qm.q.dtype == np.uint8
    assert qm.scale.shape == qm.zero_point.shape == rtn.scale.shape
    np.testing.assert_array_equal(qm.scale, rtn.scale)  # HQQ moves zero points only
    assert qm.fractional_zero_point == (zero_point == "float")
    if zero_point == "integer":
        assert qm.zero_point.min() >= 0 and qm.zero_point.max() <= 2**bits - 1


@pytest.mark.parametrize(
    ("bits", "block_size", "scale_dtype", "k"),
    [(4, 128, np.float32, 576), (3, 32, np.float16, 200), (2, 16, np.float16, 72), (8, None, np.float32, 40)],
)
def test_no_iterations_is_round_to_nearest(rng, bits, block_size, scale_dtype, k):
    w = with_outliers(rng, k, 24)
    rtn = quant.quantize_kn(w, bits, block_size, False, scale_dtype=scale_dtype)
    qm = hqq_quantize(w, bits=bits, block_size=block_size, scale_dtype=scale_dtype, iterations=0, device="cpu")
    np.testing.assert_array_equal(qm.q, rtn.q)
    np.testing.assert_array_equal(qm.scale, rtn.scale)
    np.testing.assert_array_equal(qm.zero_point, rtn.zero_point)
    assert qm.scale.dtype == rtn.scale.dtype


@pytest.mark.parametrize("scale_dtype", [np.float32, np.float16])
def test_codes_follow_from_stored_parameters(rng, scale_dtype):
    """Codes are roundf(w / s + z) with the stored s and z: what a runtime dequantizes is what HQQ measured."""
    w = with_outliers(rng, 200, 40)
    qm = hqq_quantize(w, bits=3, block_size=64, scale_dtype=scale_dtype, device="cpu")
    assert qm.scale.dtype == scale_dtype and qm.zero_point.dtype == np.float32
    np.testing.assert_array_equal(qm.zero_point.astype(scale_dtype).astype(np.float32), qm.zero_point)
    rows = np.arange(200) // 64
    inv = numerics.inverse(qm.scale)[rows]
    v = w * inv + qm.zero_point[rows]
    np.testing.assert_array_equal(np.clip(numerics.round_half_up(v), 0, 7), qm.q)
    assert 0 <= qm.q.min() and qm.q.max() <= 7


def test_arguments():
    w = np.zeros((32, 4), np.float32)
    with pytest.raises(ValueError, match="2-D"):
        hqq_quantize(w[0], bits=4, block_size=16)
    with pytest.raises(ValueError, match="zero_point"):
        hqq_quantize(w, bits=4, block_size=16, zero_point="half")  # type: ignore[arg-type]
    qm = hqq_quantize(w, bits=4, block_size=16, device="cpu")  # all-zero blocks stay exact
    assert not qm.dequantize().any()


def stored(model_path, suffix):
    m = onnx.load(model_path)
    return next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith(suffix))


@pytest.mark.parametrize(
    ("cfg", "zero_points", "bits_attr"),
    [
        (W4A16(block_size=32, algo="hqq"), np.float32, 4),  # fractional zero points in the scales' type
        (W3A16(block_size=32, algo="hqq"), np.float32, 4),  # 3-bit codes in a 4-bit container
        (W2A16(block_size=16, algo="hqq"), np.float32, 2),
        (W8A16(block_size=32, algo="hqq"), np.uint8, 8),  # no float zero points for 8 bits: rounded
        (W3A16(block_size=32, algo="hqq", format="qdq"), None, None),
        (W4A16(block_size=None, algo="hqq", format="qdq"), None, None),
    ],
    ids=lambda v: str(v) if not isinstance(v, type) else v.__name__,
)
def test_onnxruntime_computes_what_numpy_says(tmp_path, rng, cfg, zero_points, bits_attr):
    k, n = 200, 48  # ragged with 32
    w = with_outliers(rng, k, n)
    src = matmul_model(tmp_path / "m.onnx", w)
    summary = qonnx.quantize(src, cfg, output=tmp_path / "q.onnx")
    assert len(summary.quantized) == 1 and "hqq" in summary.quantized[0].reason
    out = onnx.load(tmp_path / "q.onnx")
    onnx.checker.check_model(out, full_check=True)
    from qonnx.passes.weight_only import _hqq

    expected = _hqq(w, cfg, qonnx.load(src).graph.inputs[0].dtype)
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(run(tmp_path / "q.onnx", {"x": x})[0], x @ expected.dequantize(), rtol=1e-4, atol=1e-4)
    if cfg.format == "matmulnbits":
        node = next(nd for nd in out.graph.node if nd.op_type == "MatMulNBits")
        assert {a.name: a.i for a in node.attribute}["bits"] == bits_attr
        assert stored(tmp_path / "q.onnx", "_zero_points").dtype == zero_points
    else:
        assert stored(tmp_path / "q.onnx", "_zero_point").dtype.itemsize == 1  # uint4 codes, integer zero points
    if cfg.bits == 3:
        assert "3-bit codes in 4-bit containers" in summary.quantized[0].reason
        assert expected.q.max() <= 7


def test_convolution_per_channel(tmp_path, rng):
    """Conv weights get HQQ per output channel with integer zero points (DequantizeLinear); ORT agrees with numpy."""
    w = with_outliers(rng, 16 * 8 * 3, 3).reshape(16, 8, 3, 3)

    def conv_model(path, weight):
        g = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])],
            [numpy_helper.from_array(weight.astype(np.float32), "w")],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.save(m, path)
        return path

    summary = qonnx.quantize(conv_model(tmp_path / "c.onnx", w), W4A16(algo="hqq"), output=tmp_path / "q.onnx")
    [record] = summary.quantized
    assert "per output channel" in record.reason and "zero points rounded to integers" in record.reason
    qm = hqq_quantize(w.reshape(16, -1).T, bits=4, block_size=None, zero_point="integer", device="cpu")
    x = {"x": rng.standard_normal((1, 8, 6, 6)).astype(np.float32)}
    want = run(conv_model(tmp_path / "deq.onnx", qm.dequantize().T.reshape(w.shape)), x)[0]
    np.testing.assert_allclose(run(tmp_path / "q.onnx", x)[0], want, rtol=1e-4, atol=1e-5)
