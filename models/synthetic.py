"""A decoder-shaped stack of MatMuls built in code: for tests, the offline demo and benchmarks.

Each layer is pre-norm attention-like and MLP-like projections with residual adds::

    h = LayerNorm(x);  x = x + (h @ Wqkv)[..., :H] @ Wo
    h = LayerNorm(x);  x = x + (SiLU(h @ Wgate) * (h @ Wup)) @ Wdown

then a final norm and an optional ``lm_head``. Weights are written to external data one tensor at a
time, so a multi-GB model is generated with bounded memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

__all__ = ["build_decoder_stack"]


def build_decoder_stack(
    path: str | os.PathLike,
    *,
    hidden: int = 64,
    intermediate: int = 176,
    layers: int = 2,
    vocab: int | None = 256,
    dtype: str = "float32",
    seed: int = 0,
    external_data: bool | None = None,
) -> Path:
    """Write a random decoder-shaped model to ``path`` and return the path.

    Args:
        path: the .onnx file to write (weights go to ``<name>.data`` when external).
        hidden: model width (the K of most MatMuls; need not be a multiple of the block size).
        intermediate: MLP width.
        layers: number of layers.
        vocab: size of the final projection (lm_head); None for none.
        dtype: "float32" or "float16".
        seed: random seed; the same arguments give the same bytes.
        external_data: write weights to a separate file (default: when over 64 MiB).

    The model takes ``x`` [batch, seq, hidden] and returns ``y`` ([batch, seq, vocab] or hidden).
    """
    path = Path(path)
    np_dtype = np.dtype(dtype)
    elem = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16}[np_dtype]
    rng = np.random.default_rng(seed)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    nodes = []
    x = "x"
    for i in range(layers):
        p = f"layers.{i}"
        shapes += [(f"{p}.ln1.weight", (hidden,)), (f"{p}.ln1.bias", (hidden,))]
        shapes += [(f"{p}.attn.qkv.weight", (hidden, 3 * hidden)), (f"{p}.attn.o_proj.weight", (hidden, hidden))]
        shapes += [(f"{p}.ln2.weight", (hidden,)), (f"{p}.ln2.bias", (hidden,))]
        shapes += [
            (f"{p}.mlp.gate_proj.weight", (hidden, intermediate)),
            (f"{p}.mlp.up_proj.weight", (hidden, intermediate)),
            (f"{p}.mlp.down_proj.weight", (intermediate, hidden)),
        ]
        nodes += [
            helper.make_node(
                "LayerNormalization", [x, f"{p}.ln1.weight", f"{p}.ln1.bias"], [f"{p}.h1"], axis=-1, name=f"{p}.ln1"
            ),
            helper.make_node("MatMul", [f"{p}.h1", f"{p}.attn.qkv.weight"], [f"{p}.qkv"], name=f"{p}.attn.qkv"),
            helper.make_node(
                "Slice", [f"{p}.qkv", "zero", "hidden_end", "minus_one"], [f"{p}.v"], name=f"{p}.attn.slice"
            ),
            helper.make_node(
                "MatMul", [f"{p}.v", f"{p}.attn.o_proj.weight"], [f"{p}.attn_out"], name=f"{p}.attn.o_proj"
            ),
            helper.make_node("Add", [x, f"{p}.attn_out"], [f"{p}.x1"], name=f"{p}.add1"),
            helper.make_node(
                "LayerNormalization",
                [f"{p}.x1", f"{p}.ln2.weight", f"{p}.ln2.bias"],
                [f"{p}.h2"],
                axis=-1,
                name=f"{p}.ln2",
            ),
            helper.make_node(
                "MatMul", [f"{p}.h2", f"{p}.mlp.gate_proj.weight"], [f"{p}.gate"], name=f"{p}.mlp.gate_proj"
            ),
            helper.make_node("Sigmoid", [f"{p}.gate"], [f"{p}.gate_sig"], name=f"{p}.mlp.sigmoid"),
            helper.make_node("Mul", [f"{p}.gate", f"{p}.gate_sig"], [f"{p}.act"], name=f"{p}.mlp.silu"),
            helper.make_node("MatMul", [f"{p}.h2", f"{p}.mlp.up_proj.weight"], [f"{p}.up"], name=f"{p}.mlp.up_proj"),
            helper.make_node("Mul", [f"{p}.act", f"{p}.up"], [f"{p}.inner"], name=f"{p}.mlp.mul"),
            helper.make_node(
                "MatMul", [f"{p}.inner", f"{p}.mlp.down_proj.weight"], [f"{p}.mlp_out"], name=f"{p}.mlp.down_proj"
            ),
            helper.make_node("Add", [f"{p}.x1", f"{p}.mlp_out"], [f"{p}.out"], name=f"{p}.add2"),
        ]
        x = f"{p}.out"
    shapes += [("norm.weight", (hidden,)), ("norm.bias", (hidden,))]
    nodes.append(helper.make_node("LayerNormalization", [x, "norm.weight", "norm.bias"], ["hn"], axis=-1, name="norm"))
    out_dim = hidden
    if vocab:
        shapes.append(("lm_head.weight", (hidden, vocab)))
        nodes.append(helper.make_node("MatMul", ["hn", "lm_head.weight"], ["y"], name="lm_head"))
        out_dim = vocab
    else:
        nodes.append(helper.make_node("Identity", ["hn"], ["y"], name="output"))

    total = sum(int(np.prod(s)) for _, s in shapes) * np_dtype.itemsize
    if external_data is None:
        external_data = total > 64 << 20
    data_name = path.name + ".data"
    path.parent.mkdir(parents=True, exist_ok=True)
    initializers = [
        onnx.numpy_helper.from_array(np.array([0], np.int64), "zero"),
        onnx.numpy_helper.from_array(np.array([hidden], np.int64), "hidden_end"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    data_file = open(path.with_name(data_name), "wb") if external_data else None
    try:
        for name, shape in shapes:
            if name.endswith(".bias"):
                arr = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np_dtype)
            elif len(shape) == 1:
                arr = (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np_dtype)
            else:
                arr = rng.standard_normal(shape, dtype=np.float32)
                arr *= np.float32(1.0 / np.sqrt(shape[0]))
                arr = arr.astype(np_dtype, copy=False)
            if data_file is None:
                initializers.append(onnx.numpy_helper.from_array(arr, name))
                continue
            offset = data_file.tell()
            data_file.write(arr.tobytes())
            t = TensorProto(name=name, data_type=elem, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                t.external_data.add(key=k, value=v)
            initializers.append(t)
            del arr
    finally:
        if data_file is not None:
            data_file.close()
    graph = helper.make_graph(
        nodes,
        "decoder_stack",
        [helper.make_tensor_value_info("x", elem, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", elem, ["batch", "seq", out_dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qonnx.synthetic")
    model.ir_version = 8
    onnx.save(model, os.fspath(path))
    return path
