"""Hostile or broken inputs end in one line on stderr and exit code 2: never "internal error" (exit 1).

The CLI runs in-process here (``capfd`` sees what ONNX Runtime writes to the file descriptors too).
"""

from __future__ import annotations

import errno
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import external_model, tiny_tokenizer
from onnx import TensorProto, helper

from qonnx.cli.main import main
from qonnx.models import build_decoder_stack
from qonnx.models.hf import reference_model_path


def run_cli(capfd, *args):
    """``qonnx ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_line(result, *fragments, code=2):
    """Exit ``code``, exactly one line on stderr, holding each fragment."""
    got, _, err = result
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1 and lines[0].startswith("qonnx: error: "), (got, err)
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize(
    ("location", "fragments"),
    [
        ("w.bin\x00evil", [r"'w.bin\x00evil'", "NUL byte"]),
        ("a" * 5000, ["(5000 characters)", "file name too long"]),
        ("nosuch/../w.bin", ["'nosuch/../w.bin'", "missing"]),
        ("nosuch/dir/w.bin", ["missing"]),
    ],
    ids=["nul", "long", "through-missing-folder", "missing-folder"],
)
@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_bad_external_data_location(tmp_path, capfd, location, fragments, command):
    path = external_model(tmp_path / "m", location)
    extra = ["-o", tmp_path / "out"] if command == "quantize" else []
    assert_one_line(run_cli(capfd, command, path, *extra), *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("length", [512 << 10, None], ids=["length-given", "no-length"])
@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_declared_size_checked_against_the_file(tmp_path, capfd, length, command):
    """10^12 elements over a 512 KiB file: refused before anything reads it or allocates it (no ORT log line)."""
    path = external_model(tmp_path / "m", "w.bin", dims=(1_000_000, 1_000_000), length=length, data_bytes=512 << 10)
    extra = ["-o", tmp_path / "out"] if command == "quantize" else []
    fragment = "take 4000000000000 bytes" if length else "needs bytes up to 4000000000000"
    assert_one_line(run_cli(capfd, command, path, *extra), "tensor 'w'", fragment)


def test_sessions_check_external_data_first(tmp_path):
    """A session is never built over a tensor its file cannot hold (ONNX Runtime would try to allocate it)."""
    from qonnx.core.errors import ModelLoadError
    from qonnx.runtime.session import make_session
    from qonnx.runtime.single_run import verification_session

    path = external_model(tmp_path / "m", "w.bin", dims=(1_000_000, 1_000_000), length=512 << 10, data_bytes=512 << 10)
    for build in (lambda: make_session(path), lambda: verification_session(path, "cpu", prepack=False)):
        with pytest.raises(ModelLoadError, match="take 4000000000000 bytes"):
            build()


def test_good_external_data_still_loads(tmp_path, capfd):
    path = external_model(tmp_path / "m", "w.bin")
    code, out, err = run_cli(capfd, "inspect", path)
    assert code == 0 and "quantizable layers: 1 of 1" in out, err
    assert os.path.getsize(path.with_name("w.bin")) == 64 * 32 * 4


def scoped_model(path: Path, scopes: list[str]) -> Path:
    """x @ w_i -> ... one MatMul per ``scopes`` entry, each carrying it as ``pkg.torch.onnx.name_scopes``."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i, scope in enumerate(scopes):
        node = helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}")
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=scope)
        nodes.append(node)
        inits.append(onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}"))
        prev = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_name_scopes_metadata_is_never_evaluated(tmp_path, capfd):
    """Metadata that made ``ast.literal_eval`` raise RecursionError / MemoryError is ignored; good scopes still read."""
    path = scoped_model(
        tmp_path / "m.onnx",
        [
            "['']" + "+[1]" * 100_000,  # RecursionError in ast
            "[" + "-" * 100_000 + "1]",  # MemoryError in ast
            "['', 'model', 'model.model.layers.0.mlp.up_proj', 'linear']",
        ],
    )
    args = ["-o", tmp_path / "q.onnx", "--block-size", "32", "--exclude", "mlp", "--json"]
    code, out, err = run_cli(capfd, "quantize", path, *args)  # --exclude matches module paths
    assert code == 0, err
    layers = {r["node"]: r for r in json.loads(out)["layers"]}
    assert layers["mm0"]["quantized"] and layers["mm1"]["quantized"]
    assert layers["mm2"]["reason"] == "excluded by pattern 're:mlp'"


def _write_npz_case(path: Path, case: str, x: np.ndarray) -> None:
    if case == "float64":
        np.savez(path, x=x.astype(np.float64))
    elif case == "int64":
        np.savez(path, x=x.astype(np.int64))
    elif case == "width":
        np.savez(path, x=x[..., :10])
    elif case == "text":
        path.write_text("not a zip")
    elif case == "member":  # a zip whose member is not a .npy array
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", b"garbage")
    elif case == "truncated":
        np.savez(path, x=x)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("float64", "holds double, the model's input takes float"),
        ("int64", "holds int64"),
        ("width", "has batches of shape [1, 16, 10]"),
        ("text", "not a .npz file"),
        ("member", "not .npy arrays"),
        ("truncated", "not a readable .npz file"),
    ],
)
@pytest.mark.parametrize("scheme", [["--algo", "gptq"], ["--scheme", "w8a8"]], ids=["gptq", "w8a8"])
def test_bad_calibration_npz(tmp_path, capfd, case, fragment, scheme):
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=32, intermediate=64, layers=1, vocab=50)
    feeds = tmp_path / "feeds.npz"
    _write_npz_case(feeds, case, np.random.default_rng(0).standard_normal((2, 1, 16, 32)).astype(np.float32))
    args = ["quantize", path, "-o", tmp_path / "out", "--calib-data", feeds, *scheme]
    assert_one_line(run_cli(capfd, *args), "feeds.npz", fragment)
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize(
    ("config", "fragment"),
    [("{bad json", "not a readable JSON file"), ("[1, 2]", "must hold a JSON object, not list"), ('"x"', "not str")],
    ids=["malformed", "list", "string"],
)
@pytest.mark.parametrize("command", [["eval", "--windows", "1", "--seq-len", "8"], ["generate", "--prompt", "hi"]])
def test_bad_config_json(tmp_path, capfd, config, fragment, command):
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=32, intermediate=64, layers=1, vocab=50)
    (path.parent / "config.json").write_text(config)
    assert_one_line(run_cli(capfd, command[0], path.parent, *command[1:]), "config.json", fragment)


@pytest.mark.parametrize(
    "size",
    [4, 100, pytest.param(1_000_000, marks=pytest.mark.slow), pytest.param(40_000_000, marks=pytest.mark.slow)],
)
def test_truncated_gguf(tmp_path, capfd, size):
    """The reference GGUF cut short anywhere (the header, the metadata, the tensor data) is one line."""
    cut = tmp_path / "cut.gguf"
    with open(reference_model_path(), "rb") as f:
        cut.write_bytes(f.read(size))
    assert_one_line(run_cli(capfd, "export", cut, "-o", tmp_path / "out"), "cut.gguf")
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("external", [False, True], ids=["one-file", "external-data"])
def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capfd, monkeypatch, external):
    """ENOSPC while the output is written: one line naming the output, no partial or temporary file left."""
    import onnx_ir as ir

    from qonnx.core import modelfile

    def full(*args, **kwargs):
        target = Path(args[1])
        target.write_bytes(b"partial")  # what a full disk leaves: part of a file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(modelfile, "write_snapshot", full)
    monkeypatch.setattr(ir, "save", full)
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=32, intermediate=64, layers=1, vocab=50)
    out = tmp_path / "out"
    out.mkdir()
    args = ["quantize", path, "-o", out / "q.onnx", "--no-verify"] + (["--external-data"] if external else [])
    assert_one_line(run_cli(capfd, *args), str(out / "q.onnx"), "No space left on device")
    assert list(out.iterdir()) == []


def test_environment_errors_anywhere_are_one_line(tmp_path, capfd, monkeypatch):
    """A full disk met outside the output's write (a temporary file, a cache) is one line too, naming the file."""
    import qonnx.cli.inspection as command

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/qonnx-hessians-x/h0.npy")

    monkeypatch.setattr(command, "inspect_model", full)
    assert_one_line(run_cli(capfd, "inspect", tmp_path / "m.onnx"), "/tmp/qonnx-hessians-x/h0.npy: No space left")


def test_generate_refuses_a_model_that_is_not_a_causal_lm(tmp_path, capfd):
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=32, intermediate=64, layers=1, vocab=50)
    tiny_tokenizer().save_pretrained(path.parent)
    assert_one_line(run_cli(capfd, "generate", path.parent, "--prompt", "hi"), "not those of a causal LM export")


def test_input_shape_for_an_unknown_input(tmp_path, capfd):
    """--input-shape naming no input is refused, naming it and listing the model's inputs (it was ignored)."""
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=32, intermediate=64, layers=1, vocab=50)
    args = ["quantize", path, "-o", tmp_path / "out", "--input-shape", "x=1x4x32", "--input-shape", "nosuch=1x256"]
    assert_one_line(run_cli(capfd, *args), "--input-shape", "no input 'nosuch'", "its inputs: x")
    assert not (tmp_path / "out").exists()


def test_over_long_paths(tmp_path, capfd):
    """5,000-character input and output paths: one line with the name cut short, for every command taking one."""
    path = build_decoder_stack(tmp_path / "m" / "model.onnx", hidden=32, intermediate=64, layers=1, vocab=50)
    long = tmp_path / ("a" * 5000)
    for args in (
        ["quantize", path, "-o", f"{long}.onnx"],
        ["quantize", path, "-o", long],
        ["quantize", f"{long}.onnx", "-o", tmp_path / "q.onnx"],
        ["inspect", long],
        ["eval", long],
        ["export", long, "-o", tmp_path / "e"],
    ):
        code, out, err = run_cli(capfd, *args)
        assert_one_line((code, out, err), "characters)")
        assert len(err) < 500, err


def test_sparse_initializer_external_data_is_checked(tmp_path):
    """A sparse initializer's values can live in an external file too: its location is checked like any other."""
    from qonnx.core.errors import ModelLoadError
    from qonnx.core.external_data import check_external_data, graph_tensors

    values = TensorProto(name="sv", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    values.external_data.add(key="location", value="../../etc/passwd")
    indices = helper.make_tensor("si", TensorProto.INT64, [2], [0, 3])
    sparse = helper.make_sparse_tensor(values, indices, [4])
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("sv", TensorProto.FLOAT, [4])])
    graph.sparse_initializer.append(sparse)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert values.name in {t.name for t in graph_tensors(model.graph)}
    with pytest.raises(ModelLoadError, match="sv"):
        check_external_data(model, tmp_path / "m.onnx")
