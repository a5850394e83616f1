"""Capturing intermediate tensors: values equal a reference run, groups, external data linked not copied."""

from __future__ import annotations

import os

import numpy as np
import onnx

import qonnx
from qonnx.models import build_decoder_stack
from qonnx.runtime.capture import capture
from qonnx.runtime.session import make_session


def test_capture_matches_exposed_values_in_groups(tmp_path, rng):
    src = build_decoder_stack(
        tmp_path / "m" / "model.onnx", hidden=32, intermediate=64, layers=2, vocab=50, external_data=True
    )
    before = sorted(p.name for p in src.parent.iterdir())
    model = qonnx.load(src)
    names = [n.inputs[0].name for n in model.graph if n.op_type == "MatMul"] + ["x"]
    batches = [{"x": rng.standard_normal((1, 4, 32)).astype(np.float32)} for _ in range(3)]
    got: dict[str, list[np.ndarray]] = {}
    calls = []
    links = []

    def keep(d):
        links.append(os.stat(src.with_name("model.onnx.data")).st_nlink)  # no hard link that would make
        qonnx.load(src)  # onnx_ir refuse the weights ("multiple hard links") while a capture runs
        for k, v in d.items():
            got.setdefault(k, []).append(v)

    capture(src, names, batches, keep, max_outputs=3, progress=calls.append)
    assert set(links) == {1}
    assert sorted(got) == sorted(set(names)) and all(len(v) == 3 for v in got.values())
    assert len(calls) == 3 * -(-len(set(names) - {"x"}) // 3)
    # the first MatMul's input is the first LayerNorm's output: check it against ONNX Runtime directly
    proto = onnx.load(src)
    proto.graph.output.append(onnx.ValueInfoProto(name=names[0]))
    onnx.save(proto, tmp_path / "exposed.onnx")
    ref = make_session(tmp_path / "exposed.onnx").run([names[0]], batches[1])[0]
    np.testing.assert_allclose(got[names[0]][1], ref, rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in src.parent.iterdir()) == before  # nothing written beside the input
