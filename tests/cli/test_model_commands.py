"""qonnx export / eval / generate / lower from the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
from builders import SENTENCES, tiny_causal_lm, tiny_encoder, tiny_wordpiece
from click.testing import CliRunner
from helpers import assert_one_line_error, onnx_io, qonnx_cli

import qonnx
from qonnx.cli import cli, main
from qonnx.core.errors import ModelLoadError
from qonnx.passes.lower import FuseForOrtPass
from qonnx.runtime.evaluate import perplexity


@pytest.mark.slow
def test_cli_export_and_errors(tmp_path):
    from qonnx.cli.export import export_command

    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "hf")
    result = CliRunner().invoke(export_command, [str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--no-kv-cache"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.onnx").is_file()
    result = CliRunner().invoke(export_command, [str(tmp_path / "nope"), "-o", str(tmp_path / "o2")])
    assert isinstance(result.exception, ModelLoadError)


@pytest.mark.slow
def test_cli_export_encoder(tmp_path):
    from qonnx.cli.export import export_command

    tiny_encoder("roberta").save_pretrained(tmp_path / "hf")
    tiny_wordpiece().save_pretrained(tmp_path / "hf")
    result = CliRunner().invoke(export_command, [str(tmp_path / "hf"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "max |hidden states" in result.stderr
    assert list(onnx_io(tmp_path / "out" / "model.onnx")[0]) == ["input_ids", "attention_mask"]
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_cli_eval_json(perplexity_llama):
    from qonnx.cli.models import eval_command

    _, _, dirs, corpus = perplexity_llama
    args = [
        str(dirs[False]),
        "--task",
        "perplexity",
        "--data",
        str(corpus),
        "--seq-len",
        "16",
        "--windows",
        "3",
        "--json",
        "--no-progress",
    ]
    result = CliRunner().invoke(eval_command, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["perplexity"] == pytest.approx(
        perplexity(dirs[False], data=str(corpus), seq_len=16, windows=3, progress=False)["perplexity"]
    )
    text = CliRunner().invoke(eval_command, [*args[:-2], "--no-progress"])
    assert text.exit_code == 0 and text.stdout.startswith("perplexity ")


def test_cli_eval_similarity(bert_encoders):
    from qonnx.cli.models import eval_command

    fp32, w8, data = bert_encoders
    args = [str(w8), "--task", "similarity", "--data", str(data), "--reference", str(fp32), "--no-progress"]
    result = CliRunner().invoke(eval_command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["mean_cosine"] > 0.99 and found["samples"] == len(SENTENCES)
    text = CliRunner().invoke(eval_command, args)
    assert text.exit_code == 0 and text.stdout.startswith("cosine to reference ")
    alone = CliRunner().invoke(eval_command, [str(fp32), "--task", "similarity", "--data", str(data), "--no-progress"])
    assert alone.exit_code == 0 and alone.stdout.startswith("pairwise cosine")
    bad = CliRunner().invoke(eval_command, [str(fp32), "--reference", str(fp32)])
    assert bad.exit_code == 2 and "--task similarity" in bad.output


def test_cli_generate_on_quantized_model(generation_llama, tmp_path):
    _, root = generation_llama
    qonnx.quantize(root / "kv", qonnx.W8A16(block_size=16), output=tmp_path / "q")
    res = CliRunner().invoke(
        cli, ["generate", str(tmp_path / "q"), "--prompt", "the fox", "--raw", "--max-new-tokens", "5", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{") :])
    assert 1 <= len(out["tokens"]) <= 5


def test_cli_lower_writes_a_verified_folder(llama, tmp_path, capsys):
    src = Path(shutil.copytree(llama.parent, tmp_path / "src"))  # the session's export is shared: a copy
    (src / "tokenizer.json").write_text("{}")  # stands for the files beside the model
    out = tmp_path / "low"
    assert main(["lower", str(src), "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fused"]["GroupQueryAttention"] == 2
    assert summary["top1_agreement"] == 1.0 and summary["max_abs_diff"]["logits"] < 1e-4
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["qonnx.lowered"])["target"] == "cpu"
    from qonnx.core.modelfile import load

    assert any(n.op_type == "SimplifiedLayerNormalization" for n in load(out).graph)  # our loader accepts it

    # Lowering again, writing over the input, or a bad target: one line, exit 2.
    assert main(["lower", str(out), "-o", str(tmp_path / "again")]) == 2
    assert "already holds fused ops" in capsys.readouterr().err
    assert main(["lower", str(src), "-o", str(src)]) == 2
    assert "input folder" in capsys.readouterr().err
    assert main(["lower", str(src), "-o", str(tmp_path / "x"), "--target", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_lower_refuses_a_model_that_computes_other_numbers(llama, tmp_path, capsys, monkeypatch):
    import qonnx.pipeline.lowering

    monkeypatch.setattr(qonnx.pipeline.lowering, "TOLERANCE", {"tensor(float)": -1.0})
    out = tmp_path / "low"
    assert main(["lower", str(llama.parent), "-o", str(out)]) == 3
    assert "differs from the input" in capsys.readouterr().err
    assert not (out / "model.onnx").exists()


def _scale_first_norm(model):
    """A wrong fused RMSNorm: its weight 1% off (its output only feeds a QuantizeLinear)."""
    node = next(n for n in model.graph if n.op_type == "SimplifiedLayerNormalization")
    weight = ir.val("wrong_weight", const_value=ir.tensor(node.inputs[1].const_value.numpy() * 1.01))
    model.graph.register_initializer(weight)
    node.replace_input_with(1, weight)


def _bypass_first_qdq(model):
    """A fusion across a quantize/dequantize pair: its readers take the float tensor, the pair is dropped."""
    quant = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    dequant = next(iter(quant.outputs[0].uses())).node
    ir.convenience.replace_all_uses_with(dequant.outputs[0], quant.inputs[0])
    model.graph.remove([dequant, quant], safe=True)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(_scale_first_norm, "(read by QuantizeLinear"), (_bypass_first_qdq, "the lowered model lost QuantizeLinear")],
)
def test_cli_lower_refuses_a_wrong_fusion_of_a_quantized_model(
    llama_w8a8, tmp_path, capsys, monkeypatch, corrupt, message
):
    fused = FuseForOrtPass.call

    def call(self, model):
        result = fused(self, model)
        corrupt(model)
        return result

    monkeypatch.setattr(FuseForOrtPass, "call", call)
    out = tmp_path / "low.onnx"
    assert main(["lower", str(llama_w8a8), "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_refusals_name_options_of_the_command_run(bert_encoders, tmp_path):
    """An encoder without logits: `quantize --scheme w8a8` without a .npz names quantize's --calib-data (not
    eval's --task similarity); `eval` (perplexity) names --task similarity."""
    fp32, _, _ = bert_encoders
    res = qonnx_cli("quantize", fp32, "-o", tmp_path / "q", "--scheme", "w8a8")
    assert_one_line_error(res, "not a causal LM", "--calib-data")
    assert "--task" not in res.stderr and not (tmp_path / "q").exists()
    assert_one_line_error(qonnx_cli("eval", fp32, "--seq-len", "64", "--no-progress"), "--task similarity")
    assert_one_line_error(qonnx_cli("eval", fp32, "--no-progress"), "--seq-len 512 exceeds")
