"""qonnx export X.gguf --keep-quantization: a tiny Llama GGUF built in the test, kept and checked."""

from __future__ import annotations

import gguf
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from builders import tiny_llama_gguf
from helpers import assert_one_line_error, qonnx_cli

from qonnx.core import formats
from qonnx.models.export import export_causal_lm
from qonnx.pipeline.keep_gguf import export_kept


def _kept_weights(path) -> dict[str, np.ndarray]:
    """Each MatMulNBits node's weight [N, K] as its initializers say (scales widened by their Cast)."""
    model = ir.load(path)
    found = {}
    for node in model.graph:
        if node.op_type != "MatMulNBits":
            continue
        cast = node.inputs[2].producer()
        assert cast is not None and cast.op_type == "Cast"
        arrays = {"B": node.inputs[1].const_value.numpy(), "scales": cast.inputs[0].const_value.numpy()}
        attrs = {a: node.attributes.get_int(a) for a in ("K", "N", "bits", "block_size")}
        qw = formats.QuantizedWeight("matmulnbits", arrays, attrs, attrs["K"], attrs["N"], attrs["bits"])
        found[node.name.rsplit("_Q", 1)[0]] = qw.dequantize().T  # the MatMul it replaced: node_linear_3 -> _Q4
    return found


@pytest.mark.slow
@pytest.mark.parametrize("linear", ["Q4_0", "Q4_1"])
def test_tiny_gguf_kept(tmp_path, linear):
    path = tiny_llama_gguf(tmp_path / "tiny.gguf", linear, "Q8_0")
    result = export_kept(path, tmp_path / "kept", quiet=True)
    counts = {t: sum(layer.type == t for layer in result.layers) for t in ("Q8_0", linear)}
    assert counts == {"Q8_0": 1, linear: 14}  # 2 layers x 7 projections, and the lm_head (its own table here)
    assert result.bits_per_weight < 8.5
    assert result.verification.verified and result.verification.logits.top1_agreement == 1.0
    # The kept codes and scales are the GGUF's, bit for bit (Q4_0 / Q8_0: MatMulNBits' own form).
    reader = gguf.GGUFReader(path)
    dequantized = {t.name: gguf.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    weights = _kept_weights(result.path)
    by_node = {layer.node: layer.tensor for layer in result.layers}
    compared = 0
    for node, w in weights.items():
        tensor = by_node[node]
        if "attn_q" in tensor or "attn_k" in tensor:
            continue  # rows moved by the loader's permutation: compared through the logits below
        if dequantized[tensor].shape == w.shape and (linear == "Q4_0" or tensor == "token_embd.weight"):
            np.testing.assert_array_equal(w, dequantized[tensor], err_msg=tensor)
            compared += 1
    assert compared == (11 if linear == "Q4_0" else 1)  # v, o, gate, up, down x 2 and the head; Q4_1: the head
    # Against the float export of the same file: float32 rounding only.
    float_path = export_causal_lm(path, tmp_path / "float", verify=False, quiet=True)
    feed = {
        "input_ids": np.array([[1, 5, 9, 17, 33, 65]], np.int64),
        "attention_mask": np.ones((1, 6), np.int64),
        "position_ids": np.arange(6, dtype=np.int64)[None],
    }
    outs = []
    for p in (float_path, result.path):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        names = [i.name for i in s.get_inputs()]
        full = {n: feed.get(n, np.zeros((1, 2, 0, 16), np.float32)) for n in names}
        outs.append(s.run(["logits"], full)[0])
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-4)


def test_keep_quantization_refusals(tmp_path):
    path = tiny_llama_gguf(tmp_path / "f32.gguf", "F32", "F32")
    res = qonnx_cli("export", path, "--keep-quantization", "-o", tmp_path / "out")
    assert_one_line_error(res, "no tensor of a type kept as it is", "F32 x20")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "llama"}')
    res = qonnx_cli("export", tmp_path / "hf", "--keep-quantization", "-o", tmp_path / "out")
    assert_one_line_error(res, "--keep-quantization needs a GGUF source")
    res = qonnx_cli("export", path, "--keep-quantization", "--dtype", "fp16", "-o", tmp_path / "out")
    assert_one_line_error(res, "--keep-quantization exports float32 activations")
