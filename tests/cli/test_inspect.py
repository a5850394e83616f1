"""``qonnx inspect``: a short summary of a language model, its count of quantizable layers the one quantize acts on."""

from __future__ import annotations

import json
import re

import pytest
from builders import tiny_llm_graph

import qonnx
from qonnx.cli.inspection import group_names
from qonnx.cli.main import main
from qonnx.pipeline.inspection import inspect_model


def run(capfd, *args):
    assert main([str(a) for a in args]) == 0
    out, err = capfd.readouterr()
    assert err == ""
    return out.splitlines()


@pytest.mark.parametrize("layers", [2, 12])
def test_summary_is_short_whatever_the_depth(tmp_path, capfd, layers):
    path = tiny_llm_graph(tmp_path / "m.onnx", layers=layers)
    lines = run(capfd, "inspect", path)
    assert len(lines) <= 12, lines  # the same lines for 2 layers as for 12: nothing listed per layer
    assert (
        f"  input past_key_values.{{0..{layers - 1}}}.{{key,value}} ({2 * layers}): float32 [batch, 1, past, 64]"
        in lines
    )
    assert (
        f"  output present.{{0..{layers - 1}}}.{{key,value}} ({2 * layers}): float32 [batch, 1, past + seq, 64]"
        in lines
    )
    assert "opsets ai.onnx 17" in lines[0] and "{" not in lines[0]  # not a Python dict
    assert re.match(rf"{re.escape(str(path))}: \d+\.\d (KiB|MiB), IR 8, ", lines[0])  # size for people
    skipped = [line for line in lines if line.startswith("  not quantized")]
    assert (
        len(skipped) == 2 and f"not quantized {2 * layers} nodes (e.g. model.layers.0.self_attn.scores)" in skipped[0]
    )
    assert "lm_head" in skipped[1] and "also read by Gather 'embed'" in skipped[1]


def test_verbose_lists_everything(tmp_path, capfd):
    path = tiny_llm_graph(tmp_path / "m.onnx", layers=3)
    lines = run(capfd, "inspect", path, "--verbose")
    assert "  input past_key_values.2.value: float32 [batch, 1, past, 64]" in lines
    assert sum(line.startswith("  output present.") for line in lines) == 6
    assert sum(line.startswith("  not quantized") for line in lines) == 7
    assert "more type" not in " ".join(lines)


def test_quantizable_count_is_what_quantize_quantizes(tmp_path, capfd):
    """The tied lm_head: quantize leaves it in float (its table stays for the Gather), so inspect does not count it."""
    path = tiny_llm_graph(tmp_path / "m.onnx", layers=2)
    summary = qonnx.quantize(path, output=tmp_path / "q.onnx", verify=False)
    info = inspect_model(path)
    assert info["quantizable_layers"] == len(summary.quantized)
    assert {layer["node"] for layer in info["layers"] if layer["quantizable"]} == {r.node for r in summary.quantized}
    lines = run(capfd, "inspect", path)
    assert f"quantizable layers: {len(summary.quantized)} of {len(summary.layers)} MatMul nodes" in " ".join(lines)
    as_json = json.loads("\n".join(run(capfd, "inspect", path, "--json")))
    assert as_json["quantizable_layers"] == len(summary.quantized) and as_json["quantizable_by"] == "w4a16"


def test_group_names():
    d, e = "float32 [2]", "int64 [2]"
    items = [(f"past.{i}.{kv}", d) for i in range(3) for kv in ("key", "value")]
    assert group_names(items) == [("past.{0..2}.{key,value}", 6, d)]
    assert group_names([("a1", d), ("a3", d), ("a7", d), ("b", d)]) == [("a{1,3,7}", 3, d), ("b", 1, d)]
    assert group_names([("x.0", d), ("x.1", e)]) == [("x.0", 1, d), ("x.1", 1, e)]  # types differ: apart
    assert group_names([("x.01", d), ("x.02", d)]) == [("x.{01,02}", 2, d)]
