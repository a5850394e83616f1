"""The ``qonnx`` command line: the top layer, over ``qonnx.pipeline``."""

from qonnx.cli.main import cli, main

__all__ = ["cli", "main"]
