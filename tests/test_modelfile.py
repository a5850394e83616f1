"""Load/save policy: lazy external data, atomic writes, determinism, never touching the input."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run

import qonnx
from qonnx import modelfile
from qonnx.models import build_decoder_stack


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def external_model(tmp_path):
    return build_decoder_stack(
        tmp_path / "in" / "ext.onnx", hidden=64, intermediate=128, layers=2, vocab=64, external_data=True
    )


def test_load_is_lazy(external_model):
    model = qonnx.load(external_model)
    tensors = [t for _, t in modelfile.iter_tensors(model) if isinstance(t, ir.ExternalTensor)]
    assert tensors and all(t.raw is None for t in tensors)  # nothing mapped yet


def test_external_roundtrip_and_input_untouched(tmp_path, external_model, rng):
    before = {p: digest(p) for p in external_model.parent.iterdir()}
    out = tmp_path / "out" / "q.onnx"
    s = qonnx.quantize(external_model, qonnx.W4A16(block_size=32), output=out, external_data=True)
    assert s.outputs == [out, out.with_name("q.onnx.data")]
    assert {p: digest(p) for p in external_model.parent.iterdir()} == before
    proto = onnx.load(out, load_external_data=False)
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    x = {"x": rng.standard_normal((1, 3, 64)).astype(np.float32)}
    assert run(out, x)[0].shape == (1, 3, 64)
    # reload through qonnx and save again as a single file: same numbers
    again = tmp_path / "again.onnx"
    qonnx.save(qonnx.load(out), again, external_data=False)
    assert not again.with_name("again.onnx.data").exists()
    np.testing.assert_array_equal(run(again, x)[0], run(out, x)[0])
    assert not list(out.parent.glob(".*tmp*"))  # no temporary leftovers


def test_same_input_same_bytes(tmp_path, external_model):
    for name in ("a", "b"):
        qonnx.quantize(
            external_model,
            qonnx.W4A16(block_size=32),
            output=tmp_path / name / "q.onnx",
            external_data=True,
            workers=1 if name == "a" else 3,
        )
    for f in ("q.onnx", "q.onnx.data"):
        assert digest(tmp_path / "a" / f) == digest(tmp_path / "b" / f)


def test_ir_version_is_runtime_compatible(tmp_path, tiny_model):
    model = qonnx.load(tiny_model)
    model.ir_version = 14  # what onnx 1.23's helpers write by default
    qonnx.save(model, tmp_path / "m.onnx")
    assert onnx.load(tmp_path / "m.onnx").ir_version <= modelfile.MAX_RUNTIME_IR_VERSION
    s = qonnx.quantize(tiny_model, qonnx.W4A16(block_size=32, format="qdq"), output=tmp_path / "q.onnx")
    assert s.outputs and onnx.load(tmp_path / "q.onnx").ir_version >= 10  # int4 needs IR 10


def test_refuses_to_overwrite_input_or_its_data(tmp_path, external_model):
    with pytest.raises(qonnx.OutputPathError):
        qonnx.quantize(external_model, output=external_model)
    with pytest.raises(qonnx.OutputPathError):  # the output's data file would be the input's data file
        qonnx.save(qonnx.load(external_model), external_model.with_name("ext.onnx"), protect=[external_model])


def test_failed_write_leaves_existing_output(tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"previous")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", boom)
    with pytest.raises(OSError):
        qonnx.quantize(tiny_model, output=out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_folder_in_folder_out(tmp_path, tiny_model):
    src = tmp_path / "src"
    src.mkdir()
    os.replace(tiny_model, src / "model.onnx")
    (src / "tokenizer.json").write_text("{}")
    (src / "config.json").write_text('{"a": 1}')
    s = qonnx.quantize(src, qonnx.W4A16(block_size=32), output=tmp_path / "dst")
    assert s.outputs[0] == tmp_path / "dst" / "model.onnx"
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["config.json", "model.onnx", "tokenizer.json"]
