"""qonnx.core.formats: the size estimate of each emitted form equals the bytes of its arrays."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qonnx.core import formats, quant


@pytest.mark.parametrize(
    ("fmt", "k", "n", "bits", "block", "sym", "dtype"),
    [
        ("matmulnbits", 576, 40, 4, 128, False, np.float32),
        ("matmulnbits", 72, 24, 8, 32, True, np.float16),
        ("qdq", 100, 24, 4, 32, False, np.float32),
        ("qdq", 64, 48, 8, None, True, np.float16),
    ],
)
def test_size_estimate_matches_arrays(rng, fmt, k, n, bits, block, sym, dtype):
    qb = quant.quantize_kn(rng.standard_normal((k, n)).astype(np.float32), bits, block, sym, scale_dtype=dtype)
    ir_dtype = ir.DataType.FLOAT if dtype is np.float32 else ir.DataType.FLOAT16
    qw = formats.emit(qb, fmt, ir_dtype.numpy())
    est = formats.estimated_nbytes(
        fmt, k, n, bits=bits, block_size=block, symmetric=sym, scale_bytes=np.dtype(dtype).itemsize, name=""
    )
    overhead = formats.estimated_nbytes(fmt, 0, 0, bits=bits, block_size=block, symmetric=sym, scale_bytes=2, name="")
    assert est - overhead == qw.nbytes
