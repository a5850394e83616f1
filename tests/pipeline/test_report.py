"""Per-layer reports: a damaged layer ranks first, files and CLI, float zero points."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from builders import lookup_model
from click.testing import CliRunner
from onnx import numpy_helper

import qonnx
from qonnx.cli import cli
from qonnx.models import build_decoder_stack
from qonnx.pipeline.report import layer_report, write_report


@pytest.fixture
def pair(tmp_path):
    src = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=64, intermediate=128, layers=2, vocab=80)
    return src, tmp_path


@pytest.mark.parametrize("fmt", ["matmulnbits", "qdq"])
def test_report_ranks_a_damaged_layer_first(pair, fmt):
    src, tmp = pair
    qonnx.quantize(src, qonnx.W8A16(block_size=32, format=fmt), output=tmp / "q.onnx", verify=False)
    rows = layer_report(src, tmp / "q.onnx")
    assert len(rows) == 11 and all(r.weight_sqnr_db > 35 for r in rows)
    # damage one layer's codes: it must come out worst, on weights and outputs
    m = onnx.load(tmp / "q.onnx")
    target = next(i for i in m.graph.initializer if "layers.1.mlp.down_proj" in i.name and i.data_type == 2)
    arr = numpy_helper.to_array(target)
    target.CopyFrom(
        numpy_helper.from_array(np.random.default_rng(0).permutation(arr.ravel()).reshape(arr.shape), target.name)
    )
    onnx.save(m, tmp / "bad.onnx")
    bad = layer_report(src, tmp / "bad.onnx")
    assert "layers.1.mlp.down_proj" in bad[0].weight and bad[0].weight_sqnr_db < 10
    assert bad[0].output_sqnr_db is not None and bad[0].output_sqnr_db < min(r.output_sqnr_db for r in rows)


def test_report_files_and_cli(pair):
    src, tmp = pair
    qonnx.quantize(src, qonnx.W4A16(block_size=32), output=tmp / "q.onnx", verify=False)
    rows = layer_report(src, tmp / "q.onnx")
    files = write_report(rows, tmp / "r" / "report.html", title="t")
    assert [f.suffix for f in files] == [".html", ".png", ".png"] and all(f.stat().st_size > 0 for f in files)
    res = CliRunner().invoke(cli, ["report", str(src), str(tmp / "q.onnx"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert len(data) == 11 and data[0]["output_sqnr_db"] <= data[-1]["output_sqnr_db"]
    res = CliRunner().invoke(cli, ["report", str(src), str(tmp / "q.onnx"), "-o", str(tmp / "r.md")])
    assert res.exit_code == 0 and (tmp / "r.md").read_text().startswith("# ")
    text = (tmp / "r.md").read_text()
    assert (
        re.search(r"weights \d+\.\d (KiB|MiB) -> \d+\.\d (KiB|MiB)\.", text) and " bytes" not in text
    )  # sizes for people


def test_report_reads_float_zero_points(pair):
    """HQQ's MatMulNBits zero points are floats: the report dequantizes them as ONNX Runtime does."""
    src, tmp = pair
    qonnx.quantize(src, qonnx.W4A16(block_size=32, algo="hqq"), output=tmp / "h.onnx", verify=False)
    qonnx.quantize(src, qonnx.W4A16(block_size=32), output=tmp / "r.onnx", verify=False)
    hqq, rtn = layer_report(src, tmp / "h.onnx"), layer_report(src, tmp / "r.onnx")
    assert len(hqq) == 11
    by_weight = {r.weight: r.weight_sqnr_db for r in rtn}
    assert all(r.weight_sqnr_db >= by_weight[r.weight] - 1e-6 for r in hqq)  # least squared error per block


def test_report_on_unrelated_models_is_a_clear_error(pair):
    from qonnx.core.errors import QonnxError

    src, _ = pair
    with pytest.raises(QonnxError, match="no quantized layer"):
        layer_report(src, src)


def test_report_ranks_a_quantized_embedding_table(tmp_path):
    src, table = lookup_model(tmp_path / "m.onnx", 64, tied=True)
    out = tmp_path / "q" / "model.onnx"
    qonnx.quantize(src, qonnx.W4A16(block_size=32, embeddings=4), output=out, verify=False)
    rows = {r.op_type: r for r in layer_report(src, out)}
    gather = rows["Gather"]
    assert gather.weight == "table" and gather.shape == table.shape
    assert 15 < gather.weight_sqnr_db < 30 and gather.output_sqnr_db is not None
    assert gather.bytes_before == table.nbytes and gather.bytes_after < table.nbytes / 6
