#!/usr/bin/env bash
# The user's path on the GPU machine, through the CLI only: a 7B Llama shape (random fp16 weights, exported by
# bench_gpu.py's build_and_export) quantized with `qonnx quantize --target cuda`, both lowered with
# `qonnx lower --target cuda`, and measured with `qonnx bench` (shared KV buffer + CUDA graph; the quantized
# model with its session option off and on). Each command's wall time goes to $OUT/times.txt.
#
#   bash benchmarks/device_cli_cuda.sh setup     # onnx-ir 1.1.0 + this project installed (after ort-gpu-chunks.sh)
#   bash benchmarks/device_cli_cuda.sh export    # ~250 s: /tmp/w/7b-fp16
#   bash benchmarks/device_cli_cuda.sh quantize  # quantize --target cuda, lower both
#   bash benchmarks/device_cli_cuda.sh bench     # qonnx bench, table + JSON + PNG into $OUT
#   bash benchmarks/device_cli_cuda.sh cpu       # the machine's CPU: SmolLM2 W8A8 (--target cpu) vs fp32, both
#                                                # lowered, qonnx bench --device cpu at batch 1 and 16
set -euo pipefail
export PYTHONPATH=/tmp/site
W=/tmp/w
S=${SIZE:-7b}  # a size of bench_gpu.py's SIZES
OUT=${OUT:-/tmp/out}
mkdir -p "$W" "$OUT"
timed() {  # timed LABEL CMD...: run, append "LABEL seconds rc" to times.txt
  local label=$1; shift
  local t0=$(date +%s.%N) rc=0
  "$@" || rc=$?
  echo "$label $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") rc=$rc" | tee -a "$OUT/times.txt"
  return $rc
}
case "$1" in
  setup)
    python3 -m pip install -q --no-deps --no-index --target /tmp/site .ortgpu/wheels/onnx_ir-1.1.0-py3-none-any.whl
    python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -1
    python3 -c "import torch, onnxruntime as ort; ort.preload_dlls(); print(ort.__version__, ort.get_available_providers()); import qonnx.passes"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader ;;
  export)
    timed export python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from bench_gpu import build_and_export
print(build_and_export('$S', Path('$W'), 'cuda'))" ;;
  quantize)
    timed quantize qonnx quantize $W/$S-fp16 -o $W/$S-w4cuda --target cuda 2>&1 | tail -n 20
    timed lower-w4 qonnx lower $W/$S-w4cuda -o $W/$S-w4cuda-l --target cuda 2>&1 | tail -n 5
    timed lower-fp16 qonnx lower $W/$S-fp16 -o $W/$S-fp16-l --target cuda 2>&1 | tail -n 5
    cp $W/$S-w4cuda/model.session_options.json "$OUT/" || true ;;
  bench)
    timed bench qonnx bench $W/$S-w4cuda-l --baseline $W/$S-fp16-l --batches ${BATCHES:-1,4,16,64} --prompt-len 128 \
      --new-tokens 32 --device cuda --plot "$OUT/bench_${S}_cuda.png" --json > "$OUT/bench_${S}_cuda.json"
    python3 -c "
import json; from qonnx.pipeline.bench import BenchReport; from qonnx.runtime.bench import BenchRow
d = json.load(open('$OUT/bench_${S}_cuda.json'))
rows = [BenchRow(**{k: v for k, v in r.items() if k != 'tokens_per_s'}) for r in d['rows']]
print(BenchReport(d['device'], d['prompt_len'], d['new_tokens'], rows, d['baseline']).table())" | tee "$OUT/bench_${S}_cuda.txt" ;;
  cpu)
    nproc | tee -a "$OUT/times.txt"
    timed cpu-export qonnx export smollm2 -o $W/smol-fp32 2>&1 | tail -n 2
    timed cpu-w8a8 qonnx quantize $W/smol-fp32 -o $W/smol-w8a8 --scheme w8a8 --target cpu --device cpu 2>&1 | tail -n 4
    timed cpu-lower-fp32 qonnx lower $W/smol-fp32 -o $W/smol-fp32-l --target cpu 2>&1 | tail -n 2
    timed cpu-lower-w8a8 qonnx lower $W/smol-w8a8 -o $W/smol-w8a8-l --target cpu 2>&1 | tail -n 2
    for len in 512 128; do
      timed cpu-bench-$len qonnx bench $W/smol-w8a8-l --baseline $W/smol-fp32-l --batches 1,16 --prompt-len $len \
        --new-tokens 16 --device cpu 2>&1 | tee "$OUT/bench_smol_cpu_$len.txt"
    done ;;
esac
