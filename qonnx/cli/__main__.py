"""``python -m qonnx.cli``."""

from qonnx.cli.main import main

raise SystemExit(main())
