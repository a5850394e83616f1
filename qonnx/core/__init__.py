"""The bottom layer: numerics, schemes as data, format emitters, the targets table, load/save, errors.

Nothing here imports from ``qonnx.passes``, ``qonnx.runtime``, ``qonnx.models``, ``qonnx.pipeline`` or
``qonnx.cli`` (``tests/test_structure.py`` checks it).
"""

#: The package version, written into every output's metadata.
__version__ = "0.1.0"
