"""The ``qonnx`` command group, and :func:`main`, which turns every error into one line on stderr.

Each command lives in its own module, imported only when the command runs (click's "lazily loading
subcommands" pattern), so that ``qonnx --help`` and ``qonnx quantize`` load nothing they do not use.
Every problem with the user's input prints one line on stderr and exits with code 2; no traceback.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from typing import Any

import click

from qonnx.core import __version__
from qonnx.core.errors import QonnxError
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
    """Run the CLI; user errors print one line on stderr and return 2."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if on_main_thread else None
    try:
        return _run(argv)
    except Terminated:
        click.echo("qonnx: terminated", err=True)
        return EXIT_TERMINATED
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name="qonnx", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # type: ignore[attr-defined]
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        return EXIT_USAGE
    except VerificationError as e:
        click.echo(f"qonnx: error: {e}", err=True)
        return EXIT_VERIFY
    except click.UsageError as e:
        click.echo(f"qonnx: error: {e.format_message()}", err=True)
        return EXIT_USAGE
    except (QonnxError, click.ClickException) as e:
        msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
        click.echo(f"qonnx: error: {msg}", err=True)
        return EXIT_USAGE
    except click.Abort:
        click.echo("qonnx: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("qonnx: interrupted", err=True)
        return 130
    except Exception as e:  # a bug in qonnx: still one line, the traceback on request
        if os.environ.get("QONNX_DEBUG"):
            raise
        click.echo(
            f"qonnx: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(set QONNX_DEBUG=1 for the traceback and please report it)",
            err=True,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
