"""Embedding tables in 4 or 8 bits: GatherBlockQuantized rows equal the dequantized table, one stored copy for a
tied lm_head, logits close to the float model's, refusals where a table cannot be done.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import EMBEDDING_ROWS as V
from builders import lookup_model, matmul_model, tie_lm_head, tiny_causal_lm
from helpers import run, sqnr_db
from onnx import TensorProto, helper, numpy_helper

import qonnx
from qonnx.core import packing
from qonnx.core.errors import ConfigError
from qonnx.models.export import export_causal_lm


def dequantized_rows(model: onnx.ModelProto, h: int) -> np.ndarray:
    """The [V, h] table the GatherBlockQuantized node stands for, decoded here from its stored initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in model.graph.node if n.output[0] == gbq.input[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in gbq.attribute}
    b, scales = inits[reshape.input[0]], inits[gbq.input[2]]
    zp = inits[gbq.input[3]] if len(gbq.input) > 3 else None
    bits, block = attrs["bits"], attrs["block_size"]
    codes, zps = packing.unpack_matmulnbits(b, zp, k=h, n=b.shape[0], bits=bits, block_size=block)
    rows = np.arange(h) // block
    return ((codes.astype(np.float32) - zps[:, rows]) * scales.astype(np.float32)[:, rows]).astype(scales.dtype)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize(
    ("bits", "h", "block", "dtype"),
    [(4, 64, 32, np.float32), (8, 64, 16, np.float32), (4, 96, 64, np.float32), (4, 64, 32, np.float16)],
)  # 96: a ragged last block
def test_gathered_rows_equal_the_dequantized_table(tmp_path, tied, bits, h, block, dtype):
    src, table = lookup_model(tmp_path / "m.onnx", h, tied=tied, dtype=dtype)
    out = tmp_path / "q" / "model.onnx"
    summary = qonnx.quantize(src, qonnx.W4A16(block_size=block, embeddings=bits), output=out, verify=False)
    q = onnx.load(out)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    onnx.checker.check_model(q, full_check=True)
    # the rows the model returns: exactly the table decoded from the stored codes, scales and zero points
    expect = dequantized_rows(q, h)
    assert expect.shape == table.shape
    probe = onnx.load(out)
    gather_out = next(n for n in probe.graph.node if n.op_type == "MatMulNBits" and n.name.startswith("mlp")).input[0]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    probe.graph.output.append(helper.make_tensor_value_info(gather_out, elem, None))
    onnx.save(probe, tmp_path / "probe.onnx")
    ids = np.arange(V, dtype=np.int64).reshape(1, V)
    rows = run(tmp_path / "probe.onnx", {"ids": ids})[-1][0]
    np.testing.assert_array_equal(rows, expect)
    step = 2 ** (bits - 1)
    assert (
        sqnr_db(table, expect) > (15 if bits == 4 else 35) and np.abs(expect - table).max() < np.abs(table).max() / step
    )
    gather = next(r for r in summary.layers if r.op_type == "Gather")
    assert gather.quantized and f"{bits} bits" in gather.reason
    head = next(r for r in summary.layers if r.node == "lm_head")
    assert head.quantized and (head.shared_with == "embed") == tied


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_head_reads_the_one_stored_copy(tmp_path, bits):
    h = 64
    src, _ = lookup_model(tmp_path / "m.onnx", h, tied=True)
    out = tmp_path / "q" / "model.onnx"
    qonnx.quantize(src, qonnx.W4A16(block_size=32, embeddings=bits), output=out, verify=False)
    q = onnx.load(out)
    head = next(n for n in q.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits")
    gbq = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in q.graph.node if n.output[0] == gbq.input[0])
    assert reshape.op_type == "Reshape" and reshape.input[0] == head.input[1]  # the Gather's data is the head's B
    assert list(gbq.input[2:]) == list(head.input[2:4])  # and the same scales and zero points
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in q.graph.initializer}
    table_bytes = V * h * bits // 8
    assert [n for n, size in sizes.items() if size >= table_bytes] == [head.input[1]]  # one copy of the codes
    scales_bytes = V * (h // 32) * 4
    zp_bytes = V * -(-(h // 32) * bits // 8)
    assert (
        sizes[head.input[1]] == table_bytes
        and sizes[head.input[2]] == scales_bytes
        and sizes[head.input[3]] == zp_bytes
    )
    assert sum(sizes.values()) < table_bytes + scales_bytes + zp_bytes + h * h  # codes once, the mlp's 4-bit weight
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [V, h] for t in q.graph.initializer)
    level = {a.name: helper.get_attribute_value(a) for a in head.attribute}.get("accuracy_level")
    assert level == (4 if bits == 8 else None)  # ONNX Runtime's 8-bit kernel is slow with float activations
    ids = {"ids": np.arange(V, dtype=np.int64).reshape(4, -1)}
    float_table = qonnx.quantize(src, qonnx.W4A16(block_size=32), output=tmp_path / "f" / "model.onnx", verify=False)
    ref = run(src, ids)[0]
    base = sqnr_db(ref, run(float_table.outputs[0], ids)[0])  # the 4-bit mlp's error alone
    assert sqnr_db(ref, run(out, ids)[0]) > base - (1 if bits == 8 else 6)  # logits close to the float model's


def test_tied_head_keeps_a_given_accuracy_level(tmp_path):
    src, _ = lookup_model(tmp_path / "m.onnx", 64, tied=True)
    out = tmp_path / "q" / "model.onnx"
    qonnx.quantize(src, qonnx.W4A16(block_size=32, embeddings=8, accuracy_level=1), output=out, verify=False)
    head = next(n for n in onnx.load(out).graph.node if n.output[0] == "logits")
    assert {a.name: helper.get_attribute_value(a) for a in head.attribute}["accuracy_level"] == 1


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tiny Llama whose lm_head reads the embedding table through a Transpose, as SmolLM2's export does."""
    out = tmp_path_factory.mktemp("llama-tied")
    path = export_causal_lm(
        tiny_causal_lm("llama", tie_word_embeddings=True), out, dtype="fp32", verify=False, quiet=True
    )
    return tie_lm_head(path)


@pytest.mark.slow
def test_tied_llama_logits_close_to_float(tied_llama, tmp_path):
    feeds = _feeds(tied_llama)
    ref = run(tied_llama, feeds)[0]
    float_table = qonnx.quantize(tied_llama, qonnx.W4A16(block_size=32), output=tmp_path / "f" / "model.onnx")
    q8 = qonnx.quantize(tied_llama, qonnx.W4A16(block_size=32, embeddings=8), output=tmp_path / "e8" / "model.onnx")
    q4 = qonnx.quantize(tied_llama, qonnx.W4A16(block_size=32, embeddings=4), output=tmp_path / "e4" / "model.onnx")
    base = sqnr_db(ref, run(float_table.outputs[0], feeds)[0])
    assert sqnr_db(ref, run(q8.outputs[0], feeds)[0]) > base - 0.5  # 8-bit table: as close as the float table
    assert sqnr_db(ref, run(q4.outputs[0], feeds)[0]) > base - 6
    assert q4.bytes_after < q8.bytes_after < float_table.bytes_after
    assert q8.verification.outputs[0].top1_agreement >= 0.9  # the verification runs the new ops too


def _feeds(path):
    m = onnx.load(path, load_external_data=False)
    feeds = {}
    ids = np.array([[1, 5, 9, 17, 33, 65, 100, 7]], np.int64)
    for i in m.graph.input:
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        else:
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = np.zeros([1, dims[1], 0, dims[3]], np.float32)
    return feeds


def test_refused_in_one_line_where_the_table_must_stay(tmp_path):
    src, _ = lookup_model(tmp_path / "m.onnx", 64, tied=True, extra_reader=True)
    with pytest.raises(ConfigError, match="embeddings=4 cannot be done: table 'table': the float table stays") as e:
        qonnx.quantize(src, qonnx.W4A16(block_size=32, embeddings=4), output=tmp_path / "q.onnx")
    assert "\n" not in str(e.value)
    src, _ = lookup_model(tmp_path / "m.onnx", 64, tied=True)
    with pytest.raises(ConfigError, match="tied MatMul 'lm_head' is kept in floating point"):
        qonnx.quantize(
            src, qonnx.W4A16(block_size=32, embeddings=8), targets={"lm_head": None}, output=tmp_path / "q.onnx"
        )
    no_table = tmp_path / "plain.onnx"
    matmul_model(no_table, np.ones((64, 32), np.float32))
    with pytest.raises(ConfigError, match="no Gather reads a constant 2-D float table"):
        qonnx.quantize(no_table, qonnx.W4A16(embeddings=4), output=tmp_path / "p" / "model.onnx")


def test_default_keeps_the_table_float(tmp_path):
    src, _ = lookup_model(tmp_path / "m.onnx", 64, tied=True)
    summary = qonnx.quantize(src, qonnx.W4A16(block_size=32), output=tmp_path / "q" / "model.onnx", verify=False)
    ops = [n.op_type for n in onnx.load(summary.outputs[0]).graph.node]
    assert "Gather" in ops and "GatherBlockQuantized" not in ops
    assert not any(r.op_type == "Gather" for r in summary.layers)


def test_embeddings_of_an_already_quantized_model(tmp_path):
    src, _ = lookup_model(tmp_path / "m.onnx", 64, tied=True)
    w4 = qonnx.quantize(src, qonnx.W4A16(block_size=32), output=tmp_path / "w4" / "model.onnx", verify=False)
    again = qonnx.quantize(
        w4.outputs[0], qonnx.W4A16(block_size=32, embeddings=8), output=tmp_path / "e8" / "model.onnx"
    )
    ops = [n.op_type for n in onnx.load(again.outputs[0]).graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 2
    assert again.bytes_after < w4.bytes_after and {r.op_type for r in again.quantized} == {"Gather", "MatMul"}
