"""``quantize(..., rotate=...)`` and ``qonnx quantize --rotate``: a rotated model is quantized; refusals in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
from helpers import assert_one_line_error, qonnx_cli, run

import qonnx
from qonnx.core.config import W4A16


def _feeds(path, seq=6):
    model = onnx.load(str(path), load_external_data=False)
    feeds = {
        "input_ids": np.arange(1, seq + 1)[None].astype(np.int64),
        "attention_mask": np.ones((1, seq), np.int64),
        "position_ids": np.arange(seq)[None].astype(np.int64),
    }
    for i in model.graph.input[3:]:
        dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
    return feeds


def test_quantize_rotated_keeps_the_online_transforms_float(llama, tmp_path):
    summary = qonnx.quantize(llama, W4A16(block_size=32, rotate="hadamard"), output=tmp_path / "q.onnx", verify=False)
    assert summary.config["rotate"] == "hadamard" and summary.rotation
    assert summary.passes[0].startswith("RotateResidualPass")
    hadamards = [r for r in summary.layers if "hadamard" in r.node]
    assert len(hadamards) == 4 and not any(r.quantized for r in hadamards)  # 2 layers x (H_p, H_m)
    assert sum(r.quantized for r in summary.layers) == 2 * 7 + 1  # q k v o gate up down per layer, the head
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "q.onnx"), load_external_data=False).metadata_props}
    assert "hadamard" in meta["qonnx.config"], meta.keys()
    ref, out = run(llama, _feeds(llama))[0], run(tmp_path / "q.onnx", _feeds(llama))[0]
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.9


def test_cli_round_trip_and_refusal(llama, tiny_model, tmp_path):
    res = qonnx_cli("quantize", llama, "-o", tmp_path / "q.onnx", "--block-size", "32", "--rotate", "random", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["config"]["rotate"] == "random" and summary["rotation"]
    run(tmp_path / "q.onnx", _feeds(llama))
    bad = qonnx_cli("quantize", tiny_model, "-o", tmp_path / "bad.onnx", "--rotate", "hadamard")
    assert_one_line_error(bad, "rotation: ")
    assert not (tmp_path / "bad.onnx").exists()
    wrong = qonnx_cli("quantize", llama, "-o", tmp_path / "w.onnx", "--rotate", "spin")
    assert wrong.returncode == 2 and "spin" in wrong.stderr
