"""The residual-stream rotation: exact in float on exported Llama and Qwen3 graphs, refused where the pattern is not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from builders import tiny_causal_lm

from qonnx.core import modelfile
from qonnx.models.export import export_causal_lm
from qonnx.passes.rotate import RotateResidualPass, RotationError
from qonnx.runtime.session import make_session


def _export(tmp_path_factory, arch: str, **overrides):
    """A tiny causal LM whose norm weights are not ones (folding them must matter), exported with its KV cache."""
    model = tiny_causal_lm(arch, **overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    return export_causal_lm(model, tmp_path_factory.mktemp(arch), dtype="fp32", verify=False, quiet=True)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A tied Llama as SmolLM2's export has it: the head reads ``Transpose(table)`` of the embedding's table.

    (A tiny export folds that Transpose into a second constant; the graph is put back the large models' way.)
    """
    path = _export(tmp_path_factory, "llama", tie_word_embeddings=True)
    model = modelfile.load(path)
    table = next(n for n in model.graph if n.op_type == "Gather").inputs[0]
    head = list(model.graph)[-1]
    assert head.op_type == "MatMul" and np.array_equal(head.inputs[1].const_value.numpy(), table.const_value.numpy().T)
    transpose = ir.node("Transpose", [table], attributes={"perm": [1, 0]}, name="head_transpose")
    transpose.outputs[0].name = "head_weight"
    model.graph.insert_before(head, transpose)
    head.replace_input_with(1, transpose.outputs[0])
    out = path.parent / "tied" / "model.onnx"
    modelfile.save(model, out)
    return out


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return _export(tmp_path_factory, "qwen3", tie_word_embeddings=False)


def _run_both(a, b, *, batch=2, seq=7, seed=0):
    """Prefill, then one decoding step, on both models: (reference outputs, rotated outputs) per step."""
    sa, sb = make_session(a), make_session(b)
    inputs = sa.get_inputs()
    vocab = sa.get_outputs()[0].shape[-1]
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, vocab, (batch, seq)),
        "attention_mask": np.ones((batch, seq), np.int64),
        "position_ids": np.arange(seq)[None].repeat(batch, 0),
    }
    feed.update({i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in inputs[3:]})
    pairs = [(sa.run(None, feed), sb.run(None, feed))]
    step = {
        "input_ids": rng.integers(0, vocab, (batch, 1)),
        "attention_mask": np.ones((batch, seq + 1), np.int64),
        "position_ids": np.full((batch, 1), seq),
    }
    step.update({i.name: v for i, v in zip(inputs[3:], pairs[0][0][1:], strict=True)})
    pairs.append((sa.run(None, step), sb.run(None, step)))
    return pairs


def _rotate(path, out, rotation="hadamard", **kw):
    model = modelfile.load(path)
    step = RotateResidualPass(rotation, **kw)
    step(model)
    modelfile.save(model, out)
    return step, model


@pytest.mark.parametrize("rotation", ["hadamard", "random"])
@pytest.mark.parametrize("arch", ["tied_llama", "qwen3"])
def test_rotated_float_model_gives_the_same_outputs(arch, rotation, request, tmp_path):
    path = request.getfixturevalue(arch)
    step, model = _rotate(path, tmp_path / "rot.onnx", rotation)
    worst = 0.0
    for ref, out in _run_both(path, tmp_path / "rot.onnx"):
        for r, o in zip(ref, out, strict=True):
            worst = max(worst, float(np.abs(r - o).max()))
            np.testing.assert_allclose(o, r, atol=2e-5, rtol=1e-4)
    assert worst > 0  # the weights did change
    # every RMSNorm on the stream is weightless now; an online Hadamard sits before each down projection
    ones = [v for name, v in model.graph.initializers.items() if name.startswith("rotate_norm_ones")]
    assert ones and all(np.all(v.const_value.numpy() == 1) for v in ones)
    assert sum("hadamard" in name for name in step.kept_float) == 2 * 2  # two layers, MatMul by H_p and H_m


def test_tied_head_keeps_one_table(tied_llama, tmp_path):
    step, model = _rotate(tied_llama, tmp_path / "rot.onnx")
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None)
    table = gather.inputs[0]
    readers = {u.op_type for u, _ in table.uses()}
    assert readers == {"Gather", "Transpose"}, readers  # the head still reads the embedding table
    assert any("tied head" in note for note in step.notes)
    assert any(name.startswith("rotate_tied_head_norm") for name in step.kept_float)


def test_untied_head_folds_the_final_norm(qwen3, tmp_path):
    step, _ = _rotate(qwen3, tmp_path / "rot.onnx")
    assert not any("tied head" in note for note in step.notes)
    assert not any(name.startswith("rotate_tied_head_norm") for name in step.kept_float)


def test_without_online_hadamard(qwen3, tmp_path):
    step, _ = _rotate(qwen3, tmp_path / "rot.onnx", online=False)
    assert step.kept_float == []
    for ref, out in _run_both(qwen3, tmp_path / "rot.onnx"):
        np.testing.assert_allclose(out[0], ref[0], atol=2e-5, rtol=1e-4)


def test_refused_when_the_stream_is_read_elsewhere(tied_llama):
    """A residual value that is also a graph output cannot be rotated; nothing changes."""
    model = modelfile.load(tied_llama)
    add = next(n for n in model.graph if n.op_type == "Add" and any(u.op_type == "Pow" for u, _ in n.outputs[0].uses()))
    model.graph.outputs.append(add.outputs[0])
    before = {k: v.const_value.numpy().copy() for k, v in model.graph.initializers.items() if "layers.0" in k}
    with pytest.raises(RotationError, match="graph output"):
        RotateResidualPass("hadamard")(model)
    after = {k: v.const_value.numpy() for k, v in model.graph.initializers.items() if "layers.0" in k}
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_refused_without_rmsnorm(tmp_path):
    """LayerNorm (GPT-2) subtracts the mean: not rotation invariant, and not the pattern."""
    from builders import tiny_causal_lm as build  # the same builder, another architecture

    path = export_causal_lm(build("gpt2"), tmp_path, dtype="fp32", verify=False, quiet=True)
    with pytest.raises(RotationError, match="rotation: "):
        RotateResidualPass("random")(ir.load(path))
