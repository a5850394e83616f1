"""``qonnx quantize``: the command, and the summary it prints.

Importing this module loads neither onnx_ir nor the passes: the original model's reference run starts in
ONNX Runtime (:func:`~qonnx.pipeline.verification.start_reference_early`) before the pipeline loads.
"""

from __future__ import annotations

import json
import re
from typing import Any

import click

from qonnx.cli import options as opt
from qonnx.cli.quantize_options import QuantizeOptions, options
from qonnx.core.sizes import human_bytes
from qonnx.pipeline.verification import start_reference_early

__all__ = ["quantize_command"]


@click.command("quantize", cls=opt.SchemeCommand)
@opt.model_argument
@opt.output_model
@options
@opt.json_flag("a summary")
@opt.progress
def quantize_command(model: str, output: str, as_json: bool, progress: bool, **given: Any) -> None:
    """Quantize MODEL (a .onnx file or a folder holding model.onnx) into OUTPUT.

    The output is verified against MODEL before it is written (see --verify).
    """
    chosen = QuantizeOptions.given(given)
    config = chosen.config()
    budget = chosen.budget()
    checks = chosen.checks()
    start_reference_early(model, checks)  # the original runs in ONNX Runtime while the rest loads
    from qonnx.pipeline.quantize import quantize  # deferred: onnx_ir/onnxscript load ~1 s; the original runs first

    summary = quantize(
        model,
        config,
        output=output,
        targets=chosen.targets(),
        progress=progress,
        external_data=chosen.external_data,
        verify=checks,
        budget=budget,
    )
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return
    _echo_summary(config.name, summary)


def _echo_summary(name: str, summary: Any) -> None:
    ratio = summary.bytes_before / summary.bytes_after if summary.bytes_after else float("nan")
    opt.echo(
        f"{name}: quantized {len(summary.quantized)} layers, skipped {len(summary.skipped)} "
        f"in {summary.seconds:.1f} s{_phases(summary.phases)}"
    )
    for reason, names in _group_reasons(summary.skipped):
        first = opt.escape_name(names[0])
        who = first if len(names) == 1 else f"{len(names)} layers (e.g. {first})"
        opt.echo(f"  skipped {who}: {reason}")
    if summary.mixed_precision is not None:
        _echo_mixed_precision(summary.mixed_precision)
    if summary.kv_cache is not None:
        kv = summary.kv_cache
        opt.echo(
            f"KV cache: {kv['format']} in {kv['layers']} attentions, per-channel scales; "
            f"{kv['bytes_per_token']} bytes per position"
        )
    opt.echo(f"size: {human_bytes(summary.bytes_before)} -> {human_bytes(summary.bytes_after)} ({ratio:.2f}x smaller)")
    check = summary.verification
    if check.ran and check.unverified:
        opt.echo(f"NOT VERIFIED: {check.unverified}")
    elif check.ran:
        shown = _outputs_to_show(check.outputs)
        if check.inputs:
            opt.echo(f"verified on {check.inputs}:")
        for tried in check.tried:
            opt.echo(f"  (passed over {tried})")
        head = check.logits
        if head is not None:
            top1 = "" if head.top1_agreement is None else f", top-1 agreement {head.top1_agreement:.1%}"
            opt.echo(
                f"next-token distribution ({opt.escape_name(head.name)}): KL divergence "
                f"{head.kl_divergence:.4f} nats/token{top1}"
            )
        for m in shown:
            top1 = "" if m.top1_agreement is None else f", top-1 agreement {m.top1_agreement:.1%}"
            opt.echo(
                f"verified {opt.escape_name(m.name)}: SQNR {m.sqnr_db:.1f} dB, cosine {m.cosine:.4f}, "
                f"max abs error {m.max_abs_error:.3g}{top1}"
            )
        if len(shown) < len(check.outputs):
            opt.echo(f"  ({len(check.outputs) - len(shown)} more outputs, such as the KV cache, in --json)")
    else:
        opt.echo(check.note)
    opt.echo(f"wrote {', '.join(str(p) for p in summary.outputs)}")


def _echo_mixed_precision(info: dict[str, Any]) -> None:
    promoted = info["promoted"]
    bits = info["bits_per_weight"]
    ppl = info["calibration_ppl"]
    kinds: dict[str, int] = {}
    for p in promoted:
        kinds[p["to"]] = kinds.get(p["to"], 0) + 1
    what = ", ".join(f"{n} to {k}" for k, n in kinds.items()) or "none"
    after = bits["output"] or bits["mixed"]
    opt.echo(
        f"mixed precision: promoted {what}; bits per weight {bits['scheme']:.3f} -> {after:.3f}"
        + (
            f"; calibration ppl float {ppl['float']:.3f}, scheme {ppl['scheme']:.3f}, mixed {ppl['mixed']:.3f}"
            if ppl.get("float") is not None
            else ""
        )
    )
    for p in promoted[:8]:
        opt.echo(f"  {p['to']}: {opt.escape_name(p['module'] or p['node'] or p['weight'])} (rank {p['rank']})")
    if len(promoted) > 8:
        opt.echo(f"  ({len(promoted) - 8} more in --json)")


def _outputs_to_show(outputs: list[Any]) -> list[Any]:
    """All outputs of a small model; else those not named like a KV cache, plus the worst one.

    Not the worst one where the logits are among them: a language model's next-token distribution is the verdict.
    """
    if len(outputs) <= 4:
        return outputs
    main = [m for m in outputs if not m.name.startswith(("present", "past"))]
    if any(m.kl_divergence is not None for m in main):
        return main
    worst = min(outputs, key=lambda m: m.sqnr_db)
    return main + ([worst] if worst not in main else [])


def _group_reasons(records: list[Any]) -> list[tuple[str, list[str]]]:
    """Skipped layers grouped by reason, names in quotes generalised (an LLM has dozens of attention MatMuls)."""
    groups: dict[str, tuple[str, list[str]]] = {}
    for r in records:
        key = re.sub(r"'[^']*'", "'…'", r.reason)
        groups.setdefault(key, (r.reason, []))[1].append(r.node or r.weight)
    return [(first if len(names) == 1 else key, names) for key, (first, names) in groups.items()]


def _phases(phases: dict[str, float]) -> str:
    """The phases that took a second or more, e.g. ' (calibration 35.3 s, quantization 22.3 s)'; else ''."""
    long = {k: v for k, v in phases.items() if v >= 1.0}
    return f" ({', '.join(f'{k} {v:.1f} s' for k, v in long.items())})" if long else ""
