"""Sizes printed for people."""

from __future__ import annotations

from qonnx.core.sizes import human_bytes
from qonnx.pipeline.verification import VerifyOptions, start_verify


def test_human_bytes():
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(16859416) == "16.1 MiB"
    assert human_bytes(2 << 30) == "2.0 GiB" and human_bytes(5 << 40) == "5120.0 GiB"
    assert human_bytes(-2048) == "-2.0 KiB"


def test_verification_skip_note_is_human():
    note = start_verify(b"", None, VerifyOptions(), size=3 << 30).result().note  # type: ignore[arg-type]
    assert "over 2.0 GiB" in note and "MiB" not in note
