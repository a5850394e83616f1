"""Bad option values are refused while the options are read: exit 2, one line naming the option, no model loaded."""

from __future__ import annotations

import pytest

import qonnx.cli.models as models_command
import qonnx.cli.quantize as quantize_command
from qonnx.cli.main import main
from qonnx.core import modelfile


@pytest.fixture
def no_work(monkeypatch):
    """Every way a command starts its work records the call: a refusal must come before any of them."""
    calls: list[str] = []

    def spy(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran before the options were checked")

        return record

    monkeypatch.setattr(modelfile, "load", spy("modelfile.load"))
    monkeypatch.setattr(modelfile, "resolve_model_path", spy("modelfile.resolve_model_path"))
    monkeypatch.setattr(models_command, "layer_report", spy("layer_report"))
    monkeypatch.setattr(quantize_command, "start_reference_early", spy("start_reference_early"))
    return calls


def refused(capfd, *args):
    """Run ``qonnx ARGS`` in this process: exit 2, and the one line on stderr."""
    code = main([str(a) for a in args])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("qonnx: error: "), (code, err)
    return err[0]


@pytest.mark.parametrize("name", ["report.pdf", "report", "report.png"])
def test_report_output_suffix_is_checked_first(tmp_path, capfd, no_work, name):
    line = refused(capfd, "report", tmp_path / "a", tmp_path / "b", "-o", tmp_path / name)
    assert "'-o' / '--output'" in line and ".md or .html" in line and name in line
    assert no_work == []


@pytest.mark.parametrize("command", [["quantize", "m.onnx", "-o", "out"], ["analyze", "m.onnx"]])
def test_exclude_regex_is_reported_as_typed(tmp_path, capfd, no_work, command):
    line = refused(capfd, *command, "--exclude", "lm_head", "--exclude", "[(")
    assert "'--exclude'" in line and "'[(' is not a regular expression" in line and "re:" not in line
    assert no_work == []


def test_max_ppl_increase_names_the_option(capfd, no_work):
    line = refused(capfd, "quantize", "m.onnx", "-o", "out", "--max-ppl-increase", "abc")
    assert "--max-ppl-increase" in line and "'abc'" in line
    assert no_work == []


def test_report_output_that_cannot_be_a_file_is_refused_first(tmp_path, capfd, no_work):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir.md").mkdir()
    line = refused(capfd, "report", "a", "b", "-o", tmp_path / "file.txt" / "sub" / "r.md")
    assert "'-o' / '--output'" in line and "file.txt' is not a folder" in line
    line = refused(capfd, "report", "a", "b", "-o", tmp_path / "dir.md")
    assert "'-o' / '--output'" in line and "is a folder" in line
    assert no_work == []
