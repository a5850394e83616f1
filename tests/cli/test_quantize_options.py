"""qonnx quantize / analyze options from the command line: schemes, algorithms, calibration, budgets, refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import OUTLIER, lookup_model, outlier_stack, tiny_causal_lm, tiny_tokenizer
from helpers import assert_one_line_error, qonnx_cli, run, sqnr_db
from onnx import TensorProto, numpy_helper

from qonnx.runtime.evaluate import perplexity


@pytest.mark.slow
def test_w8a8_options(activation_stack, tmp_path):
    path, npz, _ = activation_stack
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


def test_cli_w4a8_for_cpu_says_which_options_it_ignores(activation_stack, tmp_path):
    path, npz, _ = activation_stack
    args = ["quantize", path, "-o", tmp_path / "c.onnx", "--scheme", "w4a8", "--target", "cpu", "--calib-data", npz]
    res = qonnx_cli(*args, "--smooth-quant", "0.5", "--calib-method", "mse")
    assert res.returncode == 0, res.stderr
    assert "--calib-method, --smooth-quant ignored: --target cpu emits w4a8 as MatMulNBits" in res.stderr
    res = qonnx_cli(*args[:3], tmp_path / "d.onnx", *args[4:])
    assert res.returncode == 0 and "ignored" not in res.stderr


@pytest.mark.slow
def test_fp8_gptq(activation_stack, tmp_path):
    """``--scheme fp8 --algo gptq`` (the default) rounds the float8 weights with GPTQ: other codes than RTN's,
    outputs closer to the float model."""
    path, npz, test = activation_stack
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


@pytest.mark.slow
def test_hqq_options(tmp_path, tiny_model):
    res = qonnx_cli("quantize", tiny_model, "-o", tmp_path / "q.onnx", "--scheme", "w3a16", "--algo", "hqq", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["config"]["scheme"] == "w3a16" and summary["config"]["algo"]["name"] == "hqq"
    assert all("hqq (float zero points)" in r["reason"] for r in summary["layers"] if r["quantized"])
    res = qonnx_cli("quantize", tiny_model, "-o", tmp_path / "q2.onnx", "--algo", "hqq", "--calib-samples", "2")
    assert res.returncode == 2 and "--calib-samples applies to" in res.stderr


@pytest.mark.slow
def test_cli_on_exported_llm(tmp_path):
    """A causal LM folder: feeds from its tokenizer and the pydoc corpus; the CLI options reach the config."""
    from qonnx.models.export import export_causal_lm

    src = export_causal_lm(
        tiny_causal_lm("llama"), tmp_path / "src", tokenizer=tiny_tokenizer(), quiet=True, verify=False
    ).parent
    res = qonnx_cli(
        "quantize",
        src,
        "-o",
        tmp_path / "out",
        "--algo",
        "gptq",
        "--block-size",
        "32",
        "--calib-samples",
        "3",
        "--calib-seq-len",
        "32",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["config"]["algo"]["calib_samples"] == 3
    quantized = [r for r in summary["layers"] if r["quantized"]]
    assert len(quantized) == 15 and all("gptq" in r["reason"] for r in quantized)  # lm_head is not tied here
    assert summary["verification"]["ran"]
    ppl = perplexity(tmp_path / "out", seq_len=32, windows=2, progress=False)
    assert np.isfinite(ppl["perplexity"])


@pytest.mark.slow
def test_cli_on_exported_llama(tmp_path):
    """A Llama export (RMSNorm as Mul, SwiGLU, attention output behind Reshape): --algo awq+gptq from the CLI."""
    from qonnx.models.export import export_causal_lm

    src = export_causal_lm(
        tiny_causal_lm("llama"), tmp_path / "src", tokenizer=tiny_tokenizer(), quiet=True, verify=False
    ).parent
    for algo in ("awq", "awq+gptq"):
        out = tmp_path / algo
        res = qonnx_cli(
            "quantize", src, "-o", out, "--algo", algo, "--block-size", "32", "--calib-samples", "3",
            "--calib-seq-len", "32", "--json",
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout)
        assert summary["config"]["algo"]["name"] == algo and summary["config"]["algo"]["calib_samples"] == 3
        quantized = [r for r in summary["layers"] if r["quantized"]]
        assert len(quantized) == 15 and all(f"{algo} by default" in r["reason"] for r in quantized)
        assert any("folded into the constant" in r["reason"] for r in quantized)  # the RMSNorm weight (a Mul)
        assert summary["verification"]["ran"]
        assert np.isfinite(perplexity(out, seq_len=32, windows=2, progress=False)["perplexity"])


@pytest.mark.slow
def test_cli_analyze_and_budget_json(tmp_path):
    path = outlier_stack(tmp_path)
    res = qonnx_cli("analyze", path, "--block-size", "32", "--calib-samples", "2", "--json", "-o", tmp_path / "s.png")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["layers"][0]["weight"] == OUTLIER and len(data["layers"]) == 11
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = qonnx_cli("analyze", path, "--block-size", "32", "--calib-samples", "2", "--top", "3")
    assert res.returncode == 0, res.stderr
    assert OUTLIER.rsplit(".", 1)[0] in res.stdout.splitlines()[2]  # first row of the table
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--block-size", "32", "--target-bits", "5.6", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)["mixed_precision"]
    assert info["promoted"][0]["weight"] == OUTLIER and info["bits_per_weight"]["output"] <= 5.6
    saved = tmp_path / "sens.json"
    saved.write_text(json.dumps(data))
    res = qonnx_cli(
        "quantize", path, "-o", tmp_path / "q1.onnx", "--block-size", "32", "--target-bits", "5.6", "--json",
        "--sensitivity", saved,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    reused = json.loads(res.stdout)["mixed_precision"]["promoted"]  # ranked on 2 feeds instead of 4: same choice
    assert [(p["weight"], p["to"]) for p in reused] == [(p["weight"], p["to"]) for p in info["promoted"]]
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q1.onnx", "--target-bits", "12", "--sensitivity", saved)
    assert_one_line_error(res, "sens.json: measured with w4a16", "not the scheme asked for")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q1.onnx", "--sensitivity", saved)
    assert_one_line_error(res, "--sensitivity applies with --target-bits or --max-ppl-increase")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q2.onnx", "--block-size", "32", "--target-bits", "2")
    assert_one_line_error(res, "below what the scheme itself stores")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q3.onnx", "--target-bits", "5", "--max-ppl-increase", "5%")
    assert_one_line_error(res, "not both")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q4.onnx", "--max-ppl-increase", "5%")
    assert_one_line_error(res, "causal LM")


def test_gptq_refusals(stack_feeds, tmp_path):
    path, _, _ = stack_feeds
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--calib-samples", "4")
    assert_one_line_error(res, "--calib-samples applies to --algo gptq, awq and awq+gptq only")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--algo", "gptq")
    assert_one_line_error(res, "no tokenizer", ".npz")


def test_awq_refusals(stack_feeds, tmp_path):
    path, npz, _ = stack_feeds
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--algo", "awq")
    assert_one_line_error(res, "no tokenizer", ".npz")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--algo", "rtn", "--calib-data", str(npz))
    assert_one_line_error(res, "--calib-data applies to --algo gptq, awq and awq+gptq only")


def test_sequential_refusals(stack_feeds, tmp_path):
    path, _, _ = stack_feeds
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--sequential")
    assert_one_line_error(res, "--sequential applies to --algo gptq only")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--scheme", "w8a8", "--sequential")
    assert_one_line_error(res, "--sequential applies to weight-only schemes")


@pytest.mark.slow
def test_embeddings_option_round_trip(tmp_path):
    src, _ = lookup_model(tmp_path / "m.onnx", 64, tied=True)
    out = tmp_path / "q" / "model.onnx"
    res = qonnx_cli("quantize", src, "-o", out, "--block-size", "32", "--embeddings", "4", "--no-verify", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["config"]["embeddings"] == 4
    gather = next(r for r in summary["layers"] if r["op_type"] == "Gather")
    assert gather["quantized"] and gather["bytes_after"] < gather["bytes_before"] / 6
    meta = {p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}
    assert json.loads(meta["qonnx.config"])["embeddings"] == 4
    res = qonnx_cli("inspect", out, "--json")
    assert res.returncode == 0, res.stderr
    inspected = json.loads(res.stdout)
    assert inspected["ops"]["com.microsoft::GatherBlockQuantized"] == 1
    layers = inspected["layers"]
    assert any(x["op_type"] == "GatherBlockQuantized" and "already quantized" in x["reason"] for x in layers)
    res = qonnx_cli("quantize", src, "-o", tmp_path / "f" / "model.onnx", "--embeddings", "float", "--json")
    assert res.returncode == 0 and "embeddings" not in json.loads(res.stdout)["config"], res.stderr


def test_embeddings_option_refusals(tmp_path):
    src, _ = lookup_model(tmp_path / "m.onnx", 64, tied=True)
    res = qonnx_cli("quantize", src, "-o", tmp_path / "x.onnx", "--embeddings", "4", "--format", "qdq")
    assert_one_line_error(res, "embeddings", "matmulnbits")
    res = qonnx_cli("quantize", src, "-o", tmp_path / "x.onnx", "--scheme", "w8a8", "--embeddings", "8")
    assert_one_line_error(res, "--embeddings apply to weight-only schemes")
    res = qonnx_cli("quantize", src, "-o", tmp_path / "x.onnx", "--embeddings", "4", "--exclude", "lm_head")
    assert_one_line_error(res, "embeddings=4 cannot be done", "kept in floating point")
