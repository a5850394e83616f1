"""The tied lm_head alone, as each quantized model stores it: one token (M=1) on the CPU, interleaved runs.

Usage: python benchmarks/bench_tied_head.py DIR [DIR ...] [--threads 1] [--runs 100] [--tokens 1]

For each model folder, the node producing ``logits`` is run alone on a random [1, tokens, K] input: a float MatMul
reading the table through a Transpose (the Transpose applied first, as ONNX Runtime folds it), or the
MatMulNBits that shares the embedding's codes (``qonnx quantize --embeddings``), at its own accuracy_level and
at accuracy_level 4. Sessions run in turn, so load from other work hits them alike; min and median in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def head_models(folder: str) -> dict[str, bytes]:
    """The logits node of ``folder``/model.onnx as one-node models: {label: serialized model}."""
    model = onnx.load(f"{folder}/model.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if "logits" in n.output)
    if node.op_type == "MatMul":
        transpose = next(n for n in model.graph.node if n.output[0] == node.input[1])
        w = numpy_helper.to_array(inits[transpose.input[0]]).T.copy()
        variants = {"float": ([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(w, "w")])}
        k = w.shape[0]
    else:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k = attrs["K"]
        used = [inits[n] for n in node.input[1:] if n]
        variants = {}
        for level in sorted({attrs.get("accuracy_level", 0), 4}):
            mnb = helper.make_node(
                "MatMulNBits",
                ["x", *node.input[1:]],
                ["y"],
                domain="com.microsoft",
                **{**attrs, "accuracy_level": level},
            )
            variants[f"{attrs['bits']}-bit accuracy_level {level}"] = ([mnb], used)
    out = {}
    for label, (nodes, weights) in variants.items():
        graph = helper.make_graph(
            nodes,
            "head",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            weights,
        )
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        out[f"{folder.rstrip('/').split('/')[-1]}: {label}"] = helper.make_model(
            graph, opset_imports=opsets, ir_version=10
        ).SerializeToString()
    return out


def main() -> None:
    """Time every model's head, interleaved."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=1, help="rows of the input (1: decode; 128: a prompt)")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {}
    for folder in args.folders:
        for label, blob in head_models(folder).items():
            sessions[label] = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    k = next(iter(sessions.values())).get_inputs()[0].shape[-1]
    feed = {"x": np.random.default_rng(0).standard_normal((1, args.tokens, k)).astype(np.float32)}
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(args.runs):
        for label, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[label].append(time.perf_counter() - start)
    for label, t in times.items():
        print(f"{label}: min {1e3 * min(t):.2f} ms, median {1e3 * statistics.median(t):.2f} ms (M={args.tokens})")


if __name__ == "__main__":
    main()
