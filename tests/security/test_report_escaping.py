"""``qonnx report`` writes names from the model as text: no HTML, links or broken table cells in .md or .html."""

from __future__ import annotations

import html.parser
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qonnx
from qonnx.cli.main import main

SCRIPT = "<script>alert(1)</script>|x"
IMG = "<img src=x onerror=alert(2)>|[link](javascript:alert(3))$x^$"


def hostile_model(path):
    """Two MatMuls: one whose module path (torch.onnx name scopes) is SCRIPT, one whose weight is named IMG."""
    rng = np.random.default_rng(0)
    first = helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0")
    first.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=f"['', '{SCRIPT}', 'linear']")
    second = helper.make_node("MatMul", ["h", IMG], ["y"], name="mm1")
    graph = helper.make_graph(
        [first, second],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [
            numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w0"),
            numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), IMG),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def models(tmp_path):
    original = hostile_model(tmp_path / "m.onnx")
    quantized = qonnx.quantize(original, qonnx.W4A16(block_size=32), output=tmp_path / "q.onnx", verify=False)
    return original, quantized.outputs[0]


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_markdown_report_is_text(tmp_path, models, capfd):
    out = tmp_path / "r ](x)<img src=y onerror=alert(4)>.md"
    assert main(["report", str(models[0]), str(models[1]), "-o", str(out)]) == 0, capfd.readouterr().err
    text = out.read_text(encoding="utf-8")
    for raw in ("<script", "<img", "](javascript", "onerror=alert(4)>"):
        assert raw not in text, text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3  # header and two layers
    assert all(len(re.findall(r"(?<!\\)\|", row)) == 11 for row in rows), rows  # 10 columns: no cell split
    assert "&lt;script&gt;alert\\(1\\)&lt;/script&gt;\\|x" in text
    images = re.findall(r"!\[[^\n]*?\]\(([^)\s]+)\)", text)
    assert len(images) == 2 and all("%3C" in src and "%20" in src for src in images), images


def test_html_report_is_text(tmp_path, models, capfd):
    out = tmp_path / 'r" onerror="alert(5)<b>.html'
    assert main(["report", str(models[0]), str(models[1]), "-o", str(out)]) == 0, capfd.readouterr().err
    parser = _Tags()
    parser.feed(out.read_text(encoding="utf-8"))
    tags = {tag for tag, _ in parser.tags}
    assert tags <= {"meta", "title", "style", "h1", "p", "img", "table", "thead", "tbody", "tr", "th", "td"}, tags
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == 2 and all(set(a) == {"src", "alt"} for a in images), images
    assert all((tmp_path / a["alt"]).with_suffix(".png").is_file() for a in images)
