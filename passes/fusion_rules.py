"""onnxscript rewrite rules that :class:`qonnx.passes.lower.FuseForOrtPass` adds to onnxscript's ORT fusions.

Two rules turn the rotary angles of newer transformers exports into the form onnxscript's cos/sin cache fusion
recognizes (:class:`RopeAnglesAsMatMul`, :class:`RopeInvFreqExpanded`); onnxscript's attention rules get a check
that the attention output is rank 3 (:func:`attention_rules`), and its cos/sin cache rules a constant cache of a
fixed size (:func:`cos_sin_cache_rules`).
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter.ort_fusions import cos_sin_cache, gqa, mha

__all__ = ["FUSION_DOMAIN", "RopeAnglesAsMatMul", "RopeInvFreqExpanded", "attention_rules", "cos_sin_cache_rules"]

#: The domain of onnxscript's intermediate fusion ops (SDPA, ...): not runnable in ONNX Runtime.
FUSION_DOMAIN = "ai.onnxruntime._fusion"


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


def attention_rules() -> tuple[pattern.RewriteRuleSet, pattern.RewriteRuleSet, pattern.RewriteRuleSet]:
    """The GQA, MHA-with-past and MHA-without-past rule sets, with the rank-3 output check."""

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


def cos_sin_cache_rules(max_positions: int) -> pattern.RewriteRuleSet:
    """The cos/sin cache rules of onnxscript, writing a constant cache of ``max_positions`` positions.

    Without a size, onnxscript computes the cache at run time over ``Range(ReduceMax(position_ids) + 1)``: six
    nodes a step, whose ReduceMax result must come back from the GPU for Range (a copy and a wait on CUDA, and
    no CUDA graph capture), and a cache only as long as the largest position fed, which GroupQueryAttention
    refuses when told a longer total length (a fixed-size KV buffer). The constant holds the same products
    (position x inv_freq, one float32 multiplication each), so the values equal the run-time ones.
    """

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
