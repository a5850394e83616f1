"""qonnx.core.modelfile: lazy loading, external data in a new file, atomic writes, one-file snapshots, metadata."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import run

import qonnx
from qonnx.core import modelfile
from qonnx.models import build_decoder_stack
from qonnx.runtime.session import make_session


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

    monkeypatch.setattr(ir, "save", boom)  # models written with external data
    monkeypatch.setattr(modelfile, "write_snapshot", boom)  # models written as one file
    with pytest.raises(qonnx.OutputPathError, match=r"q\.onnx: cannot write it: disk full"):
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


@pytest.mark.parametrize(
    "graph", ["decoder", "decoder_fp16", "subgraphs", "constant_nodes", "bf16", "ir3_opset7", "shared_weights"]
)
def test_one_file_written_from_arrays_equals_serialized_model(tmp_path, graph):
    """A model written as one file from its snapshot (weights copied from their arrays, protobuf's framing
    written around them) is byte for byte what serializing the whole model gives: float, float16, bfloat16,
    int4 and packed 4-bit weights, subgraphs, Constant nodes, IR 3 graph inputs, weights mapped from the
    input's data file; and onnx's checker and ONNX Runtime read it."""
    from wild.corpus import BUILDERS

    (tmp_path / "in").mkdir()
    src, _ = BUILDERS[graph](tmp_path / "in")
    models = {"original": qonnx.load(src)}
    for fmt in ("qdq", "matmulnbits"):
        try:
            models[fmt] = qonnx.quantize(src, qonnx.W4A16(block_size=32, format=fmt), verify=False).model
        except qonnx.QonnxError:  # nothing this scheme can quantize in the graph
            pass
    held = 0  # tensors written from arrays (weights in Constant nodes are inside the protobuf)
    for name, model in models.items():
        modelfile.make_runtime_compatible(model)
        snapshot = modelfile.Snapshot.of(model)
        held += len(snapshot.weights)
        modelfile.write_snapshot(snapshot, tmp_path / f"{name}.onnx")
        assert (tmp_path / f"{name}.onnx").read_bytes() == modelfile.to_bytes(model), name
        onnx.checker.check_model(str(tmp_path / f"{name}.onnx"))
    assert held or graph == "constant_nodes"


def test_metadata_is_appended_and_replaced(tmp_path, tiny_model):
    """New metadata keys are appended to the written file (protobuf merges them); keys the model already
    holds are replaced, never duplicated. ONNX Runtime and onnx read both the same."""
    model = qonnx.load(tiny_model)
    model.metadata_props["keep"] = "1"
    out = tmp_path / "m.onnx"
    modelfile.save(model, out, finalize=lambda _: {"qonnx.a": "x", "qonnx.b": "y"})
    onnx.checker.check_model(str(out), full_check=True)
    assert [(p.key, p.value) for p in onnx.load(out).metadata_props] == [
        ("keep", "1"),
        ("qonnx.a", "x"),
        ("qonnx.b", "y"),
    ]
    assert make_session(out).get_modelmeta().custom_metadata_map == {"keep": "1", "qonnx.a": "x", "qonnx.b": "y"}
    modelfile.save(model, out, finalize=lambda _: {"keep": "2", "qonnx.a": "z"})
    assert [(p.key, p.value) for p in onnx.load(out).metadata_props] == [("keep", "2"), ("qonnx.a", "z")]
