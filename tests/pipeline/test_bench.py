"""``qonnx bench``: a quantized causal LM against its original, table, JSON and plot; refusals in one line."""

from __future__ import annotations

import json

import numpy as np
from builders import matmul_model
from helpers import assert_one_line_error, qonnx_cli

import qonnx
from qonnx.pipeline.bench import bench
from qonnx.runtime.bench import GROWING, SHARED, bench_model, session_config_of


def test_bench_against_the_original(llama, tmp_path):
    q = qonnx.quantize(llama, qonnx.W4A16().for_target("cuda"), output=tmp_path / "q" / "model.onnx").outputs[0]
    provider, entries = session_config_of(q)
    assert provider == "CUDAExecutionProvider" and entries == {"ep.cuda.fpa_intb_gemm": "1"}
    assert session_config_of(llama) == (None, {})
    report = bench(q, baseline=llama, device="cpu", batches=(1, 3), prompt_len=6, new_tokens=5)
    models = [r.model for r in report.rows]
    assert len(report.rows) == 4 and len(set(models)) == 2  # on the CPU the CUDA option is not tried
    for r in report.rows:
        assert r.prefill_ms > 0 and r.step_ms > 0 and np.isclose(r.tokens_per_s, r.batch * 1e3 / r.step_ms)
    table = report.table()
    assert "vs base" in table and table.count("x ") >= 2  # speed-ups of the quantized rows
    rows = bench_model(q, device="cpu", batches=(2,), prompt_len=4, new_tokens=3, session_config=entries)
    assert rows[0].options == "ep.cuda.fpa_intb_gemm=1" and rows[0].batch == 2


def test_cli(llama, tmp_path):
    png = tmp_path / "speed.png"
    res = qonnx_cli(
        "bench", llama, "--baseline", llama, "--batches", "1,2", "--prompt-len", "5", "--new-tokens", "4",
        "--device", "cpu", "--plot", png, "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert len(out["rows"]) == 4 and {r["batch"] for r in out["rows"]} == {1, 2}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = qonnx_cli("bench", llama, "--batches", "0")
    assert res.returncode == 2 and "batch sizes" in res.stderr and "Traceback" not in res.stderr
    rng = np.random.default_rng(0)
    layer = matmul_model(tmp_path / "m.onnx", rng.standard_normal((8, 4)).astype(np.float32))
    assert_one_line_error(qonnx_cli("bench", layer, "--device", "cpu"), "bench measures causal LMs")
    res = qonnx_cli("bench", llama, "--device", "cpu", "--prompt-len", "200")  # the tiny Llama has 128 positions
    assert_one_line_error(res, "--prompt-len + --new-tokens 216 exceeds the 128 positions")


def test_lowered_model_decodes_in_one_shared_buffer(generation_llama, generation_llama_gqa):
    """A lowered model is measured as deployed (shared KV buffer), and the table says when loops differ."""
    _, root = generation_llama
    report = bench(generation_llama_gqa, baseline=root / "kv", device="cpu", batches=(1, 2), prompt_len=5, new_tokens=6)
    loops = {r.model: r.loop for r in report.rows}
    assert loops == {"kv": GROWING, "gqa": SHARED}
    for r in report.rows:
        assert r.prefill_ms > 0 and r.step_ms > 0
    table = report.table()
    assert "shared KV" in table and "different loops" in table
    same = bench(
        generation_llama_gqa, baseline=generation_llama_gqa, device="cpu", batches=(1,), prompt_len=4, new_tokens=3
    )
    assert "different loops" not in same.table()
