"""Exceptions that qonnx raises for problems a user can fix, and how text taken from a model is printed.

The CLI prints these as one line on stderr and exits with code 2; anything else is a bug in qonnx.
Names read from a model (nodes, tensors, metadata, external data locations) may hold newlines or
terminal escape sequences: messages show them through :func:`escape_name`, and everything the CLI
prints passes :func:`escape_text`, so a model can neither forge output lines nor drive the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

__all__ = [
    "QonnxError",
    "ModelLoadError",
    "ConfigError",
    "NothingToQuantizeError",
    "OutputPathError",
    "escape_name",
    "escape_text",
    "quiet_logger",
    "warn",
]


class QonnxError(Exception):
    """Base class of every error caused by user input (a model, a path, an option)."""


class ModelLoadError(QonnxError):
    """The input is missing, is not ONNX, is truncated, or its external data is unusable."""


class ConfigError(QonnxError, ValueError):
    """A scheme configuration or option is invalid."""


class NothingToQuantizeError(QonnxError):
    """The model has no layer that the chosen scheme can quantize."""


class OutputPathError(QonnxError):
    """The output path is unusable, for example it would overwrite the input."""


def _escaped(c: str) -> str:
    r"""One character as Python writes it inside a string literal (``\n``, ``\x1b``, ``\u202e``)."""
    return repr(c)[1:-1]


def escape_name(name: object, limit: int = 200) -> str:
    r"""``name`` as it may be printed: characters that are not printable escaped as Python's repr does.

    Newlines, ANSI/OSC escape sequences, bidirectional overrides and other control characters become
    ``\n``, ``\x1b``, ``\u202e`` ...; a backslash is doubled, so the escaped form is unambiguous. A name
    without such characters is returned as it is (letters of any script included). A name longer than
    ``limit`` characters is cut there, its length said: ``aaaa... (5000 characters)``.
    """
    text = str(name)
    cut = f"... ({len(text)} characters)" if len(text) > limit else ""
    text = text[:limit] if cut else text
    if not (text.isprintable() and "\\" not in text):
        text = "".join(c if c.isprintable() and c != "\\" else _escaped(c) for c in text)
    return text + cut


def escape_text(text: str) -> str:
    """``text`` as one line a terminal shows as it is: every character that is not printable escaped.

    For whole messages (which may quote names): unlike :func:`escape_name`, backslashes stay single.
    """
    return text if text.isprintable() else "".join(c if c.isprintable() else _escaped(c) for c in text)


def warn(message: str) -> None:
    """Print ``qonnx: WARNING: message`` on stderr, as one line (see :func:`escape_text`)."""
    print(f"qonnx: WARNING: {escape_text(message)}", file=sys.stderr)


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Within the block, the logger ``name`` logs errors only (a library's warnings that say nothing to act on)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
