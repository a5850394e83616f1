"""Nothing but qonnx's own lines on stderr: no library warnings, log lines or ONNX Runtime logs before an error.

Real subprocesses where what is tested is written by another library straight to the file descriptor or at
import time (ONNX Runtime's C++ logger, transformers' verbosity).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import numpy as np
import pytest
from builders import external_model, matmul_model
from helpers import assert_one_line_error, qonnx_cli
from onnx import helper

from qonnx.cli.main import main
from qonnx.core.errors import ModelLoadError


def test_non_finite_weights_said_once(tmp_path):
    """NaN and Inf weights: one line counting them, no numpy RuntimeWarning with its source line."""
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    w[0, :5] = np.nan
    w[1, 3] = np.inf
    res = qonnx_cli("quantize", matmul_model(tmp_path / "nan.onnx", w), "-o", tmp_path / "q.onnx", "--block-size", "16")
    assert res.returncode == 0, res.stderr
    assert "Warning" not in res.stderr and res.stderr.count("6 weights are not finite") == 1, res.stderr
    assert all(line.startswith("qonnx: ") for line in res.stderr.splitlines()), res.stderr


def test_undefined_tensor_is_one_line(tmp_path):
    """onnx_ir's warning about an input nobody produces does not precede the checker's one line."""
    w = np.ones((8, 4), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "ghost"], ["y"], name="add"),
    ]
    path = matmul_model(tmp_path / "undef.onnx", w, nodes=nodes)
    for args in (["inspect", path], ["quantize", path, "-o", tmp_path / "q.onnx"]):
        assert_one_line_error(qonnx_cli(*args), "invalid ONNX model", "ghost")


def test_no_onnx_runtime_log_line_from_the_reference_run(tmp_path):
    """A weight declaring 10^12 elements: the background reference run builds no session, so ORT logs nothing."""
    path = external_model(tmp_path / "m", "w.bin", dims=(1_000_000, 1_000_000), data_bytes=512 << 10)
    assert_one_line_error(qonnx_cli("quantize", path, "-o", tmp_path / "out"), "needs bytes up to 4000000000000")


def test_library_warnings_held_back(tmp_path, capfd, monkeypatch):
    """Warnings and log records while a command runs: dropped after an error, one line each after success."""
    import qonnx.cli.inspection as command

    real = command.inspect_model

    def noisy(path, fail):
        warnings.warn("something\nmultiline", RuntimeWarning, stacklevel=1)
        logging.getLogger("onnx_ir.serde").warning("Input 'g\x1b[31m' cannot be found")
        if fail:
            raise ModelLoadError("broken")
        return real(path)

    model = matmul_model(tmp_path / "m.onnx", np.ones((8, 4), np.float32))
    monkeypatch.setattr(command, "inspect_model", lambda path: noisy(path, fail=True))
    assert main(["inspect", str(model)]) == 2
    assert capfd.readouterr().err == "qonnx: error: broken\n"
    monkeypatch.setattr(command, "inspect_model", lambda path: noisy(path, fail=False))
    assert main(["inspect", str(model)]) == 0
    err = capfd.readouterr().err
    assert err.splitlines() == [
        "qonnx: note: RuntimeWarning: something",
        r"qonnx: note: onnx_ir.serde: Input 'g\x1b[31m' cannot be found",
    ]


@pytest.mark.slow
def test_no_transformers_log_line(tmp_path, generation_llama):
    """transformers' warning about a prompt longer than the tokenizer's maximum does not reach stderr."""
    _, root = generation_llama
    folder = shutil.copytree(root / "kv", tmp_path / "kv")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4}))
    res = qonnx_cli("generate", folder, "--prompt", "the quick brown fox jumps over", "--max-new-tokens", "2", "--raw")
    assert res.returncode == 0, res.stderr
    assert "transformers" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
