"""Graphs shaped like the ones people have, built in code: torch exports, old opsets, subgraphs, odd ops.

Each builder writes one model into a folder and returns its path plus input batches that exercise it
(an If gets one batch per branch). Weights are small so the whole corpus quantizes in seconds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qonnx.models import build_decoder_stack

Feeds = list[dict[str, np.ndarray]]
F32 = TensorProto.FLOAT


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _w(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype)


def _save(path: Path, graph: onnx.GraphProto, opsets: dict[str, int], ir_version: int = 8) -> Path:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    m.ir_version = ir_version
    onnx.save(m, path)
    return path


def _export(module, args: tuple, path: Path, *, dynamo: bool = False) -> Path:
    import torch

    torch.manual_seed(0)
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, args, path, dynamo=True, input_names=["x"], output_names=["y"], verbose=False)
        else:
            torch.onnx.export(
                module, args, path, dynamo=False, input_names=["x"], output_names=["y"], do_constant_folding=False
            )
    return path


def cnn(d: Path) -> tuple[Path, Feeds]:
    """Conv + BatchNorm (not fused) + grouped and depthwise Conv + Linear, legacy torch exporter."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, groups=4),
        nn.Conv2d(32, 32, 3, groups=32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 64),
    )
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    x = _rng().standard_normal((1, 3, 16, 16)).astype(np.float32)
    return _export(net, (torch.from_numpy(x),), d / "cnn.onnx"), [{"x": x}]


def conv_transpose(d: Path) -> tuple[Path, Feeds]:
    """Grouped ConvTranspose upsampling, then a 1x1 Conv (a decoder head of a segmentation net)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.ConvTranspose2d(16, 32, 4, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 3, padding=1),
        nn.Conv2d(16, 24, 1),
    )
    x = _rng().standard_normal((1, 16, 6, 6)).astype(np.float32)
    return _export(net, (torch.from_numpy(x),), d / "convt.onnx"), [{"x": x}]


def conv1d(d: Path) -> tuple[Path, Feeds]:
    """1-D strided Conv, depthwise-separable block (an audio front end)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 32, 9, stride=2), nn.GELU(), nn.Conv1d(32, 32, 5, groups=32), nn.Conv1d(32, 48, 1))
    x = _rng().standard_normal((2, 4, 64)).astype(np.float32)
    return _export(net, (torch.from_numpy(x),), d / "conv1d.onnx"), [{"x": x}]


def encoder(d: Path) -> tuple[Path, Feeds]:
    """``nn.TransformerEncoderLayer`` + a classifier head, torch.export-based exporter."""
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
            self.head = nn.Linear(64, 32)

        def forward(self, x):
            return self.head(self.layer(x))

    torch.manual_seed(0)
    x = _rng().standard_normal((2, 8, 64)).astype(np.float32)
    return _export(Encoder(), (torch.from_numpy(x),), d / "encoder.onnx", dynamo=True), [{"x": x}]


def decoder(d: Path) -> tuple[Path, Feeds]:
    """qonnx's decoder-shaped stack (K not a multiple of the block size)."""
    path = build_decoder_stack(d / "decoder.onnx", hidden=72, intermediate=200, layers=2, vocab=100)
    return path, [{"x": _rng().standard_normal((2, 5, 72)).astype(np.float32)}]


def decoder_fp16(d: Path) -> tuple[Path, Feeds]:
    """The decoder stack in float16."""
    path = build_decoder_stack(d / "fp16.onnx", hidden=64, intermediate=128, layers=1, vocab=100, dtype="float16")
    return path, [{"x": _rng().standard_normal((2, 5, 64)).astype(np.float16)}]


def lstm_linear(d: Path) -> tuple[Path, Feeds]:
    """LSTM (weights inside the op) followed by a Linear."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(16, 32, batch_first=True)
            self.fc = nn.Linear(32, 64)

        def forward(self, x):
            return self.fc(self.rnn(x)[0])

    torch.manual_seed(0)
    x = _rng().standard_normal((2, 6, 16)).astype(np.float32)
    return _export(Net(), (torch.from_numpy(x),), d / "lstm.onnx"), [{"x": x}]


def gru_only(d: Path) -> tuple[Path, Feeds]:
    """A GRU alone: nothing a weight-only scheme can quantize."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(16, 32, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    torch.manual_seed(0)
    x = _rng().standard_normal((2, 6, 16)).astype(np.float32)
    return _export(Net(), (torch.from_numpy(x),), d / "gru.onnx"), [{"x": x}]


def old_opset(d: Path) -> tuple[Path, Feeds]:
    """Opset 9 MatMul + Gemm (C required before opset 11), as older converters wrote them."""
    rng = _rng()
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
        ],
        "old",
        [helper.make_tensor_value_info("x", F32, ["batch", 64])],
        [helper.make_tensor_value_info("y", F32, ["batch", 48])],
        [
            numpy_helper.from_array(_w(rng, 64, 96), "w1"),
            numpy_helper.from_array(_w(rng, 48, 96), "w2"),
            numpy_helper.from_array(_w(rng, 48), "b2"),
        ],
    )
    return _save(d / "opset9.onnx", g, {"": 9}, ir_version=4), [{"x": rng.standard_normal((3, 64)).astype(np.float32)}]


def ir3_opset7(d: Path) -> tuple[Path, Feeds]:
    """IR version 3 / opset 7: every initializer is also listed as a graph input (the old rule)."""
    rng = _rng()
    inits = [numpy_helper.from_array(_w(rng, 64, 80), "w1"), numpy_helper.from_array(_w(rng, 80), "b1")]
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w1", "b1"], ["y"], name="fc")],
        "ir3",
        [helper.make_tensor_value_info("x", F32, [3, 64])]
        + [helper.make_tensor_value_info(i.name, F32, list(i.dims)) for i in inits],
        [helper.make_tensor_value_info("y", F32, [3, 80])],
        inits,
    )
    return _save(d / "ir3.onnx", g, {"": 7}, ir_version=3), [{"x": rng.standard_normal((3, 64)).astype(np.float32)}]


def bf16(d: Path) -> tuple[Path, Feeds]:
    """A bfloat16 MLP (runs on CUDA; ONNX Runtime's CPU provider has no bfloat16 kernels)."""
    rng = _rng()
    bf = TensorProto.BFLOAT16
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "bf16",
        [helper.make_tensor_value_info("x", bf, ["batch", 64])],
        [helper.make_tensor_value_info("y", bf, ["batch", 32])],
        [
            numpy_helper.from_array(_w(rng, 64, 96, dtype=ml_dtypes.bfloat16), "w1"),
            numpy_helper.from_array(_w(rng, 96, 32, dtype=ml_dtypes.bfloat16), "w2"),
        ],
    )
    x = rng.standard_normal((2, 64)).astype(ml_dtypes.bfloat16)
    return _save(d / "bf16.onnx", g, {"": 21}, ir_version=10), [{"x": x}]


def subgraphs(d: Path) -> tuple[Path, Feeds]:
    """If and Loop whose MatMuls use outer-graph weights and their own initializers."""
    rng = _rng()
    v = helper.make_tensor_value_info
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_outer"], ["t"], name="then_mm")], "then", [], [v("t", F32, None)]
    )
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_else"], ["e"], name="else_mm")],
        "else",
        [],
        [v("e", F32, None)],
        [numpy_helper.from_array(_w(rng, 64, 64), "w_else")],
    )
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w_body"], ["b1"], name="body_mm_own"),
            helper.make_node("Tanh", ["b1"], ["b2"], name="body_tanh"),
            helper.make_node("MatMul", ["b2", "w_outer"], ["h_out"], name="body_mm_outer"),
            helper.make_node("Identity", ["c_in"], ["c_out"], name="body_cond"),
        ],
        "body",
        [v("i", TensorProto.INT64, []), v("c_in", TensorProto.BOOL, []), v("h_in", F32, None)],
        [v("c_out", TensorProto.BOOL, []), v("h_out", F32, None)],
        [numpy_helper.from_array(_w(rng, 64, 64), "w_body")],
    )
    g = helper.make_graph(
        [
            helper.make_node("If", ["cond"], ["h"], name="branch", then_branch=then_g, else_branch=else_g),
            helper.make_node("Loop", ["trips", "", "h"], ["y"], name="loop", body=body),
        ],
        "subgraphs",
        [v("x", F32, [2, 64]), v("cond", TensorProto.BOOL, [])],
        [v("y", F32, [2, 64])],
        [numpy_helper.from_array(_w(rng, 64, 64), "w_outer"), numpy_helper.from_array(np.array(2, np.int64), "trips")],
    )
    x = rng.standard_normal((2, 64)).astype(np.float32)
    feeds = [{"x": x, "cond": np.array(c)} for c in (True, False)]
    return _save(d / "subgraphs.onnx", g, {"": 17}), feeds


def odd_ops(d: Path) -> tuple[Path, Feeds]:
    """A contrib op (com.microsoft Gelu) and an ai.onnx.ml op (Normalizer) between MatMuls."""
    rng = _rng()
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Gelu", ["h"], ["a"], name="gelu", domain="com.microsoft"),
            helper.make_node("MatMul", ["a", "w2"], ["z"], name="fc2"),
            helper.make_node("Normalizer", ["z"], ["y"], name="norm", domain="ai.onnx.ml", norm="L2"),
        ],
        "odd",
        [helper.make_tensor_value_info("x", F32, ["batch", 64])],
        [helper.make_tensor_value_info("y", F32, ["batch", 48])],
        [numpy_helper.from_array(_w(rng, 64, 96), "w1"), numpy_helper.from_array(_w(rng, 96, 48), "w2")],
    )
    feeds = [{"x": rng.standard_normal((3, 64)).astype(np.float32)}]
    return _save(d / "odd.onnx", g, {"": 17, "com.microsoft": 1, "ai.onnx.ml": 3}), feeds


def custom_domain(d: Path) -> tuple[Path, Feeds]:
    """An op of a domain nobody registered (a plugin op): the original cannot run in ONNX Runtime either."""
    rng = _rng()
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("FancyAct", ["h"], ["y"], name="fancy", domain="org.example.plugins"),
        ],
        "custom",
        [helper.make_tensor_value_info("x", F32, ["batch", 64])],
        [helper.make_tensor_value_info("y", F32, ["batch", 96])],
        [numpy_helper.from_array(_w(rng, 64, 96), "w1")],
    )
    feeds = [{"x": rng.standard_normal((3, 64)).astype(np.float32)}]
    return _save(d / "custom.onnx", g, {"": 17, "org.example.plugins": 1}), feeds


def multi_output(d: Path) -> tuple[Path, Feeds]:
    """Several outputs: two float heads, an intermediate value and an int64 ArgMax."""
    rng = _rng()
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="trunk"),
            helper.make_node("Relu", ["h"], ["features"], name="relu"),
            helper.make_node("Gemm", ["features", "w2", "b2"], ["logits"], name="cls", transB=1),
            helper.make_node("MatMul", ["features", "w3"], ["box"], name="box"),
            helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=1, keepdims=0),
        ],
        "multi",
        [helper.make_tensor_value_info("x", F32, ["batch", 64])],
        [
            helper.make_tensor_value_info("logits", F32, ["batch", 40]),
            helper.make_tensor_value_info("box", F32, ["batch", 32]),
            helper.make_tensor_value_info("features", F32, ["batch", 96]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
        ],
        [
            numpy_helper.from_array(_w(rng, 64, 96), "w1"),
            numpy_helper.from_array(_w(rng, 40, 96), "w2"),
            numpy_helper.from_array(_w(rng, 40), "b2"),
            numpy_helper.from_array(_w(rng, 96, 32), "w3"),
        ],
    )
    return _save(d / "multi.onnx", g, {"": 17}), [{"x": rng.standard_normal((4, 64)).astype(np.float32)}]


def shared_weights(d: Path) -> tuple[Path, Feeds]:
    """Tied embeddings (Gather + lm_head Gemm read one table) and one weight used by two MatMuls."""
    rng = _rng()
    g = helper.make_graph(
        [
            helper.make_node("Gather", ["embed", "input_ids"], ["e"], name="embed_tokens"),
            helper.make_node("MatMul", ["e", "w_mix"], ["h1"], name="mix1"),
            helper.make_node("Tanh", ["h1"], ["t1"], name="tanh"),
            helper.make_node("MatMul", ["t1", "w_mix"], ["h2"], name="mix2"),
            helper.make_node("Gemm", ["h2", "embed"], ["logits"], name="lm_head", transB=1),
        ],
        "tied",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["seq"])],
        [helper.make_tensor_value_info("logits", F32, ["seq", 256])],
        [numpy_helper.from_array(_w(rng, 256, 64), "embed"), numpy_helper.from_array(_w(rng, 64, 64), "w_mix")],
    )
    feeds = [{"input_ids": rng.integers(0, 256, 12).astype(np.int64)}]
    return _save(d / "tied.onnx", g, {"": 17}), feeds


def constant_nodes(d: Path) -> tuple[Path, Feeds]:
    """Weights held in Constant nodes, one stored as float16 behind a Cast (old exporters do this)."""
    rng = _rng()
    g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(_w(rng, 64, 96), "w1c")),
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node(
                "Constant", [], ["w2h"], value=numpy_helper.from_array(_w(rng, 96, 48, dtype=np.float16), "w2c")
            ),
            helper.make_node("Cast", ["w2h"], ["w2"], to=F32, name="cast"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2"),
        ],
        "constants",
        [helper.make_tensor_value_info("x", F32, ["batch", 64])],
        [helper.make_tensor_value_info("y", F32, ["batch", 48])],
    )
    return _save(d / "constants.onnx", g, {"": 13}), [{"x": rng.standard_normal((3, 64)).astype(np.float32)}]


def tiny(d: Path) -> tuple[Path, Feeds]:
    """Weights so small that scales, zero points and the new node would cost more than they save."""
    rng = _rng()
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="tiny1"),
            helper.make_node("MatMul", ["h", "w2"], ["y"], name="tiny2"),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", F32, ["batch", 8])],
        [helper.make_tensor_value_info("y", F32, ["batch", 2])],
        [numpy_helper.from_array(_w(rng, 8, 6), "w1"), numpy_helper.from_array(_w(rng, 6, 2), "w2")],
    )
    return _save(d / "tiny.onnx", g, {"": 17}), [{"x": rng.standard_normal((3, 8)).astype(np.float32)}]


def already_quantized(d: Path) -> tuple[Path, Feeds]:
    """qonnx's own output fed back in."""
    import qonnx

    src, feeds = decoder(d)
    qonnx.quantize(src, qonnx.W4A16(block_size=32), output=d / "requant.onnx", verify=False)
    return d / "requant.onnx", feeds


BUILDERS: dict[str, Callable[[Path], tuple[Path, Feeds]]] = {
    "cnn": cnn,
    "conv_transpose": conv_transpose,
    "conv1d": conv1d,
    "encoder": encoder,
    "decoder": decoder,
    "decoder_fp16": decoder_fp16,
    "lstm_linear": lstm_linear,
    "gru_only": gru_only,
    "old_opset9": old_opset,
    "ir3_opset7": ir3_opset7,
    "bf16": bf16,
    "subgraphs": subgraphs,
    "odd_ops": odd_ops,
    "custom_domain": custom_domain,
    "multi_output": multi_output,
    "shared_weights": shared_weights,
    "constant_nodes": constant_nodes,
    "tiny": tiny,
    "already_quantized": already_quantized,
}
