"""Lower an exported transformer to ONNX Runtime's fused contrib ops: RMSNorm, rotary embedding, attention.

The exporter writes RMSNorm as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul, the rotary embedding as
Slice/Neg/Concat/Mul and attention as MatMul/Softmax/Where: about 70 small kernels per layer, which on a
GPU cost more than the weights take to read in a decode step. onnxscript's ORT fusions
(``onnxscript.rewriter.ort_fusions``) match them; this pass runs them in onnxscript's order, with three
additions for the graphs ``qonnx export`` writes:

- transformers >= 5 computes the rotary angles as ``position_ids[..., None] * inv_freq`` (a Mul), where
  onnxscript's cos/sin cache rule expects the older ``inv_freq @ position_ids`` (MatMul + Transpose).
  :class:`RopeAnglesAsMatMul` rewrites the first into the second (the same products), so that the rotary
  embedding becomes ``com.microsoft.RotaryEmbedding`` and attention can fuse around it.
- ``GroupQueryAttention`` masks causally from lengths it derives from ``position_ids``; onnxscript's rule
  does not check the model's mask (a sliding window would be dropped silently). It is only applied when
  every attention mask evaluates to the plain causal mask (see :mod:`qonnx.passes._attention_mask`) and
  uses the default scale; otherwise attention becomes ``MultiHeadAttention``, which takes the mask as it is.
- onnxscript's MultiHeadAttention and GroupQueryAttention rules do not check that the attention output
  is reshaped to [batch, sequence, hidden]; GPT-2 reshapes it to [batch * sequence, hidden] for a Gemm, and
  the fused model would not load. :func:`~qonnx.passes.fusion_rules.attention_rules` add that check.
- ONNX Runtime's CUDA GroupQueryAttention takes float16/bfloat16 only, and its CUDA MultiHeadAttention
  measured 10x slower at decode than the unfused ops: ``target="cuda"`` fuses attention only into
  GroupQueryAttention and leaves it unfused otherwise (float32 models, non-causal masks).
- transformers repeats K and V across query heads only when there are fewer KV heads; with equal counts
  (Llama-2-7B) an identity repeat is exposed first (:func:`~qonnx.passes.group_query_attention.expose_kv_repeat`)
  so that GroupQueryAttention (kv_num_heads == num_heads) applies. A float16 export rounds the attention scale
  (1/sqrt(128) becomes 0.08838 + 2e-5): a scale within
  :data:`~qonnx.passes.group_query_attention.SCALE_TOLERANCE` of 1/sqrt(head size) counts as the default.

The model's inputs and outputs stay as they are (past and present KV cache included). A model with
GroupQueryAttention reads only lengths from ``attention_mask`` (see
:func:`~qonnx.passes.group_query_attention.lengths_from_mask`): it computes as if each row's ones came first (no
left padding), which is how qonnx's evaluation and generation feed it.
onnxscript's final Transpose+MatMul -> FusedMatMul rewrite is left out: ONNX Runtime does it when it loads the
model, and a plain MatMul stays quantizable.
"""

from __future__ import annotations

import collections

import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.optimizer import optimize
from onnxscript.rewriter import pattern
from onnxscript.rewriter._fusion_utils import apply_fusion_rules
from onnxscript.rewriter.ort_fusions import attention as mha_attention
from onnxscript.rewriter.ort_fusions import (
    bias_gelu,
    cos_sin_cache,
    erfgelu,
    gelu,
    gqa_packed_qkv,
    mha_bias,
    mha_scale,
    rms_normalization,
    rotary_embedding,
    sdpa,
    sdpa_via_mha,
    shape_optimization,
    skip_normalization,
)

from qonnx.core.errors import ConfigError
from qonnx.core.targets import lowering_targets
from qonnx.passes._attention_mask import causal_mask_problem
from qonnx.passes.fusion_rules import (
    FUSION_DOMAIN,
    RopeAnglesAsMatMul,
    RopeInvFreqExpanded,
    attention_rules,
    cos_sin_cache_rules,
)
from qonnx.passes.group_query_attention import default_scale, expose_kv_repeat, lengths_from_mask
from qonnx.passes.merge_linear import MergeParallelLinearPass

#: The rewrite rules and the GroupQueryAttention edits live in qonnx.passes.fusion_rules and
#: qonnx.passes.group_query_attention; the rules stay importable from here.
__all__ = ["FuseForOrtPass", "RopeAnglesAsMatMul", "RopeInvFreqExpanded", "FUSED_OPS", "TARGETS"]

TARGETS = lowering_targets()
#: The contrib ops the fusions produce (com.microsoft, but SimplifiedLayerNormalization, which ONNX Runtime
#: registers in the default domain), counted in :attr:`FuseForOrtPass.fused`.
FUSED_OPS = (
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "RotaryEmbedding",
    "GroupQueryAttention",
    "MultiHeadAttention",
    "Attention",
    "Gelu",
    "FastGelu",
    "BiasGelu",
)
_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _fused_ops(model: ir.Model) -> collections.Counter[str]:
    """How many of each of FUSED_OPS the model holds, subgraphs included."""
    return collections.Counter(
        n.op_type
        for n in model.graph.all_nodes()
        if n.op_type in FUSED_OPS and (n.domain == "com.microsoft" or n.op_type == "SimplifiedLayerNormalization")
    )


class FuseForOrtPass(ir.passes.InPlacePass):
    """Fuse RMSNorm, rotary embedding and attention into ONNX Runtime contrib ops (see the module docstring).

    After the pass, :attr:`fused` counts the contrib ops in the model by type, :attr:`fusions` counts each
    onnxscript fusion that fired, and :attr:`notes` says why an attention fusion was not applied.
    """

    def __init__(
        self,
        target: str = "cpu",
        *,
        attention: bool = True,
        max_positions: int | None = None,
        merge_linear: bool = True,
        debug: bool = False,
    ) -> None:
        """Set the options.

        Args:
            target: the execution provider the model is for, "cpu" or "cuda".
            attention: also fuse attention (False: norms and rotary embedding only).
            max_positions: the model's largest sequence (``max_position_embeddings``): the rotary cos/sin
                cache becomes a constant of that many positions (see
                :func:`~qonnx.passes.fusion_rules.cos_sin_cache_rules`). None: computed at run time up to the
                largest position id fed.
            merge_linear: concatenate the linear layers that read one input into one node
                (:class:`qonnx.passes.merge_linear.MergeParallelLinearPass`): q/k/v read packed by
                GroupQueryAttention, and for CUDA also gate/up (followed by a Split).
            debug: print onnxscript's matching trace for each fusion that matched nothing.
        """
        super().__init__()
        if target not in TARGETS:
            raise ConfigError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
        if max_positions is not None and max_positions < 1:
            raise ConfigError(f"max_positions must be positive, not {max_positions}")
        self.max_positions = max_positions
        self.merge_linear = merge_linear
        self.target = target
        self.attention = attention
        self.debug = debug
        self.fusions: dict[str, int] = {}
        self.fused: dict[str, int] = {}
        self.notes: list[str] = []
        self.nodes_before = self.nodes_after = 0

    def requires(self, model: ir.Model) -> None:
        """Refuse a model that was already lowered (its patterns are gone; a second run finds nothing)."""
        done = sorted(_fused_ops(model))
        if done:
            raise ir.passes.PreconditionError(f"the model already holds fused ops ({', '.join(done)})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Run the fusions; count what they produced."""
        self.nodes_before = sum(1 for _ in model.graph.all_nodes())
        self.notes = []
        counts: dict[str, int] = {}
        # Fold constants first: a model cast to float16 after construction holds inv_freq in float16 and casts
        # it back at run time (Cast of a constant), which the rotary rules must see as a float32 constant.
        optimize(model)
        counts["rope_angles_as_matmul"] = pattern.RewriteRuleSet(
            [RopeAnglesAsMatMul.rule(), RopeInvFreqExpanded.rule()]
        ).apply_to_model(model)
        # As optimize_for_ort does: shapes (the rules check ranks and head counts), then shape simplification.
        common_passes.ShapeInferencePass()(model)
        optimize(model)
        shape_optimization.rules.apply_to_model(model)
        optimize(model)

        def fuse(name: str, func, **kwargs) -> int:  # type: ignore[no-untyped-def]
            counts[name] = func(model, debug=self.debug, **kwargs)
            return counts[name]

        fuse("erf_gelu", erfgelu.fuse_erfgelu)
        fuse("rms_normalization", rms_normalization.fuse_rms_normalization)
        fuse("skip_layer_normalization", skip_normalization.fuse_skip_layer_normalization)
        fuse("skip_rms_normalization", skip_normalization.fuse_skip_rms_normalization)
        fuse("rotary_embedding", rotary_embedding.fuse_rotary_embedding)
        if self.max_positions is None:
            fuse("cos_sin_cache", cos_sin_cache.fuse_cos_sin_cache)
        else:
            fuse("cos_sin_cache", apply_fusion_rules(cos_sin_cache_rules(self.max_positions)))
        common_passes.CommonSubexpressionEliminationPass()(model)
        fuse("partial_rotary_embedding", rotary_embedding.fuse_partial_rotary_embedding)
        attention = self.attention
        if attention and self.target == "cuda":
            # Only GroupQueryAttention is worth it on CUDA; find out on a copy whether it applies, since the
            # SDPA fusion it starts from cannot be undone.
            probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
            sdpa.fuse_sdpa(probe, apply_shape_inference=True)
            found = sum(1 for n in probe.graph if n.domain == FUSION_DOMAIN and n.op_type == "SDPA")
            blockers = self._gqa_blockers(probe)
            if not blockers and found:
                expose_kv_repeat(probe)
                apply_fusion_rules(attention_rules()[0])(probe)
                left = sum(1 for n in probe.graph if n.domain == FUSION_DOMAIN and n.op_type == "SDPA")
                if left:
                    blockers = [f"its pattern matched {found - left} of {found} attentions"]
            del probe
            if blockers:
                attention = False
                self.notes += [f"GroupQueryAttention not fused: {b}" for b in blockers]
                # ORT 1.31's CUDA MultiHeadAttention with a KV cache: 2.06 ms per decode call on an H100 (7B
                # shape), 10x slower than the unfused attention (benchmarks/RESULTS.md, bench_gpu).
                self.notes.append(
                    "attention left unfused: MultiHeadAttention measured 10x slower than the plain ops on CUDA"
                )
        if attention:
            gqa_rules, mha_past_rules, mha_rules = attention_rules()
            fuse("sdpa", sdpa.fuse_sdpa, apply_shape_inference=True)
            blockers = self._gqa_blockers(model)
            self.notes += [f"GroupQueryAttention not fused: {b}" for b in blockers]
            if not blockers:
                counts["kv_repeat_exposed"] = expose_kv_repeat(model)
                fuse("gqa", apply_fusion_rules(gqa_rules))
                fuse("packed_qkv_for_gqa", gqa_packed_qkv.fuse_qkv_gqa)
                counts["gqa_lengths_from_mask"] = lengths_from_mask(model)
            mha_count = fuse("mha1", apply_fusion_rules(mha_past_rules)) + fuse("mha2", apply_fusion_rules(mha_rules))
            fuse("mha_scale", mha_scale.fuse_mha_scale)
            if mha_count:
                fuse("mha_bias", mha_bias.fuse_mha_bias)
                fuse("attention", mha_attention.fuse_attention)
        fuse("gelu", gelu.fuse_gelu)
        fuse("bias_gelu", bias_gelu.fuse_bias_gelu)
        if attention:
            fuse("sdpa_via_mha", sdpa_via_mha.replace_sdpa_by_mha)
        if self.merge_linear:
            # gate/up merged and split apart again: +9% for 7B W4A16 decode on an H100, but on the CPU decode did
            # not change and a 16x128 prefill was 4% slower (the Split copies); q/k/v packed into
            # GroupQueryAttention need no Split and are merged for both (benchmarks/RESULTS.md).
            merge = MergeParallelLinearPass(split=self.target == "cuda")
            merge(model)
            counts["merged_linear"] = sum(merge.merged.values())
            counts["packed_qkv_for_gqa_merged"] = merge.packed_qkv
        # Inline what was matched but not consumed by a later fusion (e.g. a rotary embedding without a
        # cos/sin cache goes back to plain ops), drop the dead mask computation, then tidy up as
        # optimize_for_ort does.
        optimize(model)
        ir.passes.Sequential(
            common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
            common_passes.RemoveInitializersFromInputsPass(),
            common_passes.ShapeInferencePass(),
        )(model)
        self.nodes_after = sum(1 for _ in model.graph.all_nodes())
        ops = _fused_ops(model)
        self.fused = {op: ops[op] for op in FUSED_OPS if ops[op]}
        self.fusions = {k: v for k, v in counts.items() if v}
        return ir.passes.PassResult(model, modified=bool(self.fused) or bool(counts["rope_angles_as_matmul"]))

    def ensures(self, model: ir.Model) -> None:
        """No intermediate fusion op or function may be left: ONNX Runtime could not run the model."""
        left = {n.op_type for n in model.graph.all_nodes() if n.domain == FUSION_DOMAIN}
        left |= {f.name for f in model.functions.values() if f.domain == FUSION_DOMAIN}
        if left:
            raise ir.passes.PostconditionError(f"onnxscript left intermediate ops: {', '.join(sorted(left))}")

    def _gqa_blockers(self, model: ir.Model) -> list[str]:
        """Why the attentions found cannot become GroupQueryAttention (empty: they can)."""
        attentions = [n for n in model.graph if n.domain == FUSION_DOMAIN and n.op_type == "SDPA"]
        if not attentions:
            return []
        if self.target == "cuda" and any(n.inputs[0] is None or n.inputs[0].dtype not in _HALF for n in attentions):
            return ["ONNX Runtime's CUDA kernel takes float16/bfloat16 only"]
        if any(not default_scale(n) for n in attentions):
            return ["an attention uses a non-default scale"]
        masks = {n.inputs[3] for n in attentions if len(n.inputs) > 3}
        if None in masks or len(masks) == 0:
            return ["an attention has no mask input"]
        for mask in masks:
            problem = causal_mask_problem(model, mask)  # type: ignore[arg-type]
            if problem is not None:
                return [problem]
        return []
