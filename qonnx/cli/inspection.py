"""``qonnx inspect``: what a model holds, and what quantize would do with its layers.

The default is a summary that fits a screen: inputs and outputs that differ only by a number (a KV cache's
``past_key_values.{0..29}.{key,value}``) on one line, the most frequent ops, and the layers quantize leaves
in floating point grouped by reason. ``--verbose`` lists everything; ``--json`` gives every figure.
"""

from __future__ import annotations

import json
import re
from typing import Any

import click

from qonnx.cli import options as opt
from qonnx.pipeline.inspection import inspect_model

__all__ = ["group_names", "inspect_command"]

#: Ops named in the summary (the rest are counted).
TOP_OPS = 8
#: ONNX type names people know by another name.
_TYPE_NAMES = {"float": "float32", "double": "float64"}


@click.command("inspect")
@opt.model_argument
@click.option("-v", "--verbose", is_flag=True, help="List every input, output, op type and skipped layer.")
@opt.json_flag("a description")
def inspect_command(model: str, verbose: bool, as_json: bool) -> None:
    """Describe MODEL: size, opsets, inputs and outputs, ops, weights, and the layers quantize would quantize."""
    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for line in summary(info, verbose=verbose):
        opt.echo(line)


def summary(info: dict[str, Any], *, verbose: bool = False) -> list[str]:
    """The lines ``qonnx inspect`` prints for ``info`` (:func:`~qonnx.pipeline.inspection.inspect_model`)."""
    files = len(info["files"])
    opsets = ", ".join(f"{domain or 'ai.onnx'} {version}" for domain, version in info["opsets"].items())
    lines = [
        f"{opt.escape_name(info['path'])}: {opt.human_bytes(info['file_bytes'])}"
        + (f" in {files} files" if files > 1 else "")
        + f", IR {info['ir_version']}, opsets {opt.escape_name(opsets)}"
        + (f", from {opt.escape_name(info['producer'])}" if info.get("producer") else "")
    ]
    for kind in ("input", "output"):
        items = [(v["name"], _describe(v)) for v in info[f"{kind}s"]]
        groups = [(name, 1, what) for name, what in items] if verbose else group_names(items)
        for pattern, count, what in groups:
            many = f" ({count})" if count > 1 else ""
            lines.append(f"  {kind} {opt.escape_name(pattern)}{many}: {what}")
    ops = list(info["ops"].items())
    shown = ops if verbose else ops[:TOP_OPS]
    rest = len(ops) - len(shown)
    more = f", {rest} more type{'s' if rest > 1 else ''} (--verbose lists them)" if rest else ""
    lines.append(
        f"ops: {info['nodes']} nodes of {len(ops)} types: "
        + ", ".join(f"{opt.escape_name(k)} {v}" for k, v in shown)
        + more
    )
    sizes = ", ".join(f"{_TYPE_NAMES.get(k, k)} {opt.human_bytes(v)}" for k, v in info["weight_bytes_by_type"].items())
    lines.append(f"weights: {info['initializers']} tensors: {sizes or 'none'}")
    layers = info["layers"]
    op_types = "/".join(dict.fromkeys(layer["op_type"] for layer in layers)) or "MatMul/Gemm/Conv"
    lines.append(
        f"quantizable layers: {info['quantizable_layers']} of {len(layers)} {op_types} nodes "
        f"(what `qonnx quantize` quantizes with its default {info['quantizable_by']})"
    )
    skipped = [(layer["reason"], layer["node"] or layer["weight"]) for layer in layers if not layer["quantizable"]]
    if verbose:
        lines += [f"  not quantized {opt.escape_name(name)}: {reason}" for reason, name in skipped]
    else:
        for reason, names in group_reasons(skipped):
            who = (
                opt.escape_name(names[0])
                if len(names) == 1
                else f"{len(names)} nodes (e.g. {opt.escape_name(names[0])})"
            )
            lines.append(f"  not quantized {who}: {reason}")
    return lines


def _describe(v: dict[str, Any]) -> str:
    dtype = _TYPE_NAMES.get(v["dtype"], v["dtype"]) if v["dtype"] else "unknown type"
    shape = "unknown shape" if v["shape"] is None else "[" + ", ".join(str(d) for d in v["shape"]) + "]"
    return opt.escape_name(f"{dtype} {shape}")


def group_reasons(skipped: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """(reason, name) pairs grouped by reason, names in quotes generalised, the largest group first."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for reason, name in skipped:
        key = re.sub(r"'[^']*'", "'…'", reason)
        groups.setdefault(key, (reason, []))[1].append(name)
    out = [(first if len(names) == 1 else key, names) for key, (first, names) in groups.items()]
    return sorted(out, key=lambda group: -len(group[1]))


def group_names(items: list[tuple[str, str]]) -> list[tuple[str, int, str]]:
    """Names that differ only in their numbers, then in their last dotted part, as one pattern per description.

    ``[("past.0.key", d), ("past.0.value", d), ("past.1.key", d), ("past.1.value", d)]`` gives
    ``[("past.{0..1}.{key,value}", 4, d)]``; names with different descriptions (type and shape) stay apart.
    Returns (pattern, how many names, description), in the order the first of each appears.
    """
    by_numbers: dict[tuple, list[list[str]]] = {}
    for name, what in items:
        parts = re.split(r"(\d+)", name)
        by_numbers.setdefault((what, tuple(parts[0::2])), []).append(parts[1::2])
    patterns: list[tuple[str, int, str]] = []
    for (what, texts), numbers in by_numbers.items():
        fields = [_numbers([n[i] for n in numbers]) for i in range(len(texts) - 1)]
        pattern = "".join(t + f for t, f in zip(texts, [*fields, ""], strict=True))
        patterns.append((pattern, len(numbers), what))
    merged: dict[tuple, list[tuple[str, str]]] = {}  # (what, count, head, mergeable): [(pattern, last part)]
    for pattern, count, what in patterns:
        head, dot, last = pattern.rpartition(".")
        mergeable = bool(dot) and "{" not in last
        merged.setdefault((what, count, head if mergeable else pattern, mergeable), []).append((pattern, last))
    out = []
    for (what, count, head, _), members in merged.items():
        if len(members) == 1:
            out.append((members[0][0], count, what))
        else:
            out.append((f"{head}.{{{','.join(last for _, last in members)}}}", count * len(members), what))
    return out


def _numbers(values: list[str]) -> str:
    """One number position of a group: ``3``, ``{0..29}`` for a run of integers, else ``{1,5,9}``."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) == 1:
        return distinct[0]
    ints = sorted(int(v) for v in distinct)
    if all(str(int(v)) == v for v in distinct) and ints == list(range(ints[0], ints[-1] + 1)):
        return f"{{{ints[0]}..{ints[-1]}}}"
    shown = distinct if len(distinct) <= 6 else [*distinct[:5], "…"]
    return "{" + ",".join(shown) + "}"
