"""The CLI: real subprocesses, one-line errors with exit code 2, JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
from helpers import assert_one_line_error, qonnx_cli

from qonnx.models import build_decoder_stack


@pytest.mark.slow
def test_quantize_json_and_inspect(tmp_path, tiny_model):
    res = qonnx_cli(
        "quantize", tiny_model, "-o", tmp_path / "q.onnx", "--block-size", "32", "--json", "--exclude", "lm_head"
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["quantized"] == 10 and summary["skipped"] == 1
    assert summary["config"]["block_size"] == 32 and summary["bytes_after"] < summary["bytes_before"]
    assert [r["reason"] for r in summary["layers"] if not r["quantized"]] == ["excluded by pattern 're:lm_head'"]
    info = json.loads(qonnx_cli("inspect", tmp_path / "q.onnx", "--json").stdout)
    assert info["ops"]["com.microsoft::MatMulNBits"] == 10 and info["quantizable_layers"] == 1
    human = qonnx_cli("inspect", tiny_model)
    assert human.returncode == 0 and "quantizable layers: 11 of 11" in human.stdout


def test_quantize_human_output_qdq_w8(tmp_path, tiny_model):
    res = qonnx_cli(
        "quantize",
        tiny_model,
        "-o",
        tmp_path / "q.onnx",
        "--scheme",
        "w8a16",
        "--format",
        "qdq",
        "--block-size",
        "0",
        "--symmetric",
    )
    assert res.returncode == 0, res.stderr
    assert "w8a16: quantized 11 layers" in res.stdout and "smaller" in res.stdout
    assert onnx.load(tmp_path / "q.onnx").opset_import[0].version >= 21


@pytest.fixture
def bad_inputs(tmp_path, tiny_model):
    (tmp_path / "text.onnx").write_text("not a model at all")
    data = tiny_model.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    ext = build_decoder_stack(tmp_path / "ext" / "m.onnx", hidden=32, intermediate=64, layers=1, external_data=True)
    missing = build_decoder_stack(
        tmp_path / "missing" / "m.onnx", hidden=32, intermediate=64, layers=1, external_data=True
    )
    os.remove(missing.with_name("m.onnx.data"))
    outside = tmp_path / "outside" / "m.onnx"
    outside.parent.mkdir()
    proto = onnx.load(ext, load_external_data=False)
    for t in proto.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../ext/m.onnx.data"
    onnx.save(proto, outside)
    nomm = tmp_path / "nomm.onnx"
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", 1, [2])],
        [onnx.helper.make_tensor_value_info("y", 1, [2])],
    )
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, nomm)
    return {
        "tiny": tiny_model,
        "text": tmp_path / "text.onnx",
        "trunc": tmp_path / "trunc.onnx",
        "missing": missing,
        "outside": outside,
        "nomm": nomm,
        "tmp": tmp_path,
    }


@pytest.mark.parametrize(
    ("case", "extra", "fragments"),
    [
        ("nofile", [], ["no such file"]),
        ("text", [], ["not a readable ONNX model"]),
        ("trunc", [], ["ONNX model"]),
        ("missing", [], ["external data file", "missing"]),
        ("outside", [], ["points outside the model's folder"]),
        ("nomm", [], ["nothing to quantize"]),
        ("same", [], ["overwrite the input"]),
        ("tiny", ["--block-size", "100"], ["block_size"]),
        ("tiny", ["--block-size", "0"], ["per-channel"]),
        ("tiny", ["--scheme", "w5a16"], ["--scheme"]),
        ("tiny", ["--bogus"], ["--bogus"]),
        ("tiny", ["--exclude", "("], ["regular expression"]),
        ("tiny", ["--accuracy-level", "9"], ["--accuracy-level"]),
    ],
)
def test_errors_are_one_line(bad_inputs, case, extra, fragments):
    tmp = bad_inputs["tmp"]
    src = tmp / "does-not-exist.onnx" if case == "nofile" else bad_inputs["tiny" if case == "same" else case]
    out = src if case == "same" else tmp / "out.onnx"
    res = qonnx_cli("quantize", src, "-o", out, *extra)
    assert_one_line_error(res, *fragments)
    assert not (tmp / "out.onnx").exists()


def test_inspect_error(tmp_path):
    assert_one_line_error(qonnx_cli("inspect", tmp_path / "nope.onnx"), "no such file")


def test_input_folder_without_model(tmp_path):
    assert_one_line_error(qonnx_cli("quantize", tmp_path, "-o", tmp_path / "o"), "holds no model.onnx")


@pytest.mark.slow
def test_demo_runs_offline(tmp_path):
    res = qonnx_cli("demo", "--synthetic", "--work-dir", tmp_path / "demo", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    rows = {r["model"]: r for r in out["rows"]}
    assert rows["w4a16"]["bytes"] * 4 < rows["fp32"]["bytes"]
    assert 8 < out["verification"]["worst_sqnr_db"] < 40


@pytest.mark.slow
def test_cli_shape_errors(tmp_path, tiny_model):
    assert_one_line_error(
        qonnx_cli("quantize", tiny_model, "-o", tmp_path / "q.onnx", "--input-shape", "x=2"),
        "verification could not run",
    )
    assert_one_line_error(
        qonnx_cli("quantize", tiny_model, "-o", tmp_path / "q.onnx", "--input-shape", "x"), "--input-shape"
    )
    res = qonnx_cli("quantize", tiny_model, "-o", tmp_path / "q.onnx", "--input-shape", "x=2x3x72", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["verification"]["ran"]


def test_cli_starts_without_the_passes():
    """``qonnx.cli`` imports neither onnx_ir nor the passes: the original's run starts before they load."""
    heavy = "('onnx_ir', 'onnxscript', 'qonnx.pipeline.quantize')"
    code = f"import sys, qonnx.cli, qonnx.cli.quantize; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_help_is_one_voice():
    """Every optional option of every command shows or states its default (a plain flag is off); --device is auto and
    --progress follows the terminal wherever they appear; the top-level help has examples and no cut summary."""
    import click
    from click.testing import CliRunner

    from qonnx.cli import cli
    from qonnx.cli.main import COMMANDS

    top = CliRunner().invoke(cli, ["--help"])
    assert top.exit_code == 0 and "Examples:" in top.output
    listed = [line for line in top.output.splitlines() if line.split()[:1] in ([n] for n in COMMANDS)]
    assert len(listed) == len(COMMANDS) and not any(line.endswith("...") for line in listed), listed
    devices = progress = 0
    for name in COMMANDS:
        command = cli.get_command(click.Context(cli), name)
        ctx = click.Context(command, info_name=name, show_default=True)
        for p in command.params:
            if not isinstance(p, click.Option) or p.required or (p.is_flag and not p.secondary_opts):
                continue
            text = p.get_help_record(ctx)[1]
            assert "default" in text, (name, p.opts, text)
            if p.name == "device":
                devices += 1
                assert p.default == "auto" and "[default: auto]" in text, (name, text)
            if p.name == "progress":
                progress += 1
                assert p.default is None and "on when stderr is a terminal" in text, (name, text)
    assert devices == 6 and progress == 4
    assert "dynamic  int8 weights and int8 activations" in CliRunner().invoke(cli, ["quantize", "--help"]).output


def test_top_level_help_imports_no_command():
    code = (
        "import sys; from qonnx.cli import main; main(['--help']); "
        "print(sorted(m for m in sys.modules if m.startswith('qonnx.cli.') or m in ('torch', 'onnx_ir')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.splitlines()[-1] == "['qonnx.cli.main']"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--device", "cpu"], "--device applies to --scheme w8a8/w4a8/fp8/dynamic only"),
        (["--device", "auto"], "--device applies to --scheme w8a8/w4a8/fp8/dynamic only"),
        (["--scheme", "dynamic", "--device", "auto"], "--device does not apply to --scheme dynamic"),
        (["--scheme", "w8a8", "--smooth-quant", "half"], "--smooth-quant takes a number in [0, 1]"),
    ],
)
def test_options_a_scheme_does_not_use_are_refused(tmp_path, tiny_model, extra, fragment):
    """A typed --device counts even when it names the default; left out, it is the scheme's own."""
    assert_one_line_error(qonnx_cli("quantize", tiny_model, "-o", tmp_path / "q.onnx", *extra), fragment)
    assert not (tmp_path / "q.onnx").exists()
