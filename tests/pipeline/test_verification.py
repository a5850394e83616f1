"""Verification in qonnx.quantize: metadata, refusals that write nothing, the original run early and aside."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import onnx
import pytest
from builders import (
    always_zero,
    cnn_zero_at_1x1,
    detector_with_resize,
    matmul_model,
    recurrent_with_state,
    tiny_causal_lm,
    tiny_tokenizer,
)
from helpers import assert_one_line_error, qonnx_cli
from onnx import helper, numpy_helper

import qonnx
from qonnx.core import modelfile
from qonnx.core.errors import QonnxError
from qonnx.passes.weight_only import QuantizeWeightsPass
from qonnx.pipeline import verification as verification_module
from qonnx.pipeline.verification import VerificationError, VerifyOptions, start_reference_early
from qonnx.runtime import verify as verify_module
from qonnx.runtime.session import InMemoryModel
from qonnx.runtime.verify import (
    ReferenceRun,
    verify_models,
)


def test_metadata_and_summary(tmp_path, tiny_model):
    s = qonnx.quantize(tiny_model, qonnx.W8A16(block_size=32), output=tmp_path / "q.onnx")
    assert s.verification.ran and s.verification.worst_sqnr > 30
    props = {p.key: p.value for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert props["qonnx.version"] == qonnx.__version__
    assert json.loads(props["qonnx.config"])["scheme"] == "w8a16"
    assert float(props["qonnx.worst_sqnr_db"]) == pytest.approx(s.verification.worst_sqnr, abs=1e-3)
    assert json.loads(props["qonnx.verification"])["outputs"][0]["name"] == "y"


def test_min_sqnr_refuses_and_writes_nothing(tmp_path, tiny_model):
    with pytest.raises(VerificationError):
        qonnx.quantize(
            tiny_model, qonnx.W4A16(block_size=32), output=tmp_path / "q.onnx", verify=VerifyOptions(min_sqnr=60)
        )
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]  # the input alone: no output, no temp files
    res = qonnx_cli("quantize", tiny_model, "-o", tmp_path / "q.onnx", "--min-sqnr", "60")
    assert res.returncode == 3 and "below --min-sqnr 60" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_garbage_model_warns_loudly(tmp_path, rng, capsys):
    """A weight with one huge outlier per block destroys 4-bit precision: the run must say so."""
    w = rng.standard_normal((64, 16)).astype(np.float32)
    w[::16] = 1e4
    src = matmul_model(tmp_path / "m.onnx", w)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    x[:, ::16] = 0  # the outlier channels are silent: the output is made of the weights rounded away
    s = qonnx.quantize(
        src, qonnx.W4A16(block_size=16), output=tmp_path / "q.onnx", verify=VerifyOptions(feeds=[{"x": x}])
    )
    assert s.verification.worst_sqnr < 10
    assert "WARNING" in capsys.readouterr().err


def test_no_verify(tmp_path, tiny_model):
    s = qonnx.quantize(tiny_model, output=tmp_path / "q.onnx", verify=False)
    assert not s.verification.ran and "disabled" in s.verification.note


def test_original_with_ir_version_onnx_runtime_refuses(tmp_path, rng):
    """onnx 1.23's helpers write IR 14, which ONNX Runtime 1.31 refuses: verification compares with a copy
    at a version it accepts, and the output is written at that version."""
    w = rng.standard_normal((64, 32)).astype(np.float32)
    path = matmul_model(tmp_path / "m.onnx", w)
    m = onnx.load(path)
    m.ir_version = 14
    onnx.save(m, path)
    s = qonnx.quantize(path, qonnx.W8A16(block_size=32), output=tmp_path / "q.onnx")
    assert s.verification.ran and s.verification.worst_sqnr > 30
    assert onnx.load(tmp_path / "q.onnx").ir_version <= 13
    s2 = qonnx.quantize(qonnx.load(path), qonnx.W8A16(block_size=32))
    assert s2.verification.ran and s2.verification.worst_sqnr > 30


def test_quantize_runs_the_original_while_quantizing(tmp_path, tiny_model, monkeypatch):
    """The original is started before the weights are quantized and runs off the main thread."""
    events: list[str] = []
    start, run, call = ReferenceRun.start, ReferenceRun.run, QuantizeWeightsPass.call
    monkeypatch.setattr(ReferenceRun, "start", lambda self: (events.append("start"), start(self))[1])
    monkeypatch.setattr(ReferenceRun, "run", lambda self: (events.append(threading.current_thread().name), run(self)))
    monkeypatch.setattr(QuantizeWeightsPass, "call", lambda self, m: (events.append("quantize"), call(self, m))[1])
    s = qonnx.quantize(tiny_model, qonnx.W8A16(block_size=32), output=tmp_path / "q.onnx")
    assert s.verification.ran and s.verification.worst_sqnr > 30
    assert events.index("start") < events.index("quantize")
    assert "qonnx-verify-reference" in events and "MainThread" not in events


def test_background_errors_surface_and_nothing_is_written(tmp_path, tiny_model):
    """ONNX Runtime refusing the made-up inputs in the background thread is reported like any verification error."""
    with pytest.raises(QonnxError, match=r"verification could not run the models: .*Invalid rank for input: x"):
        qonnx.quantize(tiny_model, output=tmp_path / "q.onnx", verify=VerifyOptions(shapes={"x": (2,)}))
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]


def test_quantized_model_verified_from_memory_while_written(tmp_path, tiny_model, monkeypatch):
    """The quantized model is compared from memory in a background thread that overlaps the writing, with the
    figures of the written file; the file is written from the same snapshot. A refusal there still leaves
    nothing written."""
    events: list[tuple[object, str]] = []
    session, write = verify_module.verification_session, modelfile.write_snapshot
    monkeypatch.setattr(
        verify_module,
        "verification_session",
        lambda m, *a, **k: (events.append((m, threading.current_thread().name)), session(m, *a, **k))[1],
    )
    monkeypatch.setattr(
        modelfile, "write_snapshot", lambda m, p: (events.append((m, threading.current_thread().name)), write(m, p))[1]
    )
    s = qonnx.quantize(tiny_model, qonnx.W4A16(block_size=32), output=tmp_path / "q.onnx")
    by_thread = {thread: m for m, thread in events}  # the original is run from its file on a third thread
    assert isinstance(by_thread["MainThread"], InMemoryModel)
    assert by_thread["qonnx-verify-quantized"] is by_thread["MainThread"]
    from_file = verify_models(tiny_model, tmp_path / "q.onnx")
    assert [m.to_dict() for m in s.verification.outputs] == [m.to_dict() for m in from_file]
    props = {p.key: p.value for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert float(props["qonnx.worst_sqnr_db"]) == pytest.approx(s.verification.worst_sqnr, abs=1e-3)
    with pytest.raises(VerificationError):
        qonnx.quantize(
            tiny_model, output=tmp_path / "r.onnx", verify=VerifyOptions(min_sqnr=s.verification.worst_sqnr + 1)
        )
    assert not (tmp_path / "r.onnx").exists() and not list(tmp_path.glob(".r.onnx*"))


def test_reference_started_early_is_taken_over(tmp_path, tiny_model, monkeypatch):
    """The CLI starts the original's run before quantize is imported; quantize takes that run over instead of
    starting another. Nothing starts where verification would not run."""
    starts: list[str] = []
    start = ReferenceRun.start
    monkeypatch.setattr(ReferenceRun, "start", lambda self: (starts.append(str(self.original)), start(self))[1])
    options = VerifyOptions()
    start_reference_early(tiny_model.parent, options)  # a folder without model.onnx: nothing to start
    start_reference_early(tiny_model, VerifyOptions(enabled=False))
    start_reference_early(tiny_model, VerifyOptions(max_bytes=tiny_model.stat().st_size - 1))
    assert starts == []
    start_reference_early(tiny_model, options)
    assert starts == [str(tiny_model)]
    s = qonnx.quantize(tiny_model, qonnx.W8A16(block_size=32), output=tmp_path / "q.onnx", verify=options)
    assert starts == [str(tiny_model)] and s.verification.ran and s.verification.worst_sqnr > 30
    assert not verification_module._EARLY
    qonnx.quantize(tiny_model, qonnx.W8A16(block_size=32), output=tmp_path / "r.onnx", verify=VerifyOptions())
    assert len(starts) == 2  # other options: a run of its own


def test_verified_on_the_calibration_data(tmp_path, tiny_model, rng):
    """A scheme that calibrates on a .npz of feeds is verified on its last batch (the figures of a direct run
    on that batch), and says so; a .npz given for verification alone whose arrays are not named after inputs
    is refused in one line, nothing written."""
    batches = rng.standard_normal((3, 2, 5, 72)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=batches)
    config = qonnx.W8A8(calibration=qonnx.Calibration(data=str(tmp_path / "cal.npz"), samples=2, device="cpu"))
    s = qonnx.quantize(tiny_model, config, output=tmp_path / "q.onnx")
    assert s.verification.inputs == "cal.npz, its last batch (of 3)"
    direct = verify_models(tiny_model, tmp_path / "q.onnx", feeds=[{"x": batches[-1]}])
    assert [m.to_dict() for m in s.verification.outputs] == [m.to_dict() for m in direct]
    props = {p.key: p.value for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert json.loads(props["qonnx.verification"])["inputs"] == "cal.npz, its last batch (of 3)"
    np.savez(tmp_path / "bad.npz", pixels=batches)
    with pytest.raises(QonnxError, match=r"bad.npz: arrays not named after an input of the model: pixels"):
        qonnx.quantize(tiny_model, output=tmp_path / "r.onnx", verify=VerifyOptions(data=str(tmp_path / "bad.npz")))
    assert not (tmp_path / "r.onnx").exists()


@pytest.mark.slow
def test_verified_on_the_calibration_text(tmp_path):
    """An LLM calibrated on a text file is verified on that text's last tokens (through its tokenizer), from
    the CLI too; without calibration data, on the end of the pydoc corpus."""
    from qonnx.models.export import export_causal_lm

    tokenizer = tiny_tokenizer()
    src = export_causal_lm(
        tiny_causal_lm("llama"), tmp_path / "src", tokenizer=tokenizer, quiet=True, verify=False
    ).parent
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 40)
    (tmp_path / "cal.txt").write_text(text)
    ids = verify_module.text_token_ids(src, data=tmp_path / "cal.txt")
    expected = tokenizer(text, add_special_tokens=False)["input_ids"][-verify_module.VERIFY_TOKENS :]
    assert ids is not None and ids.tolist() == [expected]
    res = qonnx_cli(
        "quantize", src, "-o", tmp_path / "out", "--algo", "gptq", "--block-size", "32", "--calib-data",
        tmp_path / "cal.txt", "--calib-samples", "2", "--calib-seq-len", "32", "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["verification"]["inputs"] == "cal.txt, its last 128 tokens"
    s = qonnx.quantize(src, output=tmp_path / "rtn")
    assert s.verification.inputs == "pydoc text, its last 128 tokens"
    # a .npz that gives the token ids alone: the mask, positions and empty KV cache follow their length
    np.savez(tmp_path / "ids.npz", input_ids=np.asarray(expected[:40], np.int64).reshape(2, 1, 20))
    s = qonnx.quantize(src, output=tmp_path / "npz", verify=VerifyOptions(data=str(tmp_path / "ids.npz")))
    assert s.verification.inputs == "ids.npz, its last batch (of 2)" and s.verification.worst_sqnr > 10


def test_default_verification_of_a_bert_quantization(bert_encoders, tmp_path):
    """Quantizing a BERT export with the default verification (no feeds given), as `qonnx quantize` does."""
    fp32, _, _ = bert_encoders
    summary = qonnx.quantize(fp32, qonnx.W8A16(block_size=16), output=tmp_path / "w8")
    assert summary.verification.ran


def _props(path):
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def test_image_model_is_verified_at_a_real_size_not_1x1(tmp_path):
    """A CNN whose output is all zeros on a 1x1 image was certified "SQNR inf, cosine 1.0" there: it is
    verified on a 224x224 image instead, with the figures of a direct comparison on that image, and the run
    says which sizes it used (summary, metadata)."""
    src = cnn_zero_at_1x1(tmp_path / "cnn.onnx")
    s = qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "q.onnx")
    assert 5 < s.verification.worst_sqnr < 60  # at 1x1: inf
    assert s.verification.verified and s.verification.sizes == {"x": [1, 3, 224, 224]}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    direct = verify_models(src, tmp_path / "q.onnx", feeds=[{"x": x}])
    assert [m.to_dict() for m in s.verification.outputs] == [m.to_dict() for m in direct]
    meta = json.loads(_props(tmp_path / "q.onnx")["qonnx.verification"])
    assert meta["sizes"] == {"x": [1, 3, 224, 224]} and meta["inputs"].endswith("x 1x3x224x224")
    assert "unverified" not in meta and float(_props(tmp_path / "q.onnx")["qonnx.worst_sqnr_db"]) < 60
    # the size its metadata states comes first
    src = cnn_zero_at_1x1(tmp_path / "cnn64.onnx", metadata={"imgsz": "[64, 96]"})
    s = qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "q64.onnx")
    assert s.verification.verified and s.verification.sizes == {"x": [1, 3, 64, 96]}


def test_detector_whose_neck_runs_on_no_1x1_image_is_verified(tmp_path):
    """Resize with computed scales and a Concat: the original runs on no 1x1 image (the run stopped there with
    "verification could not run the models"); it runs at 224x224 and is verified there."""
    s = qonnx.quantize(
        detector_with_resize(tmp_path / "det.onnx"), qonnx.W4A16(block_size=16), output=tmp_path / "q.onnx"
    )
    assert s.verification.verified and s.verification.sizes == {"x": [1, 3, 224, 224]}
    assert s.verification.worst_sqnr is not None and math.isfinite(s.verification.worst_sqnr)


def test_degenerate_reference_is_never_a_pass(tmp_path, capsys):
    """An original whose output is all zeros on every input certifies nothing: the verdict is "not verified"
    with the reason, said loudly, in the metadata with no SQNR to gate on; --min-sqnr and --verify refuse."""
    src = always_zero(tmp_path / "zero.onnx")
    s = qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "q.onnx")
    check = s.verification
    assert check.worst_sqnr is None  # it was inf
    assert check.ran and not check.verified
    assert "'y' is all zeros" in check.unverified and check.outputs[0].degenerate == "all zeros"
    assert "WARNING: the output is NOT VERIFIED" in capsys.readouterr().err
    props = _props(tmp_path / "q.onnx")
    meta = json.loads(props["qonnx.verification"])
    assert "all zeros" in meta["unverified"] and meta["worst_sqnr_db"] is None and props["qonnx.worst_sqnr_db"] == ""
    for options in (VerifyOptions(min_sqnr=20), VerifyOptions(enabled=True)):
        with pytest.raises(VerificationError, match=r"not verified: the original's output 'y' is all zeros"):
            qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "r.onnx", verify=options)
        assert not (tmp_path / "r.onnx").exists()
    res = qonnx_cli("quantize", src, "-o", tmp_path / "c.onnx", "--block-size", "16")
    assert res.returncode == 0 and "NOT VERIFIED: the original's output 'y' is all zeros" in res.stdout
    assert "WARNING" in res.stderr and "SQNR inf" not in res.stdout
    for flag in (["--min-sqnr", "20"], ["--verify"]):
        res = qonnx_cli("quantize", src, "-o", tmp_path / "d.onnx", *flag)
        assert res.returncode == 3 and "not verified" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "d.onnx").exists()


def test_non_finite_reference_is_not_a_pass(tmp_path):
    """NaN in the original's output on every input: not verified either (SQNR would be NaN or -inf)."""
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("Div", ["h", "zero"], ["y"], name="div"),
    ]
    zero = numpy_helper.from_array(np.zeros(32, np.float32), "zero")
    src = matmul_model(tmp_path / "nan.onnx", w, nodes=nodes, initializers=[numpy_helper.from_array(w, "w"), zero])
    s = qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "q.onnx")
    assert not s.verification.verified and "not finite" in s.verification.unverified


def test_original_that_runs_on_no_made_up_inputs_is_written_unverified(tmp_path, capsys):
    """A recurrent model whose state fits none of the sizes qonnx makes up: the inputs are at fault, not the
    quantization. The model is written, marked unverified (warning, metadata, --json), unless --verify or
    --min-sqnr asked for a check: then exit 2 and nothing written, as before."""
    src = recurrent_with_state(tmp_path / "vad.onnx")
    s = qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "q.onnx")
    assert not s.verification.ran and not s.verification.verified and s.verification.worst_sqnr is None
    assert "ran on none of the 3 sets of inputs qonnx made up" in s.verification.unverified
    assert "WARNING: the output is NOT VERIFIED" in capsys.readouterr().err
    meta = json.loads(_props(tmp_path / "q.onnx")["qonnx.verification"])
    assert "Reshape node 'reshape'" in meta["unverified"] and "--input-shape" in meta["unverified"]
    res = qonnx_cli("quantize", src, "-o", tmp_path / "c.onnx", "--block-size", "16", "--json")
    assert res.returncode == 0, res.stderr
    assert "ran on none" in json.loads(res.stdout)["verification"]["unverified"] and (tmp_path / "c.onnx").exists()
    for flag in (["--verify"], ["--min-sqnr", "10"]):
        assert_one_line_error(
            qonnx_cli("quantize", src, "-o", tmp_path / "d.onnx", *flag), "verification could not run the models"
        )
        assert not (tmp_path / "d.onnx").exists()
    # the sizes it needs, given: verified
    shapes = VerifyOptions(shapes={"state": (2, 1, 64)})
    s = qonnx.quantize(src, qonnx.W4A16(block_size=16), output=tmp_path / "e.onnx", verify=shapes)
    assert s.verification.verified and s.verification.sizes == {"x": [1, 16000], "sr": []}


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A tiny Llama exported with its tokenizer (logits and a KV cache as outputs)."""
    from qonnx.models.export import export_causal_lm

    folder = tmp_path_factory.mktemp("llm") / "src"
    return export_causal_lm(tiny_causal_lm("llama"), folder, tokenizer=tiny_tokenizer(), quiet=True, verify=False)


def test_llm_verdict_is_the_next_token_distribution_not_the_kv_cache(tmp_path, tiny_llm, capsys):
    """A KV-cache output far off (SQNR ~3 dB) while the logits are untouched: no headline warning; the
    figures are still all in --json, and the logits' KL and top-1 lead them."""
    model = onnx.load(tiny_llm)
    name = next(o.name for o in model.graph.output if o.name.startswith("present"))
    for node in model.graph.node:
        node.output[:] = [f"{name}_raw" if o == name else o for o in node.output]
    model.graph.node.append(helper.make_node("Mul", [f"{name}_raw", "scale_0_3"], [name]))
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(0.3, np.float32), "scale_0_3"))
    damaged = model.SerializeToString()
    found = verification_module.verify(str(tiny_llm), damaged, VerifyOptions(), size=0)
    assert found.worst_sqnr is not None and found.worst_sqnr < verification_module.DEFAULT_WARN_SQNR
    assert "WARNING" not in capsys.readouterr().err
    assert found.logits is not None and found.logits.kl_divergence < 1e-4
    head = found.to_dict()["logits"]
    assert head["output"] == "logits" and head["kl_divergence"] < 1e-4 and head["top1_agreement"] > 0.95
    assert any(m["name"] == name and m["sqnr_db"] < 5 for m in found.to_dict()["outputs"])


def test_badly_quantized_llm_warning_names_a_command(tmp_path, tiny_llm):
    res = qonnx_cli("quantize", tiny_llm.parent, "-o", tmp_path / "q", "--scheme", "w2a16", "--block-size", "32")
    assert res.returncode == 0, res.stderr
    warning = [line for line in res.stderr.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "top-1 agreement" in warning[0] and "KL divergence" in warning[0]
    assert "`--algo awq+gptq`" in warning[0] and "benchmarks/RESULTS.md" in warning[0], warning
    assert "present" not in warning[0] and "targets" not in warning[0]
    assert "next-token distribution (logits): KL divergence" in res.stdout
    assert "verified present" not in res.stdout  # the KV cache stays in --json


def test_advice_follows_the_config():
    assert "`--algo awq+gptq`" in verification_module.advice(qonnx.W4A16().to_dict())
    gptq = verification_module.advice(qonnx.W4A16(algo=qonnx.GPTQ()).to_dict())
    assert "--block-size 32" in gptq and "`--algo awq+gptq`" not in gptq
    assert "--exclude" in verification_module.advice({"scheme": "w8a8"})
