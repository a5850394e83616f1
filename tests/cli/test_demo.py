"""``qonnx demo``: where it writes, and a table that says how each number was measured."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import qonnx_cli

from qonnx.cli import demo
from qonnx.cli.main import cli


def _result(fp32_prefill: float, w4_prefill: float) -> dict:
    rows = [
        {"model": "fp32", "bytes": 540_000_000, "perplexity": 14.70, "prefill_ms": fp32_prefill,
         "decode_tokens_per_s": 20.0, "answer": "Paris."},
        {"model": "w4a16", "bytes": 180_000_000, "perplexity": 19.9, "prefill_ms": w4_prefill,
         "decode_tokens_per_s": 30.0, "answer": "Paris."},
    ]  # fmt: skip
    return {
        "model": "smollm2.gguf",
        "rows": rows,
        "quantize_seconds": 2.0,
        "export_seconds": 60.0,
        "verification": {
            "worst_sqnr_db": 5.4,
            "logits": {"output": "logits", "kl_divergence": 0.2, "top1_agreement": 0.734},
        },
        "protocol": "pydoc corpus, first 8 windows of 512 tokens",
        "windows": 8,
        "seq_len": 512,
        "prefill_protocol": "512 tokens, batch 1, CPU, median of 3",
        "work_dir": "/cache/qonnx/demo",
    }


def test_table_says_each_protocol():
    table = demo.format_table(_result(2624.0, 2775.0))
    assert "ppl (8x512)" in table and "515.0 MiB" in table and "bytes" not in table
    assert "first 8 windows of 512 tokens; the README's figures use all 24 windows (fp32 14.20" in table
    assert "prefill: 512 tokens, batch 1, CPU, median of 3" in table
    assert "w4a16 prefill is slower than fp32 here (2775.0 vs 2624.0 ms)" in table
    assert "next-token KL divergence 0.2000 nats/token, top-1 agreement 73.4%" in table
    assert not table.splitlines()[0].endswith(".gguf")  # a title, not a bare file name
    assert "slower" not in demo.format_table(_result(2624.0, 2000.0))


def test_demo_writes_to_the_cache_not_the_current_folder(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(demo, "run_synthetic_demo", lambda work: seen.append(work) or {"rows": []})
    monkeypatch.setattr(demo, "format_table", lambda result: "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["demo", "--synthetic"]).exit_code == 0
    assert CliRunner().invoke(cli, ["demo", "--synthetic", "--work", "mine"]).exit_code == 0
    assert seen == [tmp_path / "cache" / "qonnx" / "demo", demo.Path("mine")]
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.default_work_dir() == demo.Path.home() / ".cache" / "qonnx" / "demo"


@pytest.mark.slow
def test_synthetic_demo_leaves_the_current_folder_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cwd").mkdir()
    res = qonnx_cli("demo", "--synthetic", cwd=tmp_path / "cwd")
    assert res.returncode == 0, res.stderr
    assert list((tmp_path / "cwd").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "cache" / "qonnx" / "demo").iterdir()) == [
        "synthetic-fp32",
        "synthetic-w4a16",
    ]
    assert "prefill: one forward over a [1, 128, 576] input, CPU, median of 10" in res.stdout
    res = qonnx_cli("demo", "--synthetic", "--work", tmp_path / "w", "--json")
    assert json.loads(res.stdout)["work_dir"] == str(tmp_path / "w")
