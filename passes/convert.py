"""Convert between the two weight-only forms: DequantizeLinear + MatMul and MatMulNBits.

Both forms hold the same codes, scales and zero points, so a round trip is exact.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qonnx.core import formats, packing, quant
from qonnx.passes import nodes

__all__ = ["DequantizeToMatMulNBitsPass", "MatMulNBitsToDequantizePass"]

_CODE_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}
_SIGNED = (ir.DataType.INT4, ir.DataType.INT8)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    t = ir.convenience.get_const_tensor(value)
    return None if t is None else t.numpy()


def _blocks_from_dequantize(dq: ir.Node) -> quant.QuantizedMatrix | None:
    """The blocked codes a DequantizeLinear of a [K, N] weight holds, or None if not convertible."""
    x = _const(dq.inputs[0])
    scale = _const(dq.inputs[1])
    zp = _const(dq.inputs[2]) if len(dq.inputs) > 2 else None
    x_type = dq.inputs[0].dtype if dq.inputs[0] is not None else None
    if x is None or scale is None or x_type not in _CODE_BITS or x.ndim != 2:
        return None
    if len(dq.inputs) > 2 and dq.inputs[2] is not None and zp is None:
        return None
    bits = _CODE_BITS[x_type]
    bs = dq.attributes.get_int("block_size", 0)
    axis = dq.attributes.get_int("axis", 1)
    k, n = x.shape
    if (
        bs not in (formats.FORMATS["matmulnbits"].block_sizes or ())
        or axis not in (0, -2)
        or scale.shape != (quant.num_blocks(k, bs), n)
    ):
        return None
    off = 1 << (bits - 1)
    codes = x.astype(np.int32)
    zps = zp.astype(np.int32) if zp is not None else np.zeros(scale.shape, np.int32)
    if x_type in _SIGNED:  # to the unsigned codes MatMulNBits stores
        codes, zps = codes + off, zps + off
    if np.all(zps == off):  # symmetric: QuantizedMatrix keeps those codes signed, zero point 0
        return quant.QuantizedMatrix((codes - off).astype(np.int8), scale, np.zeros_like(zps), bs, bits, True)
    return quant.QuantizedMatrix(codes.astype(np.uint8), scale, zps, bs, bits, False)


class DequantizeToMatMulNBitsPass(ir.passes.InPlacePass):
    """Fuse constant blocked DequantizeLinear (axis 0, block 16..256) + MatMul into MatMulNBits."""

    def __init__(self, accuracy_level: int | None = None) -> None:
        super().__init__()
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite every convertible pair; others are left as they are."""
        count = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type != "MatMul" or node.domain != "" or node.inputs[1] is None:
                continue
            dq = node.inputs[1].producer()
            if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "":
                continue
            qb = _blocks_from_dequantize(dq)
            dtype = node.inputs[0].dtype if node.inputs[0] is not None else None
            if qb is None or dtype is None:
                continue
            graph = node.graph
            assert isinstance(graph, ir.Graph)
            qw = formats.matmulnbits_arrays(qb, dtype.numpy())
            base = (dq.inputs[0].name if dq.inputs[0] is not None else None) or "weight"
            inputs = [nodes.initializer(graph, f"{base}_{k}", a) for k, a in qw.arrays.items()]
            new = nodes.fused_node(
                qw, node.inputs[0], inputs, name=f"{node.name}_Q{qb.bits}", accuracy_level=self.accuracy_level
            )
            ir.convenience.replace_nodes_and_values(graph, node, [node], [new], [node.outputs[0]], [new.outputs[0]])
            count += 1
        if count:
            model.opset_imports.setdefault(formats.MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(count))


class MatMulNBitsToDequantizePass(ir.passes.InPlacePass):
    """Expand MatMulNBits into opset-21 blocked DequantizeLinear + MatMul (+ Add for a bias).

    Nodes that use g_idx (act-order) are left as they are. The model must already have opset >= 21.
    """

    def requires(self, model: ir.Model) -> None:
        """Blocked DequantizeLinear needs opset 21."""
        if model.opset_imports.get("", 0) < 21:
            raise ir.passes.PreconditionError("blocked DequantizeLinear needs opset 21 (run UpgradeOpsetPass first)")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite every MatMulNBits node without g_idx."""
        count = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type != "MatMulNBits" or node.domain != formats.MS_DOMAIN:
                continue
            inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
            a, b_v, s_v, zp_v, g_idx, bias_v = inputs[:6]
            if g_idx is not None:
                continue
            b, scales = _const(b_v), _const(s_v)
            if b is None or scales is None or (zp_v is not None and _const(zp_v) is None):
                continue
            zp_arr = _const(zp_v)
            if zp_arr is not None and zp_arr.dtype != np.uint8:
                continue  # zero points in the float type: not a standard DequantizeLinear
            k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
            bits, bs = node.attributes.get_int("bits", 4), node.attributes.get_int("block_size")
            if bits not in (4, 8) or k is None or n is None or bs is None:
                continue
            nb = quant.num_blocks(k, bs)
            codes, zps = packing.unpack_matmulnbits(b, zp_arr, k=k, n=n, bits=bits, block_size=bs)
            default = 1 << (bits - 1)
            graph = node.graph
            assert isinstance(graph, ir.Graph)
            base = (b_v.name if b_v is not None else None) or "weight"
            if zp_arr is None:
                code_dtype = ml_dtypes.int4 if bits == 4 else np.int8
                x = (codes.astype(np.int16) - default).T.astype(code_dtype)
                dq_inputs = [x, scales.reshape(n, nb).T]
            else:
                code_dtype = ml_dtypes.uint4 if bits == 4 else np.uint8
                dq_inputs = [codes.T.astype(code_dtype), scales.reshape(n, nb).T, zps.T.astype(code_dtype)]
            names = ("q", "scale", "zero_point")
            values = [
                nodes.initializer(graph, f"{base}_{nm}", np.ascontiguousarray(arr))
                for nm, arr in zip(names, dq_inputs, strict=False)
            ]
            dq = nodes.dequantize_node(values, {"axis": 0, "block_size": bs}, name=f"{node.name}_DequantizeLinear")
            mm = ir.node("MatMul", [a, dq.outputs[0]], name=f"{node.name}_MatMul")
            new_nodes = [dq, mm]
            out = mm.outputs[0]
            if bias_v is not None:
                out.name = f"{node.outputs[0].name}_nobias"
                add = ir.node("Add", [out, bias_v], name=f"{node.name}_bias")
                new_nodes.append(add)
                out = add.outputs[0]
            ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [out])
            count += 1
        return ir.passes.PassResult(model, modified=bool(count))
