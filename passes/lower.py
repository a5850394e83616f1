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
  the fused model would not load. :class:`_Rank3Output` adds that check.
- ONNX Runtime's CUDA GroupQueryAttention takes float16/bfloat16 only, and its CUDA MultiHeadAttention
  measured 10x slower at decode than the unfused ops: ``target="cuda"`` fuses attention only into
  GroupQueryAttention and leaves it unfused otherwise (float32 models, non-causal masks).
- transformers repeats K and V across query heads only when there are fewer KV heads; with equal counts
  (Llama-2-7B) an identity repeat is exposed first (:func:`_expose_kv_repeat`) so that GroupQueryAttention
  (kv_num_heads == num_heads) applies. A float16 export rounds the attention scale (1/sqrt(128) becomes
  0.08838 + 2e-5): a scale within :data:`SCALE_TOLERANCE` of 1/sqrt(head size) counts as the default.

The model's inputs and outputs stay as they are (past and present KV cache included). A model with
GroupQueryAttention reads only lengths from ``attention_mask`` (see :func:`_lengths_from_mask`): it computes as
if each row's ones came first (no left padding), which is how qonnx's evaluation and generation feed it.
onnxscript's final Transpose+MatMul -> FusedMatMul rewrite is left out: ONNX Runtime does it when it loads the
model, and a plain MatMul stays quantizable.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchResult

from qonnx.core.errors import ConfigError
from qonnx.core.targets import lowering_targets
from qonnx.passes._attention_mask import causal_mask_problem

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
_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate ops, not runnable in ONNX Runtime
_HALF = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _fused_ops(model: ir.Model) -> collections.Counter[str]:
    """How many of each of FUSED_OPS the model holds, subgraphs included."""
    return collections.Counter(
        n.op_type
        for n in model.graph.all_nodes()
        if n.op_type in FUSED_OPS and (n.domain == "com.microsoft" or n.op_type == "SimplifiedLayerNormalization")
    )


class RopeAnglesAsMatMul(pattern.RewriteRuleClassBase):
    """``Mul(Cast(Unsqueeze(position_ids, -1)), inv_freq)`` -> ``Transpose(MatMul(inv_freq[1,E,1], positions))``.

    The form transformers < 5 exported and onnxscript's cos/sin cache fusion recognizes; each element is
    the same single product, so the values are identical.
    """

    def pattern(self, op, position_ids, axes, inv_freq):  # type: ignore[no-untyped-def]
        """The angles as transformers >= 5 computes them."""
        positions = op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT)
        return op.Mul(positions, inv_freq)

    def check(self, context, position_ids, axes, inv_freq, **_) -> MatchResult:  # type: ignore[override]
        """2-D position ids unsqueezed last, times a constant 1-D float32 inv_freq."""
        del context
        result = MatchResult()
        if not _ir_utils.has_rank(position_ids, 2):
            return result.fail("position_ids is not 2D", position_ids)
        if _ir_utils.get_singleton_value(axes) not in (-1, 2):
            return result.fail("position_ids is not unsqueezed at the last axis", axes)
        const = inv_freq.const_value
        if const is None or len(const.shape) != 1 or inv_freq.dtype != ir.DataType.FLOAT:
            return result.fail("inv_freq is not a 1-D float32 constant", inv_freq)
        return result

    def rewrite(self, op, position_ids, inv_freq, **_):  # type: ignore[no-untyped-def]
        """The angles as transformers < 5 computed them."""
        column = inv_freq.const_value.numpy().reshape(1, -1, 1)
        positions = op.Cast(op.Unsqueeze(position_ids, op.Constant(value_ints=[1])), to=ir.DataType.FLOAT)
        angles = op.MatMul(op.Constant(value=ir.tensor(column, name=f"{inv_freq.name}_column")), positions)
        return op.Transpose(angles, perm=[0, 2, 1])


class RopeInvFreqExpanded(pattern.RewriteRuleClassBase):
    """``MatMul(Cast(Expand(inv_freq[1,E,1], shape), to=float), positions)`` -> ``MatMul(inv_freq_f32, positions)``.

    transformers < 5.20 expands inv_freq to the batch before the product; in a model cast to float16 after
    construction inv_freq is a float16 constant cast back to float32. The broadcasting MatMul computes the same
    products from the constant itself (the float16 -> float32 cast is exact), which the cos/sin cache rule needs.
    """

    def pattern(self, op, inv_freq, shape, positions):  # type: ignore[no-untyped-def]
        """The angles as transformers < 5.20 computes them."""
        return op.MatMul(op.Cast(op.Expand(inv_freq, shape), to=ir.DataType.FLOAT), positions)

    def check(self, context, inv_freq, **_) -> MatchResult:  # type: ignore[override]
        """inv_freq is a constant [1, E, 1]."""
        del context
        const = inv_freq.const_value
        if const is None or len(const.shape) != 3 or const.shape[0] != 1 or const.shape[2] != 1:
            return MatchResult().fail("inv_freq is not a constant [1, E, 1]", inv_freq)
        return MatchResult()

    def rewrite(self, op, inv_freq, positions, **_):  # type: ignore[no-untyped-def]
        """The same products, broadcast over the batch by MatMul."""
        column = inv_freq.const_value.numpy().astype("float32")
        return op.MatMul(op.Constant(value=ir.tensor(column, name=f"{inv_freq.name}_f32")), positions)


class _Rank3Output(pattern.RewriteRuleClassBase):
    """Mixin for an attention rule: refuse a match whose output (named ``_output``) is not rank 3."""

    _output = ""

    def check(self, context, **bindings) -> MatchResult:  # type: ignore[override]
        out = bindings.get(self._output)
        if out is not None and out.shape is not None and out.shape.rank() != 3:
            return MatchResult().fail(f"the attention output has rank {out.shape.rank()}, not 3", out)
        return super().check(context, **bindings)  # type: ignore[misc]


#: Relative difference from 1/sqrt(head size) still taken as the default scale: a float16 export rounds the
#: scale it multiplies by (1/sqrt(32) becomes 0.17674, 2e-4 off); GroupQueryAttention uses the exact value.
SCALE_TOLERANCE = 1e-3


def _default_scale(node: ir.Node) -> bool:
    """Whether an SDPA node's scale is 1/sqrt(head size), up to the rounding of a float16 export."""
    attr = node.attributes.get("scale")
    if attr is None:
        return True
    query = node.inputs[0]
    head = query.shape[-1] if query is not None and query.shape is not None and query.shape.rank() else None
    if not isinstance(head, int) or head <= 0:
        return False
    return abs(float(attr.as_float()) * head**0.5 - 1.0) <= SCALE_TOLERANCE


def _expose_kv_repeat(model: ir.Model) -> int:
    """Give attentions with as many KV heads as query heads the KV repeat GroupQueryAttention's rule expects.

    transformers repeats K and V across the query heads that share them (Unsqueeze, Expand, Reshape) only
    when there are fewer KV heads; with equal counts (Llama-2-7B) the rule finds no repeat and the attention
    would become MultiHeadAttention, measured 10x slower on CUDA. An identity repeat (Expand to the same
    shape) is inserted between the concatenated cache and the attention; GroupQueryAttention with
    kv_num_heads == num_heads replaces it, and if nothing does, it computes the same values. Returns the
    attentions changed.
    """
    changed = 0
    for node in list(model.graph):
        if node.domain != _FUSION_DOMAIN or node.op_type != "SDPA" or len(node.inputs) < 3:
            continue
        query, key, value = node.inputs[:3]
        heads = [
            v.shape[1] if v is not None and v.shape is not None and v.shape.rank() == 4 else None
            for v in (query, key, value)
        ]
        if None in heads or not isinstance(heads[0], int) or len(set(heads)) != 1:
            continue
        if any(v is None or v.producer() is None or v.producer().op_type == "Reshape" for v in (key, value)):  # type: ignore[union-attr]
            continue  # already repeated (fewer KV heads), or not the cache layout the rule knows
        head_size = key.shape[3] if key is not None and key.shape is not None else None  # type: ignore[union-attr]
        if not isinstance(head_size, int):
            continue
        for index, kv in ((1, key), (2, value)):
            assert kv is not None
            tag = f"{node.name or 'sdpa'}_kv{index}"
            unsq = ir.node("Unsqueeze", [kv, ir.val(f"{tag}_axes", const_value=ir.tensor([2], ir.DataType.INT64))])
            ones = ir.val(f"{tag}_ones", const_value=ir.tensor([1, 1, 1, 1, 1], ir.DataType.INT64))
            expand = ir.node("Expand", [unsq.outputs[0], ones])
            target = ir.val(f"{tag}_shape", const_value=ir.tensor([0, 0, -1, head_size], ir.DataType.INT64))
            reshape = ir.node("Reshape", [expand.outputs[0], target])
            for const in (unsq.inputs[1], ones, target):
                model.graph.register_initializer(const)  # type: ignore[arg-type]
            model.graph.insert_before(node, [unsq, expand, reshape])
            reshape.outputs[0].shape = kv.shape
            reshape.outputs[0].dtype = kv.dtype  # type: ignore[assignment]
            node.replace_input_with(index, reshape.outputs[0])
        changed += 1
    return changed


def _lengths_from_mask(model: ir.Model) -> int:
    """Feed every GroupQueryAttention its lengths from ``attention_mask``, not from position_ids.

    onnxscript's rule computes ``seqlens_k`` and ``total_sequence_length`` with ReduceMax over the values of
    ``position_ids``. On ONNX Runtime 1.31's CUDA provider those run on the GPU, and the kernel, which reads
    ``total_sequence_length`` as a CPU input, then sees a wrong value: a prompt of more than one token fails
    ("total sequence length must be positive") and a decoding step's present KV cache does not grow (measured
    on an H100). Here, as onnxruntime-genai's models do: ``total_sequence_length`` = the mask's second
    dimension (``Shape``: a CPU value, no copy from the device) and ``seqlens_k`` = the number of ones in each
    mask row, minus one (ReduceSum in int32: computed where the mask is, so a model on CUDA has no host/device
    copy in it and ONNX Runtime can capture its decode step in a CUDA graph). With a mask of ones (qonnx's
    evaluation and generation) both equal the previous ``Shape``-only lengths. A decode loop with a fixed-size
    KV buffer may pass a fixed-size mask, ones for the positions filled so far and zeros after: the lengths
    then say how much of the buffer is real, and every shape stays the same from step to step.
    Returns the nodes changed.
    """
    nodes = [n for n in model.graph if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    mask = next((v for v in model.graph.inputs if v.name == "attention_mask"), None)
    if not nodes or mask is None:
        return 0

    def const(name: str, array: Any) -> ir.Value:
        value = ir.val(name, const_value=ir.tensor(array))
        model.graph.register_initializer(value)
        return value

    shape = ir.node("Shape", [mask])
    total64 = ir.node("Gather", [shape.outputs[0], const("gqa_axis_1", np.array(1, np.int64))], attributes={"axis": 0})
    total = ir.node("Cast", [total64.outputs[0]], attributes={"to": ir.DataType.INT32})
    mask32 = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT32})
    if model.opset_imports.get("", 13) >= 13:
        count = ir.node(
            "ReduceSum", [mask32.outputs[0], const("gqa_axes_1", np.array([1], np.int64))], attributes={"keepdims": 0}
        )
    else:
        count = ir.node("ReduceSum", [mask32.outputs[0]], attributes={"axes": [1], "keepdims": 0})
    seqlens = ir.node("Sub", [count.outputs[0], const("gqa_one_i32", np.array(1, np.int32))])
    total.outputs[0].name, seqlens.outputs[0].name = "gqa_total_sequence_length", "gqa_seqlens_k"
    total.outputs[0].dtype = seqlens.outputs[0].dtype = ir.DataType.INT32
    total.outputs[0].shape = ir.Shape([])
    model.graph.insert_before(nodes[0], [shape, total64, total, mask32, count, seqlens])
    for node in nodes:
        node.replace_input_with(5, seqlens.outputs[0])
        node.replace_input_with(6, total.outputs[0])
    return len(nodes)


def _attention_rules() -> tuple[pattern.RewriteRuleSet, pattern.RewriteRuleSet, pattern.RewriteRuleSet]:
    """The GQA, MHA-with-past and MHA-without-past rule sets, with the rank-3 output check."""
    from onnxscript.rewriter.ort_fusions import gqa, mha

    class GroupQueryAttention(_Rank3Output, gqa.GroupQueryAttention):  # type: ignore[misc]
        _output = "attention_BSD"

    class MultiHeadAttention(_Rank3Output, mha.MultiHeadAttention):  # type: ignore[misc]
        _output = "attention_reshaped"

    def mha_rules(past: bool) -> pattern.RewriteRuleSet:
        return pattern.RewriteRuleSet(
            [
                MultiHeadAttention.rule(
                    f"MHA{'_Rotary' * rotary}{'_Past' * past}{'_CrossAttention' * cross}",
                    is_rotary=rotary,
                    has_past_present=past,
                    is_cross_attention=cross,
                )
                for rotary in (False, True)
                for cross in ((False,) if past else (False, True))
            ]
        )

    return pattern.RewriteRuleSet([GroupQueryAttention.rule()]), mha_rules(True), mha_rules(False)


def _cos_sin_cache_rules(max_positions: int) -> pattern.RewriteRuleSet:
    """The cos/sin cache rules of onnxscript, writing a constant cache of ``max_positions`` positions.

    Without a size, onnxscript computes the cache at run time over ``Range(ReduceMax(position_ids) + 1)``: six
    nodes a step, whose ReduceMax result must come back from the GPU for Range (a copy and a wait on CUDA, and
    no CUDA graph capture), and a cache only as long as the largest position fed, which GroupQueryAttention
    refuses when told a longer total length (a fixed-size KV buffer). The constant holds the same products
    (position x inv_freq, one float32 multiplication each), so the values equal the run-time ones.
    """
    from onnxscript.rewriter.ort_fusions import cos_sin_cache

    class FixedCosSinCache(cos_sin_cache.CosSinCacheFusion):  # type: ignore[misc]
        def __init__(self, name: str, **kwargs: Any) -> None:
            super().__init__(name, **kwargs)
            self.max_pos_id = max_positions - 1  # onnxscript's cache covers positions 0 .. max_pos_id

    return pattern.RewriteRuleSet(
        [
            FixedCosSinCache.rule("CosSinCache_cast", cast=True),
            FixedCosSinCache.rule("CosSinCache_cast_const_freqs", cast=True, const_freqs=True),
            FixedCosSinCache.rule("CosSinCache_const_freqs", const_freqs=True),
            FixedCosSinCache.rule("CosSinCache"),
        ]
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
                cache becomes a constant of that many positions (see :func:`_cos_sin_cache_rules`). None:
                computed at run time up to the largest position id fed.
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
        from onnxscript.optimizer import optimize
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
            fuse("cos_sin_cache", apply_fusion_rules(_cos_sin_cache_rules(self.max_positions)))
        common_passes.CommonSubexpressionEliminationPass()(model)
        fuse("partial_rotary_embedding", rotary_embedding.fuse_partial_rotary_embedding)
        attention = self.attention
        if attention and self.target == "cuda":
            # Only GroupQueryAttention is worth it on CUDA; find out on a copy whether it applies, since the
            # SDPA fusion it starts from cannot be undone.
            probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
            sdpa.fuse_sdpa(probe, apply_shape_inference=True)
            found = sum(1 for n in probe.graph if n.domain == _FUSION_DOMAIN and n.op_type == "SDPA")
            blockers = self._gqa_blockers(probe)
            if not blockers and found:
                _expose_kv_repeat(probe)
                apply_fusion_rules(_attention_rules()[0])(probe)
                left = sum(1 for n in probe.graph if n.domain == _FUSION_DOMAIN and n.op_type == "SDPA")
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
            gqa_rules, mha_past_rules, mha_rules = _attention_rules()
            fuse("sdpa", sdpa.fuse_sdpa, apply_shape_inference=True)
            blockers = self._gqa_blockers(model)
            self.notes += [f"GroupQueryAttention not fused: {b}" for b in blockers]
            if not blockers:
                counts["kv_repeat_exposed"] = _expose_kv_repeat(model)
                fuse("gqa", apply_fusion_rules(gqa_rules))
                fuse("packed_qkv_for_gqa", gqa_packed_qkv.fuse_qkv_gqa)
                counts["gqa_lengths_from_mask"] = _lengths_from_mask(model)
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
            from qonnx.passes.merge_linear import MergeParallelLinearPass

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
        left = {n.op_type for n in model.graph.all_nodes() if n.domain == _FUSION_DOMAIN}
        left |= {f.name for f in model.functions.values() if f.domain == _FUSION_DOMAIN}
        if left:
            raise ir.passes.PostconditionError(f"onnxscript left intermediate ops: {', '.join(sorted(left))}")

    def _gqa_blockers(self, model: ir.Model) -> list[str]:
        """Why the attentions found cannot become GroupQueryAttention (empty: they can)."""
        attentions = [n for n in model.graph if n.domain == _FUSION_DOMAIN and n.op_type == "SDPA"]
        if not attentions:
            return []
        if self.target == "cuda" and any(n.inputs[0] is None or n.inputs[0].dtype not in _HALF for n in attentions):
            return ["ONNX Runtime's CUDA kernel takes float16/bfloat16 only"]
        if any(not _default_scale(n) for n in attentions):
            return ["an attention uses a non-default scale"]
        masks = {n.inputs[3] for n in attentions if len(n.inputs) > 3}
        if None in masks or len(masks) == 0:
            return ["an attention has no mask input"]
        for mask in masks:
            problem = causal_mask_problem(model, mask)  # type: ignore[arg-type]
            if problem is not None:
                return [problem]
        return []
