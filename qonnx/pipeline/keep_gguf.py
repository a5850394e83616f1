"""``qonnx export X.gguf --keep-quantization``: a GGUF model's own quantized weights, no float round trip.

The model is exported to float as usual (into a temporary folder beside the output), then every weight that
a Q8_0 / Q4_0 / Q4_1 tensor of the file dequantizes to, bit for bit, is replaced by that tensor's codes
(:class:`qonnx.passes.keep_quantization.KeepQuantizationPass`). The result is verified against the float
export (which holds the GGUF's dequantized weights: the two should agree to float32 rounding) and the
summary says which tensors stayed float and why.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from qonnx.core import modelfile
from qonnx.core.errors import ConfigError, OutputPathError, escape_name
from qonnx.core.ggml import KEPT_TYPES
from qonnx.core.outputs import temp_prefix
from qonnx.core.paths import MODEL_FILENAME
from qonnx.core.sizes import human_bytes
from qonnx.models.export import export_causal_lm
from qonnx.models.gguf import read_kept_weights
from qonnx.models.hf import gguf_source
from qonnx.passes.keep_quantization import KeepQuantizationPass, KeptLayer
from qonnx.pipeline.verification import Verification, VerifyOptions
from qonnx.pipeline.verification import verify as run_verify

__all__ = ["KeptExport", "export_kept"]


@dataclasses.dataclass
class KeptExport:
    """What ``export_kept`` wrote and found."""

    path: Path
    layers: list[KeptLayer]
    float_tensors: dict[str, str]  # GGUF tensor -> why it is float in the export
    verification: Verification

    @property
    def kept_bytes(self) -> int:
        """Bytes the kept weights take in the model (codes, float16 scales and minimums)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per kept weight."""
        weights = sum(layer.k * layer.n for layer in self.layers)
        return 8 * self.kept_bytes / weights if weights else 0.0

    def summary(self) -> list[str]:
        """The lines printed after the export."""
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.type] = counts.get(layer.type, 0) + 1
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) or "none"
        lines = [
            f"kept {len(self.layers)} GGUF tensors as MatMulNBits ({kinds}): "
            f"{human_bytes(self.kept_bytes)}, {self.bits_per_weight:.2f} bits/weight"
        ]
        groups: dict[str, list[str]] = {}
        for name, why in self.float_tensors.items():
            groups.setdefault(why, []).append(name)
        for why, names in groups.items():
            shown = ", ".join(escape_name(n) for n in names[:3]) + (
                f" and {len(names) - 3} more" if len(names) > 3 else ""
            )
            lines.append(f"float: {shown}: {why}")
        head = self.verification.logits
        if head is not None:
            lines.append(
                f"verified against the float export on {self.verification.inputs}: KL divergence "
                f"{head.kl_divergence:.2e} nats/token, top-1 agreement {head.top1_agreement:.1%}"
            )
        elif self.verification.note:
            lines.append(self.verification.note)
        return lines


def export_kept(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kv_cache: bool = True,
    opset: int | None = None,
    verify: bool = True,
    quiet: bool = False,
    log: TextIO | None = None,
) -> KeptExport:
    """Export a GGUF causal LM to ``out_dir`` with its Q8_0 / Q4_0 / Q4_1 weights kept as MatMulNBits.

    Raises:
        ConfigError: the source is not a GGUF file, or none of its tensors has a type that is kept.
        ModelLoadError: the GGUF file cannot be read.
        OutputPathError: ``out_dir`` is the source's folder or cannot be written.
    """
    path = gguf_source(source)
    if path is None:
        raise ConfigError(f"{source}: --keep-quantization needs a GGUF source (a .gguf file or a folder holding one)")
    out = Path(out_dir)
    if out.exists() and out.resolve() == path.parent.resolve():
        raise OutputPathError(f"{out}: is the source folder; choose another output folder")
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out}: exists and is not a folder")
    weights = read_kept_weights(path)
    if not weights.kept:
        counts: dict[str, int] = {}
        for t in weights.types.values():
            counts[t] = counts.get(t, 0) + 1
        types = ", ".join(f"{t} x{n}" for t, n in sorted(counts.items()))
        raise ConfigError(
            f"{path}: no tensor of a type kept as it is ({', '.join(KEPT_TYPES)}); its types: {types}; "
            "export without --keep-quantization"
        )
    out.mkdir(parents=True, exist_ok=True)
    log = log if log is not None else sys.stderr
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix("float-export"), dir=out))
    try:
        float_path = export_causal_lm(
            path, tmp, dtype="fp32", kv_cache=kv_cache, opset=opset, verify=verify, quiet=quiet
        )
        model = modelfile.load(float_path)
        keep = KeepQuantizationPass(weights.kept)
        keep(model)
        target = out / MODEL_FILENAME
        modelfile.save(model, target)
        del model
        for f in tmp.iterdir():
            if f.is_file() and f.name != MODEL_FILENAME and not f.name.startswith(MODEL_FILENAME):
                shutil.copy2(f, out / f.name)
        options = VerifyOptions(enabled=verify, data="pydoc" if (tmp / "tokenizer.json").is_file() else None)
        checked = run_verify(float_path, target, options, target.stat().st_size) if verify else Verification(False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    float_tensors = dict(weights.other)
    left = {r.weight: r.reason for r in keep.records if not r.quantized}
    kept_names = {layer.tensor for layer in keep.layers}
    for name in weights.kept:
        if name in kept_names:
            continue
        readers = [w for w, t in keep.matched.items() if t == name]
        why = keep.tied.get(name) or "; ".join(left.get(w, "left float") for w in readers)
        float_tensors[name] = f"{weights.types[name]}, " + (
            why or "no MatMul/Gemm weight of the export equals it (an embedding table, or moved by the loader)"
        )
    result = KeptExport(target, keep.layers, float_tensors, checked)
    if not quiet:
        for line in result.summary():
            print(f"qonnx export: {line}", file=log)
    return result
