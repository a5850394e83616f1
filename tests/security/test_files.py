"""Hostile model folders and careless output paths: no code from a folder, no file lost, nothing half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

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
def test_never_runs_code_from_a_model_folder(remote_code_folder, command):
    folder, marker, env = remote_code_folder
    args = [a.format(folder=folder, tmp=folder.parent) for a in command]
    res = cli(*args, env=env)
    assert not marker.exists(), "the folder's Python ran"
    assert "[y/N]" not in res.stdout + res.stderr  # never asks
    # the error is qonnx's one line (transformers' own warning lines before it are issue 15's item 10)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("qonnx: error: ") and "qonnx never runs code from a model folder" in last, res.stderr


def test_auto_map_beside_a_known_class_loads_without_the_folders_code(tmp_path):
    """config.json and tokenizer_config.json that transformers can read alone load so, without the folder's .py.

    (transformers already did so before ``trust_remote_code=False``: this pins the behaviour, it is not the fix's test.)
    """
    from builders import tiny_tokenizer

    folder = tmp_path / "known"
    tiny_tokenizer().save_pretrained(folder)
    marker = tmp_path / "MARKER"
    (folder / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    config = {"model_type": "bert", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    code = (
        "import sys; from qonnx.core.tokenizer import load_tokenizer; from qonnx.models.hf import source_is_encoder; "
        "t = load_tokenizer(sys.argv[1]); print(type(t).__module__.split('.')[0], source_is_encoder(sys.argv[1]))"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    res = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert not marker.exists(), "the folder's Python ran"
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["transformers", "True"], res.stdout  # transformers' own classes
