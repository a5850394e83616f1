"""A decoder graph cut at its layer boundaries into pieces that run one after another.

Every node is given a *segment*: 0 for the prefix (embedding, attention mask, rotary tables: what the layers
share), ``i + 1`` for decoder layer ``i``, and the last for the suffix (final norm, lm_head). A node's layer
comes from torch.onnx's name scopes (node metadata ``pkg.torch.onnx.name_scopes``, e.g.
``model.model.layers.3.self_attn``) or else from its name (``/model/layers.3/...``, ``layers.3.attn.qkv``). A
node outside every layer goes to the earliest segment that has its inputs (a shape computed before layer 0
stays in the prefix), except one reading the last layer's output, which starts the suffix.

A piece (:meth:`LayerCut.piece`) is a segment's nodes, or the part of them some outputs need, as a model of its
own: its inputs are the graph inputs and the values of earlier segments that it reads (the residual stream,
the mask, the rotary tables), its initializers keep their external-data references, so ONNX Runtime reads
only the piece's weights from the memory-mapped file. Run in segment order, each fed the values of the earlier
ones, the pieces compute what the whole graph computes.

A graph cannot be cut when no node names a layer, when a node of one layer reads a value computed in a later
one, or when it holds control flow (If/Loop/Scan bodies read outer names): :class:`LayerCut` raises
:class:`UncuttableError` saying which.
"""

from __future__ import annotations

import re

import onnx

from qonnx.core.errors import ModelLoadError, escape_name

__all__ = ["LayerCut", "UncuttableError", "node_layer"]

#: ``layers.N`` (or ``h.N``, ``blocks.N``, ``layer.N``) as a whole component of a module path or node name.
_LAYER = re.compile(r"(?:^|[./'])(?:layers|layer|h|blocks|block)\.(\d+)(?=[./']|$)")
_SCOPES = "pkg.torch.onnx.name_scopes"


class UncuttableError(ModelLoadError):
    """The graph cannot be cut into decoder layers (see :mod:`qonnx.passes.layer_cut`)."""


def node_layer(node: onnx.NodeProto) -> int | None:
    """The decoder layer a node belongs to, from its torch.onnx name scopes or its name; None outside layers."""
    scopes = next((p.value for p in node.metadata_props if p.key == _SCOPES), None)
    found = _LAYER.findall(scopes if scopes else node.name)
    return int(found[0]) if found else None


class LayerCut:
    """The segments of a graph (prefix, one per decoder layer, suffix) and the values that cross them.

    Attributes:
        segments: the number of segments (layers + 2).
        layers: the decoder layer numbers, in order (segment ``i + 1`` is ``layers[i]``).
    """

    def __init__(self, proto: onnx.ModelProto, source: str = "model") -> None:
        graph = proto.graph
        self.proto = proto
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute
        ):
            raise UncuttableError(f"{source}: cannot cut into layers: the graph holds control flow (If/Loop/Scan)")
        found = [node_layer(n) for n in graph.node]
        self.layers = sorted({x for x in found if x is not None})
        if len(self.layers) < 1:
            raise UncuttableError(
                f"{source}: cannot cut into layers: no node names a decoder layer (torch.onnx name scopes or "
                "node names with layers.N)"
            )
        index = {layer: i + 1 for i, layer in enumerate(self.layers)}
        last = len(self.layers)
        self.segments = last + 2
        inputs = {i.name for i in graph.input}
        known = inputs | {t.name for t in graph.initializer}
        producer: dict[str, int] = {}  # value name -> segment that computes it
        static: set[str] = set()  # values computed from initializers alone (a transposed tied embedding, ...)
        self.node_segment: list[int] = []
        for node, layer in zip(graph.node, found, strict=True):
            lo, dynamic = 0, False
            for name in node.input:
                if not name or name in known:
                    dynamic = dynamic or name in inputs
                    continue
                if name not in producer:
                    raise UncuttableError(
                        f"{source}: cannot cut into layers: node '{escape_name(node.name)}' reads "
                        f"'{escape_name(name)}' before it is computed (the graph is not topologically sorted)"
                    )
                dynamic = dynamic or name not in static
                lo = max(lo, producer[name])
            if layer is not None:
                seg = index[layer]
                if seg < lo:
                    raise UncuttableError(
                        f"{source}: cannot cut into layers: node '{escape_name(node.name)}' of layer {layer} reads "
                        f"a value computed in layer {self.layers[lo - 1] if lo <= last else 'after the last'}"
                    )
            else:
                seg = self.segments - 1 if lo == last else lo
                if not dynamic:
                    static.update(o for o in node.output if o)
            self.node_segment.append(seg)
            for out in node.output:
                if out:
                    producer[out] = seg
        # A layer-less node computed from initializers alone runs where it is first read, not in the prefix:
        # its value, the same for every batch, is not handed on per batch through the layers in between.
        outputs = {o.name for o in graph.output}
        first_use: dict[str, int] = {}
        for i in reversed(range(len(graph.node))):
            node = graph.node[i]
            if node.output and all(o in static or not o for o in node.output):
                uses = [first_use[o] for o in node.output if o in first_use]
                uses += [self.segments - 1 for o in node.output if o in outputs]
                self.node_segment[i] = min(uses, default=self.node_segment[i])
                producer.update({o: self.node_segment[i] for o in node.output if o})
            for name in node.input:
                if name:
                    first_use[name] = min(first_use.get(name, self.segments), self.node_segment[i])
        self.producer = producer
        self.last_use: dict[str, int] = {}  # value name -> last segment that reads it (graph outputs: the suffix)
        for node, seg in zip(graph.node, self.node_segment, strict=True):
            for name in node.input:
                if name:
                    self.last_use[name] = max(self.last_use.get(name, -1), seg)
        self.types = {v.name: v.type for v in (*graph.input, *graph.value_info, *graph.output)}

    def segment_of(self, value: str) -> int:
        """The segment computing ``value`` (0 for graph inputs and initializers)."""
        return self.producer.get(value, 0)

    def handed_on(self, segment: int) -> list[str]:
        """Values computed in ``segment`` and read after it (what later pieces are fed)."""
        return sorted(n for n, seg in self.producer.items() if seg == segment < self.last_use.get(n, -1))

    def needed_after(self, name: str, segment: int) -> bool:
        """Whether a value (or initializer) is still read by a segment after ``segment``."""
        return self.last_use.get(name, -1) > segment

    def piece(self, segment: int, outputs: list[str]) -> onnx.ModelProto:
        """The nodes of ``segment`` that ``outputs`` (values it computes) need, as a model.

        Values of earlier segments it reads become graph inputs (see the module docstring).
        """
        if any(self.producer.get(o) != segment for o in outputs):
            raise ValueError(f"segment {segment} does not compute all of {outputs}")
        graph = self.proto.graph
        needed, keep = set(outputs), []
        for node, seg in zip(reversed(graph.node), reversed(self.node_segment), strict=True):
            if seg == segment and any(o in needed for o in node.output):
                keep.append(node)
                needed.update(i for i in node.input if i)
        keep.reverse()
        inner = {o for n in keep for o in n.output}
        out = onnx.ModelProto()
        out.CopyFrom(self.proto)
        del out.graph.node[:]
        out.graph.node.extend(keep)
        used = {i for n in keep for i in n.input if i}
        inits = [t for t in out.graph.initializer if t.name in used]
        init_names = {t.name for t in inits}
        del out.graph.initializer[:]
        out.graph.initializer.extend(inits)
        listed = {i.name: i for i in graph.input}
        inputs = [listed[n] for n in sorted(used - inner) if n in listed]
        inputs += [self._value_info(n) for n in sorted(used - inner - set(listed) - init_names)]  # earlier segments'
        del out.graph.input[:]
        out.graph.input.extend(inputs)
        del out.graph.output[:]
        out.graph.output.extend(self._value_info(o) for o in outputs)
        del out.graph.value_info[:]
        return out

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        """``name`` with its type (shape inference fills in the types a graph does not declare)."""
        if name not in self.types:
            inferred = onnx.shape_inference.infer_shapes(self.proto).graph
            self.types.update({v.name: v.type for v in inferred.value_info if v.name not in self.types})
        info = onnx.ValueInfoProto(name=name)
        if name in self.types:
            info.type.CopyFrom(self.types[name])
        return info
