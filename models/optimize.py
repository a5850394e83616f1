"""onnxscript's optimizer (``onnxscript.optimizer.optimize_ir``) with one rule's matching made linear.

The default rewrite rules include ``SlicesSplit`` (two ``Slice`` of one input -> ``Split``), the only rule
with two output nodes. onnxscript's matcher tries such a rule at every node of the graph and, for each,
first indexes the whole graph by op type, then tries every pair of ``Slice`` nodes: quadratic in the graph
size. On the 7,400-node SmolLM2 export that was about 95% of the optimizer's time (55 s of 58 s on an
idle 2-core machine). :class:`SiblingSliceMatcher` looks only at the other readers of the first
``Slice``'s input, which is where the pattern's second ``Slice`` must be, so the rule rewrites exactly
what it did. The pass list is ``optimize_ir``'s, in its order and with its defaults (onnxscript 0.7);
``tests/models/test_optimize.py`` compares the two on an exported model.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding  # FoldConstantsPass: optimize_ir's own folding pass
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import slice_split_rule
from onnxscript.rewriter.rules.common._basic_rules import SlicesSplit  # the rule's class, to rebuild it

__all__ = ["SiblingSliceMatcher", "optimize"]


class SiblingSliceMatcher(pattern.SimplePatternMatcher):
    """A matcher for patterns whose output nodes all read the first output node's first input.

    The pairs it tries are the first node and the other readers of that input (of the pattern's op types),
    instead of the first node and every node of the graph.
    """

    def match(
        self,
        model: ir.Model,
        graph_or_function: ir.Graph | ir.Function,
        node: ir.Node,
        *,
        verbose: int = 0,
        remove_nodes: bool = True,
        tracer: Any = None,
    ) -> pattern.MatchResult:
        """Match the pattern's first output node at ``node`` and the others among its input's readers."""
        outputs = self.pattern.output_nodes
        if self.pattern.has_single_output_node or any(p.op_identifier() is None for p in outputs):
            return super().match(model, graph_or_function, node, verbose=verbose, remove_nodes=remove_nodes)
        if node.op_identifier() != outputs[0].op_identifier() or not node.inputs or node.inputs[0] is None:
            return pattern.MatchResult().fail("Not the pattern's first op.")
        self._tracer = tracer
        self._graph = graph_or_function if isinstance(graph_or_function, ir.Graph) else graph_or_function.graph
        # onnxscript's order is the graph's; readers come in the order they were connected, the same in a
        # graph as exported (rewrites add nodes, never reorder the ones there).
        readers = list(dict.fromkeys(use.node for use in node.inputs[0].uses()))
        match: pattern.MatchResult = pattern.MatchResult().fail("No match found.")
        for other in outputs[1:2] if len(outputs) == 2 else ():
            for candidate in readers:
                if candidate.op_identifier() != other.op_identifier():
                    continue
                self._init_match(verbose)
                match = self._multi_match([node, candidate], check_removable=remove_nodes)
                if match:
                    return match
        return match


def _fast(rule: pattern.RewriteRule) -> pattern.RewriteRule:
    """``rule``; for ``slice_split_rule``, that rule built as ``.rule()`` does, with :class:`SiblingSliceMatcher`."""
    if rule is not slice_split_rule:
        return rule
    split = SlicesSplit()
    return pattern.RewriteRule(
        split.pattern,
        split.rewrite,
        split.check,
        matcher=SiblingSliceMatcher,
        name=split.name,
        remove_nodes=split.remove_nodes,
        graph_pre_visitor=split.setup,
        graph_post_visitor=split.cleanup,
        as_function=split.as_function,
    )


def optimize(model: ir.Model) -> None:
    """What ``onnxscript.optimizer.optimize(model)`` does to ``model`` (in place), in linear time."""
    rules = tuple(_fast(r) for r in rewriter._DEFAULT_REWRITE_RULES)
    passes = ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(
            [
                _constant_folding.FoldConstantsPass(
                    shape_inference=True,
                    input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                    output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                    should_fold=lambda node: None,
                ),
                rewriter.RewritePass(rules),
                common_passes.RemoveUnusedNodesPass(),
                common_passes.RemoveUnusedFunctionsPass(),
                common_passes.RemoveUnusedOpsetsPass(),
            ],
            steps=2,
            early_stop=True,
        ),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )
    passes(model)
