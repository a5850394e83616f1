"""Weight+activation schemes: activation Q/DQ, SmoothQuant folding and search, calibration, the pipeline."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run, sqnr_db
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_one_line_error, qonnx_cli

import qonnx
from qonnx.core import numerics, quant
from qonnx.core.config_activations import FP8, W4A8, W8A8, Calibration, Dynamic
from qonnx.core.errors import ConfigError
from qonnx.models import build_decoder_stack
from qonnx.passes.activations import ActivationQParams, InsertActivationQDQPass
from qonnx.passes.smooth_quant import SmoothGroup, factors, fake_quantize_weight, fold, search_alpha


def test_activation_qparams():
    scale, zp = numerics.activation_qparams(-1.0, 3.0, "int8", symmetric=False)
    assert scale == pytest.approx(4 / 255) and zp == 64  # -1 / (4/255) = -63.75 -> zero point 64
    assert numerics.activation_qparams(-1.0, 3.0, "int8", symmetric=True) == (pytest.approx(3 / 127), 0)
    assert numerics.activation_qparams(0.5, 3.0, "int8", symmetric=False)[1] == 0  # range widened to hold 0
    assert numerics.activation_qparams(-2.0, 1.0, "fp8", symmetric=True) == (pytest.approx(2 / 448), 0)
    assert numerics.activation_qparams(0.0, 0.0, "int8", symmetric=False)[0] > 0


def test_fp8_weights(rng):
    w = rng.standard_normal((96, 40)).astype(np.float32)
    w[:, 3] *= 50
    sm = quant.quantize_fp8_kn(w)
    codes, scale = sm.codes, sm.scale.reshape(-1)
    assert codes.dtype == ml_dtypes.float8_e4m3fn and sm.scale.shape == (1, 40)
    back = codes.astype(np.float32) * scale
    assert np.abs(back).max(axis=0) == pytest.approx(np.abs(w).max(axis=0), rel=1e-6)
    assert sqnr_db(w, back) > 28  # E4M3 keeps 3 mantissa bits: ~30 dB on Gaussian columns


def _norm_mlp(path, rng, k=48, n=64, outlier=40.0):
    """x -> Mul(norm weight) -> {MatMul a, MatMul b}; silu(a) * up -> MatMul down; Reshape -> MatMul o."""
    g = rng.standard_normal
    inits = {
        "norm_w": (1 + 0.1 * g(k)).astype(np.float32),
        "wa": (g((k, n)) / np.sqrt(k)).astype(np.float32),
        "wup": (g((k, n)) / np.sqrt(k)).astype(np.float32),
        "wdown": (g((n, k)) / np.sqrt(n)).astype(np.float32),
        "wo": (g((k, k)) / np.sqrt(k)).astype(np.float32),
        "shape": np.array([0, -1, k], np.int64),
    }
    inits["norm_w"][5] *= outlier  # an outlier channel, as in real LLM activations
    nodes = [
        helper.make_node("Mul", ["x", "norm_w"], ["h"], name="norm"),
        helper.make_node("MatMul", ["h", "wa"], ["a"], name="gate_proj"),
        helper.make_node("MatMul", ["h", "wup"], ["up"], name="up_proj"),
        helper.make_node("Sigmoid", ["a"], ["sig"], name="sig"),
        helper.make_node("Mul", ["a", "sig"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "up"], ["inner"], name="inner"),
        helper.make_node("MatMul", ["inner", "wdown"], ["d"], name="down_proj"),
        helper.make_node("Reshape", ["d", "shape"], ["r"], name="reshape"),
        helper.make_node("MatMul", ["r", "wo"], ["y"], name="o_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", k])],
        [numpy_helper.from_array(v, name) for name, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _group(model: ir.Model, tensor: str) -> SmoothGroup:
    readers = []
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[0].name == tensor:
            readers.append((node, node.inputs[1], False))
    return SmoothGroup(tensor, readers)


@pytest.mark.parametrize(
    ("tensor", "where"),
    [("h", "constant 'norm_w'"), ("inner", "weight columns of MatMul 'up_proj'"), ("r", "new Mul")],
)
def test_fold_keeps_float_outputs(tmp_path, rng, tensor, where):
    """Folding X / s into its producer and s into the readers' weights leaves the float model's output unchanged."""
    path = _norm_mlp(tmp_path / "m.onnx", rng)
    x = rng.standard_normal((1, 16, 48)).astype(np.float32)
    (ref,) = run(path, {"x": x})
    model = ir.load(path)
    values = {v.name: v for node in model.graph for v in node.outputs}
    group = _group(model, tensor)
    s = rng.uniform(0.1, 10, group.weight_kn(0).shape[0]).astype(np.float32)
    taken = set(values) | set(model.graph.initializers)
    new, how = fold(model.graph, values[tensor], group, s, taken)
    assert where in how
    assert (new is values[tensor]) == (where != "new Mul")
    out = tmp_path / "folded.onnx"
    ir.save(model, out)
    (got,) = run(out, {"x": x})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_search_alpha_prefers_smoothing_for_outliers(rng):
    """With one huge activation channel, the search smooths (alpha > 0) and beats no smoothing."""
    k, n = 64, 96
    x = rng.standard_normal((256, k)).astype(np.float32)
    x[:, 7] *= 200
    w = (rng.standard_normal((k, n)) / 8).astype(np.float32)
    value = ir.Value(name="w", const_value=ir.tensor(w))
    node = ir.node("MatMul", [ir.Value(name="x"), value])
    group = SmoothGroup("x", [(node, value, False)])
    absmax = np.abs(x).max(axis=0)

    def act_range(s):
        a = float((absmax / s).max())
        return -a, a

    def fake_act(v, lo, hi):
        scale = max(-lo, hi) / 127
        return np.clip(np.round(v / scale), -127, 127) * scale

    fake_w = fake_quantize_weight(8, None, True)
    alpha, _, err = search_alpha(group, [(x, act_range)], absmax, fake_w, fake_act)
    _, _, err0 = search_alpha(group, [(x, act_range)], absmax, fake_w, fake_act, grid=(0.0,))
    assert alpha > 0 and err < err0 / 4
    assert np.allclose(factors(absmax, np.abs(w).max(axis=1), 0.0), 1)
    # Without outliers there is little to gain: whatever is chosen is no worse than no smoothing.
    x2 = rng.standard_normal((256, k)).astype(np.float32)
    absmax = np.abs(x2).max(axis=0)
    _, _, err2 = search_alpha(group, [(x2, act_range)], absmax, fake_w, fake_act)
    _, _, err20 = search_alpha(group, [(x2, act_range)], absmax, fake_w, fake_act, grid=(0,))
    assert err2 <= err20


def test_insert_qdq_shares_one_pair(tmp_path, rng):
    """One Q/DQ pair per tensor, read by all its quantized readers; other readers keep the float value."""
    path = _norm_mlp(tmp_path / "m.onnx", rng, outlier=1.0)
    model = ir.load(path)
    readers = [(n, 0) for n in model.graph if n.name in ("gate_proj", "up_proj")]
    InsertActivationQDQPass({"h": ActivationQParams(0.05, 128, "uint8", tuple(readers))})(model)
    qs = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(qs) == 1 and len(dqs) == 1
    assert all(n.inputs[0] is dqs[0].outputs[0] for n, _ in readers)
    out = tmp_path / "q.onnx"
    ir.save(model, out)
    onnx.checker.check_model(onnx.load(out), full_check=True)
    x = rng.standard_normal((1, 8, 48)).astype(np.float32)
    (ref,) = run(path, {"x": x})
    (got,) = run(out, {"x": x})
    assert sqnr_db(ref, got) > 25


def test_configs():
    assert W8A8().weight_config().bits == 8 and W8A8().weight_config().block_size is None
    assert W4A8().weight_config().block_size == 128 and W4A8().weight_config().format == "qdq"
    assert FP8().weight_config().grid == "fp8" and FP8().calibration.method == "minmax"
    gptq = FP8(calibration=Calibration(data="x.npz", samples=3, method="minmax")).weight_config().gptq
    assert gptq is not None and (gptq.calib_data, gptq.calib_samples) == ("x.npz", 3)  # FP8 default: GPTQ
    assert FP8(algo="rtn").weight_config().gptq is None and W8A8().weight_config().gptq is None
    assert FP8().to_dict()["algo"]["name"] == "gptq" and FP8(algo="rtn").to_dict()["algo"] == "rtn"
    assert W8A8(target="tensorrt").act_symmetric  # TensorRT takes symmetric int8 only
    assert Dynamic().weight_config().accuracy_level == 4
    for bad in [dict(smooth_quant=2.0), dict(smooth_quant="yes"), dict(target="tpu"), dict(weight_bits=3)]:
        with pytest.raises(ConfigError):
            W8A8(**bad)
    with pytest.raises(ConfigError, match="fp8"):
        FP8(weight_bits=4)
    with pytest.raises(ConfigError, match="method"):
        Calibration(method="kl")
    json.dumps(W8A8().to_dict())


@pytest.fixture
def stack(tmp_path, rng):
    """A decoder stack, .npz calibration feeds with outlier channels, and separate test inputs."""
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=64, intermediate=160, layers=2, vocab=96)

    def inputs(seed, batches):
        r = np.random.default_rng(seed)
        x = r.standard_normal((batches, 1, 32, 64)).astype(np.float32)
        x[..., [3, 40]] *= 30  # residual-stream outliers, as LLMs have
        return x

    np.savez(tmp_path / "feeds.npz", x=inputs(1, 6))
    return path, tmp_path / "feeds.npz", inputs(2, 3)


@pytest.mark.parametrize(
    ("config", "floor_db"),
    [
        (W8A8(smooth_quant=None), 20),
        (W8A8(), 20),
        (W8A8(smooth_quant=0.5, act_symmetric=True), 20),
        (W4A8(block_size=32), 12),
        (W4A8(block_size=32, algo="gptq"), 12),
        (FP8(), 15),
    ],
    ids=["w8a8-plain", "w8a8-auto", "w8a8-sym-0.5", "w4a8", "w4a8-gptq", "fp8"],
)
def test_pipeline(stack, tmp_path, config, floor_db):
    """Calibrated through ONNX Runtime from .npz feeds; the output runs and stays close to the float model."""
    import dataclasses

    path, npz, test = stack
    cal = dataclasses.replace(config.calibration, data=str(npz), samples=4)
    cfg = dataclasses.replace(config, calibration=cal)  # algo="gptq" follows the calibration data
    summary = qonnx.quantize(path, cfg, output=tmp_path / "q" / "model.onnx")
    model = onnx.load(summary.outputs[0])
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    # One pair per distinct activation: ln1 output (qkv), v slice (o_proj), ln2 output (gate, up), inner (down),
    # final norm (lm_head) per layer; smoothing may add a Mul but never another pair.
    kept = summary.activations["kept_float"]
    assert len(kept) <= 1  # "auto": at most 5% of the tensors (and at least one may go)
    assert ops.count("QuantizeLinear") == summary.activations["inserted"] == 2 * 4 + 1 - len(kept)
    assert all(r.reason.startswith(cfg.name) for r in summary.quantized)
    for x in test:
        (ref,) = run(path, {"x": x})
        (got,) = run(summary.outputs[0], {"x": x})
        assert sqnr_db(ref, got) > floor_db
    if cfg.smooth_quant is not None:
        assert summary.activations["smoothing"]
    if cfg.algo != "rtn":
        assert all("gptq" in r.reason for r in summary.quantized if r.op_type == "MatMul")


def test_smoothing_and_keep_float(stack, tmp_path):
    """On activations with outlier channels SmoothQuant beats no smoothing; keep_float keeps the worst tensors float."""
    path, npz, test = stack
    results = {}
    for sq, keep in ((None, 0), (0.5, 0), (0.5, 2)):
        cfg = W8A8(smooth_quant=sq, keep_float=keep, calibration=Calibration(data=str(npz), samples=4, method="minmax"))
        summary = qonnx.quantize(path, cfg, output=tmp_path / f"q{sq}-{keep}" / "model.onnx", verify=False)
        results[sq, keep] = np.mean(
            [sqnr_db(run(path, {"x": x})[0], run(summary.outputs[0], {"x": x})[0]) for x in test]
        )
        kept = summary.activations["kept_float"]
        assert len(kept) == keep and summary.activations["inserted"] == 9 - keep
        assert sum("kept in floating point" in r.reason for r in summary.quantized) >= keep
    assert results[0.5, 0] > results[None, 0] + 2
    assert results[0.5, 2] > results[0.5, 0]


def test_calibration_cache(stack, tmp_path):
    """A cache is written, reused with the same result (another method allowed), and refused for another model."""
    path, npz, _ = stack
    cache = tmp_path / "calib.npz"
    cal = Calibration(data=str(npz), samples=3, cache=str(cache))
    first = qonnx.quantize(path, W8A8(calibration=cal), output=tmp_path / "a" / "model.onnx", verify=False)
    assert cache.exists() and first.activations["cache"].startswith("wrote")
    again = qonnx.quantize(path, W8A8(calibration=cal), output=tmp_path / "b" / "model.onnx", verify=False)
    assert again.activations["cache"].startswith("reused")
    a = onnx.load(first.outputs[0])
    b = onnx.load(again.outputs[0])
    assert [numpy_helper.to_array(t).tobytes() for t in a.graph.initializer] == [
        numpy_helper.to_array(t).tobytes() for t in b.graph.initializer
    ]
    fewer = qonnx.quantize(
        path,
        W8A8(calibration=cal, keep_float=0),
        output=tmp_path / "f" / "model.onnx",
        targets={"lm_head": None},
        verify=False,
    )
    assert fewer.activations["cache"].startswith("reused") and fewer.activations["inserted"] == 8
    other = build_decoder_stack(tmp_path / "o" / "model.onnx", hidden=64, intermediate=160, layers=2, vocab=96, seed=5)
    with pytest.raises(ConfigError, match="another model"):
        qonnx.quantize(other, W8A8(calibration=cal), output=tmp_path / "c" / "model.onnx", verify=False)
    with pytest.raises(ConfigError, match="another model"):  # another smoothing setup
        qonnx.quantize(path, W8A8(smooth_quant=0.3, calibration=cal), output=tmp_path / "d" / "model.onnx")
    small = tmp_path / "small.npz"
    qonnx.quantize(
        path,
        W8A8(calibration=Calibration(data=str(npz), samples=3, cache=str(small))),
        output=tmp_path / "s" / "model.onnx",
        targets={"lm_head": None},
        verify=False,
    )
    with pytest.raises(ConfigError, match="fewer layers"):
        qonnx.quantize(path, W8A8(calibration=Calibration(data=str(npz), samples=3, cache=str(small))))


def test_dynamic(stack, tmp_path):
    path, _, test = stack
    summary = qonnx.quantize(path, Dynamic(), output=tmp_path / "d" / "model.onnx")
    model = onnx.load(summary.outputs[0])
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(a.i == 4 for n in nbits for a in n.attribute if a.name == "accuracy_level")
    for x in test:
        assert sqnr_db(run(path, {"x": x})[0], run(summary.outputs[0], {"x": x})[0]) > 20


def test_cli(stack, tmp_path):
    path, npz, _ = stack
    out = tmp_path / "cli" / "model.onnx"
    res = qonnx_cli(
        "quantize", path, "-o", out, "--scheme", "w8a8", "--calib-data", npz, "--calib-samples", "3",
        "--calib-method", "percentile", "--smooth-quant", "0.6", "--keep-float", "0", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["config"]["calibration"]["method"] == "percentile" and summary["config"]["smooth_quant"] == 0.6
    assert summary["activations"]["inserted"] == 9
    res = qonnx_cli("quantize", path, "-o", tmp_path / "x.onnx", "--scheme", "w8a8", "--smooth-quant", "lots")
    assert_one_line_error(res, "--smooth-quant")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "x.onnx", "--scheme", "w4a16", "--calib-method", "mse")
    assert_one_line_error(res, "--calib-method applies to")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "x.onnx", "--scheme", "w8a8", "--format", "qdq")
    assert_one_line_error(res, "weight-only schemes")
    res = qonnx_cli(
        "quantize",
        path,
        "-o",
        tmp_path / "x.onnx",
        "--scheme",
        "w8a8",
        "--calib-data",
        npz,
        "--target",
        "cuda",
        "--strict",
    )
    assert_one_line_error(res, "slower")


def test_w4a8_lowered_for_cpu(stack, tmp_path):
    """W4A8 for the CPU provider is MatMulNBits with int8 activations at run time, not Q/DQ (0.03x fp32 there)."""
    path, npz, test = stack
    cfg = W4A8(target="cpu", calibration=Calibration(data=str(npz), samples=2))
    assert not cfg.form.static_activations and cfg.weight_config().accuracy_level == 4
    assert "smooth_quant" not in cfg.to_dict() and "emitted_as" in cfg.to_dict()  # records what is done
    summary = qonnx.quantize(path, cfg, output=tmp_path / "c" / "model.onnx")
    ops = [n.op_type for n in onnx.load(summary.outputs[0]).graph.node]
    assert "QuantizeLinear" not in ops and ops.count("MatMulNBits") == len(summary.quantized)
    for x in test:
        assert sqnr_db(run(path, {"x": x})[0], run(summary.outputs[0], {"x": x})[0]) > 12


def test_cli_w4a8_for_cpu_says_which_options_it_ignores(stack, tmp_path):
    path, npz, _ = stack
    args = ["quantize", path, "-o", tmp_path / "c.onnx", "--scheme", "w4a8", "--target", "cpu", "--calib-data", npz]
    res = qonnx_cli(*args, "--smooth-quant", "0.5", "--calib-method", "mse")
    assert res.returncode == 0, res.stderr
    assert "--calib-method, --smooth-quant ignored: --target cpu emits w4a8 as MatMulNBits" in res.stderr
    res = qonnx_cli(*args[:3], tmp_path / "d.onnx", *args[4:])
    assert res.returncode == 0 and "ignored" not in res.stderr


def test_slow_target_warns_through_targets(stack, tmp_path, capsys):
    """The speed warning follows the activation scheme, also when it comes through targets."""
    path, npz, _ = stack
    cal = Calibration(data=str(npz), samples=2)
    from qonnx import W4A16

    qonnx.quantize(
        path, W4A16(), output=tmp_path / "t" / "model.onnx", targets={"MatMul": W8A8(target="cuda", calibration=cal)}
    )
    assert "measured 0.26x" in capsys.readouterr().err


def test_fp8_gptq(stack, tmp_path):
    """``--scheme fp8 --algo gptq`` (the default) rounds the float8 weights with GPTQ: other codes than RTN's,
    outputs closer to the float model."""
    path, npz, test = stack
    outputs, weights = {}, {}
    for algo in ("rtn", "gptq", "default"):
        out = tmp_path / algo / "model.onnx"
        res = qonnx_cli(
            "quantize", path, "-o", out, "--scheme", "fp8", *(() if algo == "default" else ("--algo", algo)),
            "--calib-data", npz, "--calib-samples", "4", "--json",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        matmuls = [r for r in summary["layers"] if r["quantized"] and r["op_type"] == "MatMul"]
        assert matmuls and all(("gptq" in r["reason"]) == (algo != "rtn") for r in matmuls)
        model = onnx.load(out)
        onnx.checker.check_model(model, full_check=True)
        fp8 = [t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN and len(t.dims) == 2]
        assert len(fp8) == len(matmuls)
        weights[algo] = {t.name: numpy_helper.to_array(t).astype(np.float32) for t in fp8}
        outputs[algo] = [sqnr_db(run(path, {"x": x})[0], run(out, {"x": x})[0]) for x in test]
    assert summary["config"]["algo"]["name"] == "gptq" and summary["config"]["algo"]["calib_samples"] == 4
    assert all(np.array_equal(weights["gptq"][k], weights["default"][k]) for k in weights["gptq"])
    assert weights["rtn"].keys() == weights["gptq"].keys()
    assert all(not np.array_equal(weights["rtn"][k], weights["gptq"][k]) for k in weights["rtn"])
    # Held-out inputs: GPTQ closer to the float model on each (about 1.5 dB on this stack, 26.8-28.0 dB for RTN).
    assert all(g > r + 0.5 for r, g in zip(outputs["rtn"], outputs["gptq"], strict=True)), outputs
    awq = ["--scheme", "fp8", "--algo", "awq", "--calib-data", npz]
    res = qonnx_cli("quantize", path, "-o", tmp_path / "x.onnx", *awq)
    assert_one_line_error(res, "algo must be 'rtn', 'gptq'")
