"""AWQ in the pipeline: group the layers that read one input, search their scales on the Hessians, fold them.

Called by :func:`qonnx.quantize` for the layers whose config has ``algo`` AWQ (``"awq"`` or ``"awq+gptq"``),
once the Hessians of their inputs have been collected from the float model (the same pass GPTQ uses). For
each input tensor X, in graph order, with its AWQ readers (q/k/v share one, gate/up share one):

1. the scale search (:func:`qonnx.passes.awq.search_scales`) on the readers' weights and X's Hessian;
2. the fold (:func:`qonnx.passes.smooth_quant.fold`, SmoothQuant's): ``X / s`` into the RMSNorm/LayerNorm
   weight, the up projection's columns (SwiGLU), or the preceding linear's columns, and ``s`` into the
   readers' weight rows (lazily, when the weight pass reads them). Where nothing can absorb ``X / s`` (the
   attention output read by o_proj) the readers keep ``s = 1``: AWQ adds no node (an explicit Mul there,
   measured on SmolLM2-135M, gave perplexity 16.14 against 16.10 without);
3. awq: the clip search (:func:`qonnx.passes.awq.search_clip`) per reader, on the Hessian of ``X / s``;
   awq+gptq: the Hessian of ``X / s`` replaces X's, and GPTQ chooses its own ranges (its ``clip_search``:
   AWQ's ranges given to GPTQ measured the same, 15.31 against 15.30).

The result tells the weight pass each weight's range shrinks and each layer's record what AWQ did.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qonnx.core.config import WeightOnlyConfig
from qonnx.passes import awq
from qonnx.passes.smooth_quant import SmoothGroup, absorber, fold
from qonnx.passes.weight_only import all_value_names
from qonnx.passes.weight_plan import Plan, act_dtype, hessian_key
from qonnx.passes.weights import WeightCandidate
from qonnx.runtime.calibration import spill

__all__ = ["AWQResult", "apply_awq"]


@dataclasses.dataclass
class AWQResult:
    """What :func:`apply_awq` decided.

    Attributes:
        shrinks: weight name -> range shrink per block and column [nblocks, N] (the clip search's result).
        notes: weight name -> what AWQ did to that layer, for its record.
        groups: input tensor -> alpha (None: not scaled) and where ``X / s`` went.
    """

    shrinks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


def _simple(cand: WeightCandidate) -> bool:
    """A weight stored for this node alone, read as it is stored (or transposed by Gemm): it can be scaled."""
    src = cand.source
    if cand.axis is not None or cand.chain or src is None or src.producer() is not None or len(src.uses()) != 1:
        return False
    return not (cand.node.op_type == "Gemm" and cand.node.attributes.get_float("alpha", 1.0) != 1.0)


def _rounding(cand: WeightCandidate, cfg: WeightOnlyConfig) -> awq.Rounding:
    return awq.Rounding(cfg.bits, cfg.block_size, cfg.symmetric, act_dtype(cand).numpy())


def apply_awq(model: ir.Model, plan: Plan, hessians: dict[str, np.ndarray], *, progress: bool = False) -> AWQResult:
    """Search, fold and clip for every AWQ layer of ``plan``; ``hessians`` (by input name) are updated in place.

    Hessians of inputs read only by AWQ layers are dropped once used, unless GPTQ rounds those layers
    (awq+gptq): then they are replaced by the Hessians of the scaled inputs.
    """
    groups: dict[str, list[tuple[WeightCandidate, WeightOnlyConfig]]] = {}
    for cand, cfg, _ in plan:
        if cfg is not None and cfg.awq is not None:
            groups.setdefault(hessian_key(cand), []).append((cand, cfg))
    rounded_by_gptq = {hessian_key(c) for c, cfg, _ in plan if cfg is not None and cfg.gptq is not None}
    result = AWQResult()
    taken = all_value_names(model)
    bar = tqdm(total=len(groups), desc="awq", unit="input", file=sys.stderr, disable=not progress, leave=False)
    with tempfile.TemporaryDirectory(prefix="qonnx-awq-") as tmp:
        for index, (name, readers) in enumerate(groups.items()):
            h = hessians[name]
            cfg0 = readers[0][1]
            options = cfg0.awq
            assert options is not None
            x = readers[0][0].node.inputs[0]
            assert x is not None
            weights = [np.array(cand.matrix()) for cand, _ in readers]  # copies: the stored weights get unmapped
            formats = [_rounding(cand, cfg) for cand, cfg in readers]
            simple = all(_simple(cand) for cand, _ in readers)
            group = SmoothGroup(
                name,
                [
                    (c.node, c.source, c.node.op_type == "Gemm" and bool(c.node.attributes.get_int("transB", 0)))
                    for c, _ in readers
                    if c.source is not None
                ],
            )
            where = absorber(x, group) if simple else None
            s = None
            note = "awq: input not scaled ("
            if where is None:
                note += "nothing before it can absorb a scale)" if simple else "a weight is shared or transformed)"
                info: dict[str, Any] = {"alpha": None, "into": None}
            else:
                search = awq.search_scales(list(zip(weights, formats, strict=True)), h, grid=options.grid)
                info = {"alpha": search.alpha, "error": round(search.error / max(search.rtn_error, 1e-30), 4)}
                if search.alpha is None:
                    note += "no alpha did better than round-to-nearest)"
                else:
                    s = search.s
                    _, where = fold(model.graph, x, group, s, taken)  # something absorbs X / s: X keeps its name
                    info["into"] = where
                    note = (
                        f"awq: alpha {search.alpha:.2f}, input scale folded into {where}, "
                        f"output error {info['error']:.2f}x round-to-nearest's"
                    )
            result.groups[name] = info
            hs = h if s is None else awq.scaled_hessian(h, s)
            for (cand, cfg), w, fmt in zip(readers, weights, formats, strict=True):
                text = note
                if options.clip_search and _simple(cand) and cfg.gptq is None:  # GPTQ chooses its own ranges
                    ws = w if s is None else w * s[:, None]
                    shrink = awq.search_clip(ws, hs, fmt)
                    result.shrinks[cand.weight_name] = shrink
                    text += f"; clip search: ranges x{float(shrink.mean()):.3f} on average"
                result.notes[cand.weight_name] = text
            del weights
            group.release()
            if name not in rounded_by_gptq:
                hessians.pop(name, None)
            elif s is not None:  # X has no other readers (the fold needs that): GPTQ sees X / s
                hessians[name] = spill(hs, Path(tmp), index)
            bar.update()
    bar.close()
    return result
