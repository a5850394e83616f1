"""Names from a model never reach the terminal raw: no forged lines, no escape sequences (inspect, quantize, errors)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import qonnx_cli
from onnx import TensorProto, helper, numpy_helper

from qonnx.core.errors import escape_name, escape_text, warn

#: A newline that forges a line of qonnx's own, an OSC sequence that retitles the terminal, an ANSI colour.
EVIL = "\nqonnx: error: forged\x1b]0;pwned\x07\x1b[31mred\u202e"
RAW = ("\x1b", "\x07", "\u202e")


def evil_model(path):
    """x -> MatMul -> h -> MatMul -> y, every name (nodes, values, initializers, metadata) carrying EVIL."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x" + EVIL, "w" + EVIL], ["h" + EVIL], name="mm" + EVIL),
        helper.make_node("MatMul", ["h" + EVIL, "w2" + EVIL], ["y" + EVIL], name="mm2" + EVIL),
    ]
    graph = helper.make_graph(
        nodes,
        "g" + EVIL,
        [helper.make_tensor_value_info("x" + EVIL, TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y" + EVIL, TensorProto.FLOAT, ["batch", 16])],
        [
            numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w" + EVIL),
            numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w2" + EVIL),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"key" + EVIL: "value" + EVIL})
    onnx.save(model, path)
    return path


def assert_clean(text):
    """No raw control character, and no line that the model wrote."""
    for c in RAW:
        assert c not in text, repr(text)
    assert not any(line.startswith("qonnx: error: forged") for line in text.splitlines()), text


def test_escape_name():
    assert escape_name("model.layers.0/attn/MatMul") == "model.layers.0/attn/MatMul"
    assert escape_name("état_中文") == "état_中文"  # letters of any script stay
    assert escape_name("a\nb\x1b]0;t\x07") == r"a\nb\x1b]0;t\x07"
    assert escape_name("a\\nb") == r"a\\nb"  # unambiguous: a backslash is doubled
    assert escape_name("\u202e") == r"\u202e"
    long = escape_name("a" * 5000)
    assert long.endswith("... (5000 characters)") and len(long) < 300
    assert escape_text("one\ntwo \\ \x1b") == r"one\ntwo \ \x1b"


def test_warning_is_one_escaped_line(capsys):
    warn(f"output 'y{EVIL}' is bad")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qonnx: WARNING: output 'y\\n")
    assert_clean(err)


def test_inspect_escapes_names(tmp_path):
    res = qonnx_cli("inspect", evil_model(tmp_path / "evil.onnx"))
    assert res.returncode == 0, res.stderr
    assert_clean(res.stdout + res.stderr)
    assert r"input x\nqonnx: error: forged\x1b]0;pwned\x07" in res.stdout


@pytest.mark.parametrize("extra", [[], ["--exclude", "mm2"]])
def test_quantize_summary_escapes_names(tmp_path, extra):
    """The summary to a pipe: verified outputs and skipped layers, escaped."""
    path = evil_model(tmp_path / "evil.onnx")
    res = qonnx_cli("quantize", path, "-o", tmp_path / "q.onnx", "--block-size", "16", *extra)
    assert res.returncode == 0, res.stderr
    assert_clean(res.stdout + res.stderr)
    assert r"verified y\nqonnx: error: forged" in res.stdout
    if extra:
        assert r"skipped mm2\nqonnx: error: forged" in res.stdout


def test_error_line_escapes_names(tmp_path):
    """An error that names an output (--min-sqnr refusal, exit 3) is still one escaped line."""
    res = qonnx_cli("quantize", evil_model(tmp_path / "evil.onnx"), "-o", tmp_path / "q.onnx", "--min-sqnr", "99")
    assert res.returncode == 3, res.stderr
    assert_clean(res.stdout + res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qonnx: error: output 'y\\nqonnx: error: forged"), res.stderr
