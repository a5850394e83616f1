"""Weight-only schemes for a target: the storage its fast kernel takes, and the session options written with it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import matmul_model
from helpers import assert_one_line_error, qonnx_cli, run, sqnr_db

import qonnx
from qonnx.core.errors import ConfigError
from qonnx.pipeline.deploy import METADATA_KEY, sidecar_path


@pytest.fixture
def layer(tmp_path):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 96)) * 0.05).astype(np.float32)
    return matmul_model(tmp_path / "m.onnx", w), w


def _nbits(path):
    model = onnx.load(str(path), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == "MatMulNBits"], dict(
        (p.key, p.value) for p in model.metadata_props
    )


def test_cuda_form_and_session_options(layer, tmp_path):
    path, w = layer
    out = tmp_path / "q.onnx"
    config = qonnx.W4A16().for_target("cuda")
    assert (config.symmetric, config.block_size) == (True, 32)
    summary = qonnx.quantize(path, config, output=out)
    nodes, meta = _nbits(out)
    assert len(nodes) == 1 and len(nodes[0].input) == 3  # A, B, scales: no zero points
    assert {a.name: a.i for a in nodes[0].attribute}["block_size"] == 32
    wanted = {"ep.cuda.fpa_intb_gemm": "1"}
    assert json.loads(meta[METADATA_KEY])["session_config_entries"] == wanted
    side = json.loads(sidecar_path(out).read_text())
    assert side["session_config_entries"] == wanted and side["provider"] == "CUDAExecutionProvider"
    assert side["environment"] == {"ORT_FPA_INTB_GEMM": "1"} and "batch" in side["use_when"]
    assert sidecar_path(out) in summary.outputs
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert json.loads(meta["qonnx.config"])["target"] == "cuda"
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    assert sqnr_db(x @ w, run(out, {"x": x})[0]) > 20  # the model runs and is right on the CPU provider


def test_generic_and_other_storage_write_no_options(layer, tmp_path):
    path, _ = layer
    out = tmp_path / "g.onnx"
    qonnx.quantize(path, qonnx.W4A16(), output=out)
    _, meta = _nbits(out)
    assert METADATA_KEY not in meta and not sidecar_path(out).exists()
    assert "target" not in json.loads(meta["qonnx.config"])  # the default's metadata is unchanged
    kept = qonnx.W4A16(block_size=128).for_target("cuda", keep=frozenset({"block_size"}))
    assert (kept.symmetric, kept.block_size, kept.session_config) == (True, 128, {})  # not the kernel's storage
    assert qonnx.W8A16().for_target("cuda").session_config == {}  # no 8-bit form measured
    with pytest.raises(ConfigError, match="hqq"):
        qonnx.W4A16(algo="hqq").for_target("cuda")


def test_cli_target_for_weight_only(layer, tmp_path):
    path, _ = layer
    out = tmp_path / "cli.onnx"
    res = qonnx_cli("quantize", path, "-o", out, "--target", "cuda", "--json")
    assert res.returncode == 0, res.stderr
    config = json.loads(res.stdout)["config"]
    assert (config["symmetric"], config["block_size"], config["target"]) == (True, 32, "cuda")
    assert sidecar_path(out).exists()
    assert "measured 0.71x" in res.stderr  # prefill on the 7B shape is slower than fp16: said, with the number
    res = qonnx_cli("quantize", path, "-o", tmp_path / "b.onnx", "--target", "cuda", "--block-size", "64", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["config"]["block_size"] == 64  # given options stay
    assert not sidecar_path(tmp_path / "b.onnx").exists()
    res = qonnx_cli("quantize", path, "-o", tmp_path / "s.onnx", "--target", "cuda", "--strict")
    assert_one_line_error(res, "refusing (strict)")
    assert not (tmp_path / "s.onnx").exists()
    res = qonnx_cli("quantize", path, "-o", tmp_path / "h.onnx", "--target", "cuda", "--algo", "hqq")
    assert_one_line_error(res, "hqq")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "t.onnx", "--strict")
    assert_one_line_error(res, "--strict applies with --target")
