"""Hostile model folders and careless output paths: no code from a folder, no file lost, nothing half-written."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import tiny_tokenizer
from helpers import assert_one_line_error, run
from onnx import TensorProto, helper, numpy_helper

import qonnx
from qonnx.core.tokenizer import load_tokenizer
from qonnx.models import build_decoder_stack
from qonnx.models.hf import load_causal_lm, load_encoder, source_is_encoder
from qonnx.pipeline.report import layer_report, write_report
from qonnx.pipeline.verification import VerificationError, VerifyOptions
from qonnx.runtime.generate import Generator

EVIL_PY = """
import pathlib
pathlib.Path({marker!r}).write_text("the model folder's code ran")
from transformers import PretrainedConfig, PreTrainedTokenizer
class EvilConfig(PretrainedConfig):
    model_type = "evilnet"
class EvilTokenizer(PreTrainedTokenizer):
    pass
EvilModel = None
"""


def cli(*args, env=None, stdin="y\ny\ny\ny\n", cwd=None):
    """``python -m qonnx.cli ARGS`` with ``stdin`` piped in (a user, or a script, that answers "y")."""
    return subprocess.run(
        [sys.executable, "-m", "qonnx.cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def tiny_lm(path, vocab=64, hidden=32):
    """input_ids -> embedding -> one MatMul -> logits: the interface of a causal LM export, in a few KB."""
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "embed.weight")
    head = numpy_helper.from_array(rng.standard_normal((hidden, vocab)).astype(np.float32), "lm_head.weight")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["embed.weight", "input_ids"], ["h"], name="embed"),
            helper.make_node("MatMul", ["h", "lm_head.weight"], ["logits"], name="lm_head"),
        ],
        "tiny_lm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", vocab])],
        [emb, head],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


@pytest.fixture
def remote_code_folder(tmp_path):
    """A model folder whose config.json and tokenizer_config.json point at its own Python (auto_map)."""
    folder = tmp_path / "evil"
    tiny_lm(folder / "model.onnx")
    marker = tmp_path / "MARKER"
    (folder / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    auto = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps({"model_type": "evilnet", "auto_map": auto}))
    tok = {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    return folder, marker, env


@pytest.fixture
def answers_yes(tmp_path, monkeypatch):
    """Whatever asks on stdin gets "y" (and is recorded); code transformers fetches goes to tmp_path."""
    import transformers.dynamic_module_utils as dynamic

    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    return asked


LOADERS = {
    "tokenizer": lambda folder: load_tokenizer(folder),
    "tokenizer-optional": lambda folder: load_tokenizer(folder, required=False),
    "config": lambda folder: source_is_encoder(folder),
    "causal-lm": lambda folder: load_causal_lm(folder),
    "encoder": lambda folder: load_encoder(folder),
    "generator": lambda folder: Generator(folder),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_never_runs_code_from_a_model_folder(remote_code_folder, answers_yes, loader):
    folder, marker, _ = remote_code_folder
    with pytest.raises(qonnx.ModelLoadError, match="qonnx never runs code from a model folder"):
        LOADERS[loader](folder)
    assert not marker.exists(), "the folder's Python ran"
    assert answers_yes == []  # and nothing asked


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["export", "{folder}", "-o", "{tmp}/out"],
        ["eval", "{folder}"],
        ["generate", "{folder}", "--prompt", "hi"],
        ["quantize", "{folder}", "-o", "{tmp}/q", "--algo", "gptq", "--calib-samples", "2", "--calib-seq-len", "8"],
    ],
    ids=["export", "eval", "generate", "quantize-gptq"],
)
def test_no_command_runs_code_from_a_model_folder(remote_code_folder, command):
    """The commands, as a script runs them with "y" piped in: refused, nothing asked, nothing run."""
    folder, marker, env = remote_code_folder
    args = [a.format(folder=folder, tmp=folder.parent) for a in command]
    res = cli(*args, env=env)
    assert not marker.exists(), "the folder's Python ran"
    assert "[y/N]" not in res.stdout + res.stderr  # never asks
    # the error is qonnx's one line (transformers' own warning lines before it are issue 15's item 10)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("qonnx: error: ") and "qonnx never runs code from a model folder" in last, res.stderr


def test_auto_map_beside_a_known_class_loads_without_the_folders_code(tmp_path, answers_yes):
    """config.json and tokenizer_config.json that transformers can read alone load so, without the folder's .py.

    (transformers already did so before ``trust_remote_code=False``: this pins the behaviour, it is not the fix's test.)
    """
    folder = tmp_path / "known"
    tiny_tokenizer().save_pretrained(folder)
    marker = tmp_path / "MARKER"
    (folder / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = {"model_type": "bert", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    assert type(tokenizer).__module__.startswith("transformers.") and tokenizer("the fox")["input_ids"]
    assert source_is_encoder(folder)  # read as transformers' BertConfig
    assert not marker.exists() and answers_yes == []


# --- folder inputs: links, special files, output folder inside the input (items 2 and 7) ---


@pytest.fixture
def model_folder(tmp_path):
    """A folder input: model.onnx and the files a tokenizer or config would be."""
    folder = tmp_path / "fold"
    build_decoder_stack(folder / "model.onnx", hidden=64, intermediate=128, layers=1, vocab=64)
    (folder / "config.json").write_text('{"a": 1}')
    return folder


def secret_file(tmp_path):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("the user's private file")
    return secret


@pytest.mark.parametrize("kind", ["file", "folder", "nested", "dangling", "fifo"])
def test_mirroring_refuses_links_out_and_special_files(tmp_path, model_folder, kind):
    secret = secret_file(tmp_path)
    entry = model_folder / "leak.bin"
    if kind == "file":
        entry.symlink_to(secret)
    elif kind == "folder":
        entry.symlink_to(secret.parent, target_is_directory=True)
    elif kind == "nested":  # deeper in the tree, and relative
        (model_folder / "sub").mkdir()
        entry = model_folder / "sub" / "leak.bin"
        entry.symlink_to(Path("..") / ".." / "outside" / "secret.txt")
    elif kind == "dangling":
        entry.symlink_to(tmp_path / "nothing-here")
    else:
        os.mkfifo(entry)
    with pytest.raises(qonnx.QonnxError, match=r"leak\.bin"):
        qonnx.quantize(model_folder, qonnx.W4A16(block_size=32), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_mirroring_refusal_is_one_line(tmp_path, model_folder):
    (model_folder / "leak.bin").symlink_to(secret_file(tmp_path))
    res = cli("quantize", model_folder, "-o", tmp_path / "out")
    assert_one_line_error(res, "leak.bin", "outside the model folder")
    assert not (tmp_path / "out").exists()


def test_links_inside_the_folder_are_copied_as_files(tmp_path, model_folder):
    (model_folder / "real").mkdir()
    (model_folder / "real" / "tokenizer.json").write_text('{"t": 1}')
    (model_folder / "tokenizer.json").symlink_to(Path("real") / "tokenizer.json")
    qonnx.quantize(model_folder, qonnx.W4A16(block_size=32), output=tmp_path / "out")
    copied = tmp_path / "out" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"t": 1}'
    assert (tmp_path / "out" / "real" / "tokenizer.json").read_text() == '{"t": 1}'


@pytest.mark.parametrize("inside", ["sub", "sub/deeper"])
def test_output_folder_inside_the_input_folder_is_refused(tmp_path, model_folder, inside):
    with pytest.raises(qonnx.OutputPathError, match="inside the input folder"):
        qonnx.quantize(model_folder, qonnx.W4A16(block_size=32), output=model_folder / inside)
    assert sorted(p.name for p in model_folder.iterdir()) == ["config.json", "model.onnx"]
    res = cli("quantize", model_folder, "-o", model_folder / inside)
    assert_one_line_error(res, "inside the input folder")
    assert sorted(p.name for p in model_folder.iterdir()) == ["config.json", "model.onnx"]


# --- no file lost; a model and its data file replace the previous pair atomically (items 5 and 6) ---


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def ext_input(tmp_path):
    """d/in.onnx with its weights in d/in.onnx.data."""
    return build_decoder_stack(tmp_path / "d" / "in.onnx", hidden=64, intermediate=128, layers=1, external_data=True)


def feeds(seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((1, 3, 64)).astype(np.float32)}


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
def test_a_data_file_another_model_reads_is_never_touched(ext_input, external):
    d = ext_input.parent
    # another model whose data file happens to be called q.onnx.data (a renamed copy of an earlier output, say)
    build_decoder_stack(d / "q.onnx", hidden=64, intermediate=128, layers=1, seed=5, external_data=True)
    os.replace(d / "q.onnx", d / "other.onnx")
    before, expected = digest(d / "q.onnx.data"), run(d / "other.onnx", feeds())[0]
    s = qonnx.quantize(ext_input, qonnx.W4A16(block_size=32), output=d / "q.onnx", external_data=external)
    assert digest(d / "q.onnx.data") == before
    np.testing.assert_array_equal(run(d / "other.onnx", feeds())[0], expected)
    assert s.outputs == ([d / "q.onnx", d / "q.onnx.1.data"] if external else [d / "q.onnx"])
    assert run(d / "q.onnx", feeds())[0].shape == (1, 3, 256)


def test_replacing_an_output_pair_removes_only_its_own_data_file_and_says_so(tmp_path, ext_input, capfd):
    out = tmp_path / "o" / "q.onnx"
    qonnx.quantize(ext_input, qonnx.W8A16(), output=out, external_data=True)
    (tmp_path / "o" / "q.onnx.7.data").write_text("named like ours, read by no output of ours")
    capfd.readouterr()
    qonnx.quantize(ext_input, qonnx.W4A16(block_size=32), output=out, external_data=True)
    assert f"replaced the previous {out} and removed its data file q.onnx.data" in capfd.readouterr().err
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["q.onnx", "q.onnx.1.data", "q.onnx.7.data"]  # a fresh name: the old pair stayed whole
    w4 = {n: digest(out.parent / n) for n in names}
    qonnx.quantize(ext_input, qonnx.W4A16(block_size=32), output=out, external_data=True)  # a rerun: same bytes
    assert {p.name: digest(p) for p in out.parent.iterdir()} == w4
    qonnx.quantize(ext_input, qonnx.W4A16(block_size=32), output=out, external_data=False)  # now one file
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.7.data"]
    assert run(out, feeds())[0].shape == (1, 3, 256)


def test_files_are_synced_before_they_are_renamed(tmp_path, ext_input, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "o" / "q.onnx"
    qonnx.quantize(ext_input, qonnx.W4A16(block_size=32), output=out, external_data=True)
    folder = os.path.realpath(out.parent)
    moves = [e for e in events if e[0] == "replace" and os.path.dirname(e[2]) == folder]
    assert [os.path.basename(e[2]) for e in moves] == ["q.onnx.data", "q.onnx"]  # the data file first
    for move in moves:
        i = events.index(move)
        assert ("fsync", move[1]) in events[:i]  # the file is on disk before its name changes
        assert ("fsync", folder) in events[i + 1 :]  # and the rename after


CRASH = """
import os, signal, sys
from pathlib import Path
import qonnx
from qonnx.cli.main import main
out = Path(sys.argv[1])
real = os.replace
def replace(src, dst, *a, **k):
    if Path(dst) == out:  # between the data file's rename and the model's
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
    return real(src, dst, *a, **k)
os.replace = replace
sys.exit(main(["quantize", sys.argv[3], "-o", str(out), "--external-data", "--block-size", "32"]))
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_between_the_renames_the_previous_pair_still_reads_and_nothing_stays(tmp_path, ext_input, sig):
    out = tmp_path / "o" / "q.onnx"
    qonnx.quantize(ext_input, qonnx.W8A16(), output=out, external_data=True)
    expected = run(out, feeds())[0]
    res = subprocess.run(
        [sys.executable, "-c", CRASH, out, sig, ext_input], capture_output=True, text=True, timeout=300
    )
    np.testing.assert_array_equal(run(out, feeds())[0], expected)  # the old .onnx reads the old data file
    temps = [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]
    if sig == "SIGTERM":
        assert res.returncode == 143 and res.stderr.strip().splitlines()[-1] == "qonnx: terminated", res.stderr
        assert temps == []  # cleaned up on the way out
        assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.data"]
    else:
        assert res.returncode == -9 and temps  # a killed process cleans nothing ...
        qonnx.quantize(ext_input, qonnx.W4A16(block_size=32), output=out, external_data=True)
        assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == []  # ... the next run does
        assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.1.data"]  # no orphan data file
        assert run(out, feeds())[0].shape == (1, 3, 256)


# --- --min-sqnr: a failed gate writes nothing; a gate cannot be switched off or made meaningless (item 8) ---


def test_a_failed_min_sqnr_writes_nothing_for_a_folder_input(tmp_path, model_folder):
    (model_folder / "tokenizer.json").write_text("{}")
    gate = VerifyOptions(min_sqnr=99.0)
    with pytest.raises(VerificationError, match="nothing was written"):
        qonnx.quantize(model_folder, qonnx.W4A16(block_size=32), output=tmp_path / "new" / "out", verify=gate)
    assert not (tmp_path / "new").exists()
    qonnx.quantize(model_folder, qonnx.W8A16(), output=tmp_path / "out")  # a previous output stays as it was
    before = {p.name: digest(p) for p in (tmp_path / "out").iterdir()}
    (model_folder / "config.json").write_text('{"a": 2}')
    with pytest.raises(VerificationError):
        qonnx.quantize(model_folder, qonnx.W4A16(block_size=32), output=tmp_path / "out", verify=gate)
    assert {p.name: digest(p) for p in (tmp_path / "out").iterdir()} == before
    res = cli("quantize", model_folder, "-o", tmp_path / "cli-out", "--min-sqnr", "99")
    assert res.returncode == 3 and not (tmp_path / "cli-out").exists(), res.stderr


@pytest.mark.parametrize(
    "flags",
    [["--min-sqnr", "20", "--no-verify"], ["--min-sqnr", "nan"], ["--min-sqnr", "inf"], ["--min-sqnr", "-inf"]],
    ids=["no-verify", "nan", "inf", "-inf"],
)
def test_min_sqnr_that_cannot_gate_is_refused(tmp_path, model_folder, flags):
    res = cli("quantize", model_folder, "-o", tmp_path / "out", *flags)
    assert_one_line_error(res, "--min-sqnr")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options",
    [{"min_sqnr": 20.0, "enabled": False}, {"min_sqnr": float("nan")}, {"min_sqnr": float("inf")}],
    ids=["disabled", "nan", "inf"],
)
def test_min_sqnr_that_cannot_gate_is_refused_by_the_api(options):
    with pytest.raises(qonnx.ConfigError, match="min_sqnr"):
        VerifyOptions(**options)


def test_min_sqnr_is_checked_whatever_the_size(tmp_path, model_folder):
    """Models above ``max_bytes`` are not verified by default; one with a gate always is."""
    with pytest.raises(VerificationError):
        qonnx.quantize(model_folder, output=tmp_path / "out", verify=VerifyOptions(min_sqnr=99.0, max_bytes=1))
    assert not (tmp_path / "out").exists()


# --- qonnx report: works after the user install; a failed report leaves nothing (item 14) ---


def test_a_failed_report_leaves_no_folder_and_no_file(tmp_path, model_folder, monkeypatch):
    qonnx.quantize(model_folder, qonnx.W4A16(block_size=32), output=tmp_path / "q.onnx", verify=False)
    rows = layer_report(model_folder, tmp_path / "q.onnx")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the install that lacked it (issue 15 item 14)
    with pytest.raises(qonnx.QonnxError, match="matplotlib"):
        write_report(rows, tmp_path / "new" / "sub" / "report.md", title="t")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    files = write_report(rows, tmp_path / "new" / "sub" / "report.md", title="t")
    assert sorted(p.name for p in files) == ["report.md", "report_layers.png", "report_worst.png"]


def test_an_output_that_is_a_link_replaces_the_link_only(ext_input):
    """-o d/q.onnx where d/q.onnx links to a model elsewhere: the link goes, the model and d's files stay."""
    d = ext_input.parent
    elsewhere = build_decoder_stack(
        d.parent / "e" / "q.onnx", hidden=64, intermediate=128, layers=1, external_data=True
    )
    (d / "q.onnx").symlink_to(elsewhere)
    (d / "q.onnx.data").write_text("beside the link, read by nothing of ours")
    before = {p: digest(p) for p in (elsewhere, elsewhere.with_name("q.onnx.data"), d / "q.onnx.data")}
    qonnx.quantize(ext_input, qonnx.W4A16(block_size=32), output=d / "q.onnx")
    assert not (d / "q.onnx").is_symlink()
    assert {p: digest(p) for p in before} == before
