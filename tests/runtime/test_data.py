"""Evaluation and calibration data: windows, the pydoc corpus, text files."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.core.errors import ConfigError
from qonnx.runtime.data import (
    CALIBRATION_START,
    calibration_windows,
    evaluation_windows,
    pydoc_text,
    read_text,
)


def test_windows_are_consecutive_slices():
    tokens = np.arange(100)
    w = evaluation_windows(tokens, 10, 3)
    assert w.shape == (3, 10)
    np.testing.assert_array_equal(w.ravel(), np.arange(30))
    assert evaluation_windows(tokens, 30, None).shape == (3, 30)
    with pytest.raises(ConfigError, match="10 evaluation windows of 10 tokens fit"):
        evaluation_windows(tokens, 10, 11)
    with pytest.raises(ConfigError, match="at least 2"):
        evaluation_windows(tokens, 1, 3)
    c = calibration_windows(np.arange(CALIBRATION_START + 50), 20, 2)
    np.testing.assert_array_equal(c[0, :3], CALIBRATION_START + np.arange(3))
    assert c.shape == (2, 20)
    with pytest.raises(ConfigError, match="calibration"):
        calibration_windows(np.arange(CALIBRATION_START + 50), 20, 3)
    np.testing.assert_array_equal(calibration_windows(tokens, 5, 2, start=7).ravel(), np.arange(7, 17))


def test_pydoc_corpus_is_the_sorted_topics():
    from pydoc_data.topics import topics

    text = pydoc_text()
    first = sorted(topics)[0]
    assert text.startswith(topics[first])
    assert len(text) == sum(len(v) for v in topics.values()) + 2 * (len(topics) - 1)
    assert read_text("pydoc") == text


def test_read_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    assert read_text(tmp_path / "a.txt") == "hello world"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert read_text(tmp_path / "b.jsonl") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"body": "two"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c\.jsonl:2: .*'text' field"):
        read_text(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"d\.jsonl:1: not JSON"):
        read_text(tmp_path / "d.jsonl")
    (tmp_path / "e.csv").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\.txt or \.jsonl"):
        read_text(tmp_path / "e.csv")
    with pytest.raises(ConfigError, match="no such file"):
        read_text(tmp_path / "missing.txt")
