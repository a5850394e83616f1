"""Remove weights nothing reads any more, in the main graph and in every subgraph.

onnx_ir's ``RemoveUnusedNodesPass`` removes unused nodes everywhere but unused initializers only in the
main graph: a float weight that a subgraph (an If branch, a Loop body) held and that was replaced by
its quantized form would stay in the file and make the output larger than the input.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

__all__ = ["RemoveUnusedInitializersPass", "remove_unused_weights"]

_CHAIN_OPS = ("Constant", "Transpose", "Cast", "Identity")


class RemoveUnusedInitializersPass(ir.passes.InPlacePass):
    """Remove initializers that nothing reads from every graph; graph inputs and outputs are kept."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Delete each unread initializer of the main graph and of every subgraph."""
        count = 0
        for graph in model.graphs():
            keep = {*graph.inputs, *graph.outputs}
            for value in list(graph.initializers.values()):
                if not value.uses() and value not in keep and value.name is not None:
                    del graph.initializers[value.name]
                    count += 1
        return ir.passes.PassResult(model, modified=bool(count))


def remove_unused_weights(values: Iterable[ir.Value | None], *, drop_graph_inputs: bool = False) -> int:
    """Remove each of ``values`` that nothing reads, with the Constant/Transpose/Cast/Identity nodes behind it.

    Only values that are initializers (in any graph) or outputs of those nodes are touched. An initializer
    that is also a graph input is kept unless ``drop_graph_inputs`` (IR versions before 4, where every
    initializer had to be listed as an input). Returns how many initializers and nodes were removed.
    """
    count = 0
    pending = [v for v in values if v is not None]
    while pending:
        value = pending.pop()
        if value.uses() or value.is_graph_output():
            continue
        producer = value.producer()
        if producer is not None:
            graph = producer.graph
            if producer.domain != "" or producer.op_type not in _CHAIN_OPS or not isinstance(graph, ir.Graph):
                continue
            if any(o.uses() or o.is_graph_output() for o in producer.outputs):
                continue
            inputs = [v for v in producer.inputs if v is not None]
            graph.remove(producer, safe=True)
            pending.extend(inputs)
            count += 1
            continue
        graph = value.graph
        if graph is None or not value.is_initializer() or value.name is None:
            continue
        if value.is_graph_input():
            if not drop_graph_inputs:
                continue
            graph.inputs.remove(value)
        del graph.initializers[value.name]
        count += 1
    return count
