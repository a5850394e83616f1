"""Kept Q4_1 weights as the graph computes them, (q-8)*d + (m+8d) in float32, vs gguf's own dequantize d*q+m."""

import numpy as np

from qonnx.models.gguf import read_kept_weights
from qonnx.models.hf import reference_model_path

w = read_kept_weights(reference_model_path())
worst_abs = worst_d = 0.0
exact = total = 0
for _name, km in w.kept.items():
    if km.type != "Q4_1":
        continue
    ref = km.dequantize().T
    rows = np.arange(ref.shape[0]) // 32
    graph = km.symmetric().dequantize() + km.offset()[rows]
    err = np.abs(graph - ref)
    d = np.abs(km.scale.astype(np.float32).T)[rows]
    worst_abs = max(worst_abs, float(err.max()))
    worst_d = max(worst_d, float((err / np.maximum(d, 1e-30)).max()))
    exact += int((err == 0).sum())
    total += err.size
print(f"Q4_1 tensors: {sum(k.type == 'Q4_1' for k in w.kept.values())}, weights {total}")
print(
    f"max |graph - gguf dequant| = {worst_abs:.3e}; max in units of the block scale d = {worst_d:.3e}; "
    f"bit-equal {exact / total:.4%}"
)
