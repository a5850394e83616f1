"""The ``qonnx`` command group, and :func:`main`, which turns every error into one line on stderr.

Each command lives in its own module, imported only when the command runs (click's "lazily loading
subcommands" pattern), so that ``qonnx --help`` and ``qonnx quantize`` load nothing they do not use.
Every problem with the user's input prints one line on stderr and exits with code 2; no traceback, and no
line before it: what libraries warn or log meanwhile is held back, and printed (one line each) only when
the command succeeds. Text from a model is escaped (:func:`qonnx.core.errors.escape_text`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import click

from qonnx.core import __version__
from qonnx.core.errors import QonnxError, escape_name, escape_text
from qonnx.pipeline.verification import VerificationError

__all__ = ["COMMANDS", "EXIT_USAGE", "EXIT_VERIFY", "LazyGroup", "Terminated", "cli", "main"]

EXIT_USAGE = 2
EXIT_VERIFY = 3
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived: raised where the program is, so that it unwinds as on Ctrl-C (temporary files go)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


#: Each command: ``module:attribute`` of its click command, and its summary in ``qonnx --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("qonnx.cli.export:export_command", "Export a Hugging Face or GGUF model to an ONNX folder."),
    "quantize": ("qonnx.cli.quantize:quantize_command", "Quantize an ONNX model (W4A16 by default), verified."),
    "eval": ("qonnx.cli.models:eval_command", "Perplexity of a causal LM, or an encoder's similarity."),
    "generate": ("qonnx.cli.models:generate_command", "Generate text with an exported causal LM."),
    "inspect": ("qonnx.cli.inspection:inspect_command", "Opsets, ops, weights and quantizable layers."),
    "analyze": ("qonnx.cli.analyze:analyze_command", "Rank the layers by the error each adds, quantized alone."),
    "report": ("qonnx.cli.models:report_command", "Per-layer error of a quantized model, worst first."),
    "lower": ("qonnx.cli.models:lower_command", "Fuse into ONNX Runtime contrib ops (attention, RMSNorm)."),
    "bench": ("qonnx.cli.bench:bench_command", "Prefill and decode speed against the original, on this machine."),
    "demo": ("qonnx.cli.demo:demo_command", "Export, quantize and measure SmolLM2-135M, offline."),
}

EXAMPLES = """\b
Examples:
  qonnx demo                          export, quantize and measure SmolLM2
  qonnx export smollm2 -o smol/       the reference model, offline
  qonnx quantize smol/ -o smol-w4/    W4A16, verified against smol/
  qonnx quantize smol/ -o smol-gptq/ --algo gptq
  qonnx eval smol-w4/                 perplexity on the standard protocol
  qonnx generate smol-w4/ --prompt "Name three colors."

'qonnx COMMAND --help' lists a command's options, each with its default."""


class LazyGroup(click.Group):
    """A group whose commands are imported by name on first use (click's "Lazily Loading Subcommands").

    The list in ``--help`` comes from the table, so that help imports none of them (some load torch).
    """

    def __init__(self, *args: Any, lazy_subcommands: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands

    def list_commands(self, ctx: click.Context) -> list[str]:
        """The commands in the table's order (the order of the work), then any added directly."""
        return [*self.lazy_subcommands, *super().list_commands(ctx)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, its module imported now."""
        if cmd_name not in self.lazy_subcommands:
            return super().get_command(ctx, cmd_name)
        module, _, name = self.lazy_subcommands[cmd_name][0].partition(":")
        command = getattr(importlib.import_module(module), name)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module}:{name} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The Commands section, from the table's summaries."""
        rows = [(name, summary) for name, (_, summary) in self.lazy_subcommands.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    lazy_subcommands=COMMANDS,
    epilog=EXAMPLES,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.version_option(__version__, prog_name="qonnx")
def cli() -> None:
    """Quantize ONNX models into smaller, faster ONNX models for ONNX Runtime."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line on stderr and return 2.

    Python warnings and log records of the libraries (onnx_ir, numpy, ...) are held back while the command
    runs: after an error they are dropped (the error line says what is wrong), after success each distinct
    one is printed as a line. transformers logs errors only. SIGTERM unwinds (temporary files are removed).
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    if "transformers" in sys.modules:  # imported already (main() called from Python)
        sys.modules["transformers"].logging.set_verbosity_error()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    try:
        with _held_back() as notes:
            code = _run(argv)
    except Terminated:
        click.echo("qonnx: terminated", err=True)
        return EXIT_TERMINATED
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if code == 0:
        for note in dict.fromkeys(notes):
            click.echo(f"qonnx: note: {escape_text(note)}", err=True)
    return code


def _error(message: str) -> None:
    click.echo(f"qonnx: error: {escape_text(message)}", err=True)


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="qonnx", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # type: ignore[attr-defined]
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        return EXIT_USAGE
    except VerificationError as e:
        _error(str(e))
        return EXIT_VERIFY
    except click.UsageError as e:
        _error(e.format_message())
        return EXIT_USAGE
    except (QonnxError, click.ClickException) as e:
        _error(e.format_message() if isinstance(e, click.ClickException) else str(e))
        return EXIT_USAGE
    except OSError as e:  # the system refused a file: a full disk, a name too long, permissions, a missing folder
        if os.environ.get("QONNX_DEBUG"):
            raise
        _error(f"{escape_name(e.filename)}: {e.strerror or e}" if e.filename else (e.strerror or str(e)))
        return EXIT_USAGE
    except click.Abort:
        click.echo("qonnx: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("qonnx: interrupted", err=True)
        return 130
    except Exception as e:
        return _internal_error(e)
    return 0


def _internal_error(e: Exception) -> int:
    """A bug in qonnx: still one line, the traceback on request."""
    if os.environ.get("QONNX_DEBUG"):
        raise e
    first = str(e).splitlines()[0][:300] if str(e) else ""
    click.echo(
        f"qonnx: internal error: {type(e).__name__}: {escape_text(first)} "
        "(set QONNX_DEBUG=1 for the traceback and please report it)",
        err=True,
    )
    return 1


class _Notes(logging.Handler):
    """Collects the first line of each log record it is handed (root logger, warnings and above)."""

    def __init__(self, notes: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.notes = notes

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a record whose arguments do not format is dropped
            lines = record.getMessage().strip().splitlines()
            self.notes.append(f"{record.name}: {lines[0][:300] if lines else ''}")


@contextlib.contextmanager
def _held_back() -> Iterator[list[str]]:
    """Within the block, Python warnings and root-logger records are collected, not printed (QONNX_DEBUG: printed)."""
    notes: list[str] = []
    if os.environ.get("QONNX_DEBUG"):
        yield notes
        return

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        text = str(message).strip().splitlines()
        notes.append(f"{category.__name__}: {text[0][:300] if text else ''}")

    root = logging.getLogger()
    handler = _Notes(notes)
    with warnings.catch_warnings():
        warnings.showwarning = show
        root.addHandler(handler)
        try:
            yield notes
        finally:
            root.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
