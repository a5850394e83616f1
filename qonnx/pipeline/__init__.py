"""The pipeline: quantize (calibrate once, then a printable pass list), verification, analysis, lowering, report.

Built on ``qonnx.core``, ``qonnx.passes``, ``qonnx.runtime`` and ``qonnx.models``; only ``qonnx.cli`` and the
``qonnx`` facade import it.
"""
