"""``qonnx inspect``: what a model holds, and what quantize would do with its layers."""

from __future__ import annotations

import json

import click

from qonnx.cli import options as opt
from qonnx.pipeline.inspection import inspect_model

__all__ = ["inspect_command"]


@click.command("inspect")
@opt.model_argument
@opt.json_flag("a description")
def inspect_command(model: str, as_json: bool) -> None:
    """Describe MODEL: opsets, op histogram, weights, quantizable layers."""
    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    opt.echo(
        f"{info['path']}: IR {info['ir_version']}, opsets {info['opsets']}, {info['nodes']} nodes, "
        f"{opt.human_bytes(info['file_bytes'])} on disk"
    )
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            opt.echo(f"  {kind[:-1]} {opt.escape_name(v['name'])}: {v['dtype']} {v['shape']}")
    opt.echo("ops: " + ", ".join(f"{opt.escape_name(k)} {v}" for k, v in info["ops"].items()))
    sizes = ", ".join(f"{k} {opt.human_bytes(v)}" for k, v in info["weight_bytes_by_type"].items())
    opt.echo(f"weights: {sizes}")
    layers = info["layers"]
    opt.echo(f"quantizable layers: {info['quantizable_layers']} of {len(layers)} weight-holding nodes")
    for layer in layers:
        if not layer["quantizable"]:
            opt.echo(f"  not quantizable {opt.escape_name(layer['node'] or layer['weight'])}: {layer['reason']}")
