"""The options that several commands take, each declared here once, and what their output shares.

A command stacks these decorators, so an option means the same and has the same default wherever it
appears (``--device auto``, ``--progress`` on when stderr is a terminal). Options with a default show it
in ``--help`` (the ``qonnx`` group sets ``show_default``); where the default depends on the scheme, the
option's default is None and its help says what it is.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from qonnx.core.config import KV_CACHES
from qonnx.core.errors import escape_name, escape_text
from qonnx.core.formats import FORMATS
from qonnx.core.hadamard import ROTATIONS
from qonnx.core.schemes import SCHEMES
from qonnx.core.sizes import human_bytes  # kept importable from here: inspection.py uses opt.human_bytes

__all__ = [
    "ALGOS",
    "SchemeCommand",
    "algo",
    "block_size",
    "rotate",
    "calibration",
    "device",
    "echo",
    "escape_name",
    "exclude",
    "external_data",
    "human_bytes",
    "json_flag",
    "kv_cache",
    "model_argument",
    "output_model",
    "progress",
    "scheme",
    "storage",
    "together",
    "verify",
    "windows",
]

F = TypeVar("F", bound=Callable[..., Any])

#: What each ``--algo`` does, for its help.
ALGOS = {
    "rtn": "round to nearest",
    "gptq": "GPTQ (act-order with static blocks, clip search) with Hessians from calibration runs of the float "
    "model in ONNX Runtime (all layers at once, not layer by layer)",
    "awq": "activation-aware scales folded into the norms / up projections, and clipping, both chosen by output "
    "error on the same Hessians",
    "awq+gptq": "AWQ's scales and clipping, then GPTQ",
    "hqq": "half-quadratic zero points, no data (float zero points in MatMulNBits)",
}


def together(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several option decorators as one; they appear in ``--help`` in the order given."""

    def apply(f: F) -> F:
        for decorate in reversed(decorators):
            f = decorate(f)
        return f

    return apply


def _on_a_terminal(ctx: click.Context, param: click.Parameter, value: bool | None) -> bool:
    return sys.stderr.isatty() if value is None else value


model_argument = click.argument("model", type=click.Path(path_type=str))
output_model = click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=str),
    help="Output .onnx file, or folder (a folder input is mirrored there).",
)
progress = click.option(
    "--progress/--no-progress",
    default=None,
    callback=_on_a_terminal,
    help="Progress bar on stderr (default: on when stderr is a terminal).",
)
verify = click.option(
    "--verify/--no-verify",
    default=None,
    help="Run the input and the output model on the same inputs and compare their outputs before writing "
    "(default: on for models up to 2 GiB).",
)
external_data = click.option(
    "--external-data/--no-external-data",
    default=None,
    help="Force weights into a separate .data file, or into the .onnx file (default: above 256 MiB).",
)
kv_cache = click.option(
    "--kv-cache",
    type=click.Choice(KV_CACHES),
    default=None,
    help="Keep the KV cache of a model lowered with GroupQueryAttention (qonnx lower) in int8 or int4, with "
    "per-channel scales from calibration windows of the float model (weight-only schemes; default: floating point).",
)
block_size = click.option(
    "--block-size",
    type=click.IntRange(min=0),
    default=None,
    help="Weights per scale along K; 0 for one scale per output channel (--format qdq, w8a8, w4a8, fp8) "
    "(default: 128; w8a8 and fp8: per output channel; dynamic: 32).",
)
rotate = click.option(
    "--rotate",
    type=click.Choice(ROTATIONS),
    default=None,
    help="Rotate the residual stream first (QuaRot-style, exact in float; decoders with RMSNorm): a randomized "
    "Hadamard matrix, a random orthogonal one, or none; an online Hadamard goes in front of each down projection "
    "(default: none).",
)
storage = together(
    click.option(
        "--symmetric",
        is_flag=True,
        help="Signed codes without zero points: the weights of a weight-only scheme, the activations of w8a8 "
        "and w4a8 (default: asymmetric; fp8 is symmetric).",
    ),
    click.option(
        "--format",
        "fmt",
        type=click.Choice(list(FORMATS)),
        default=None,
        help="How weight-only schemes store weights: ONNX Runtime's MatMulNBits, opset-21 DequantizeLinear + "
        "MatMul, or MatMulBnb4 (nf4, fp4) (default: the scheme's own: matmulnbits; bnb4 for nf4 and fp4).",
    ),
)


def scheme(names: Iterable[str], what: str = "Quantization scheme") -> Callable[[F], F]:
    """``--scheme``, one of ``names`` (default w4a16); the command's help lists them (:class:`SchemeCommand`)."""
    choice = click.Choice(list(names), case_sensitive=False)
    return click.option("--scheme", type=choice, default="w4a16", help=f"{what} (see Schemes below).")


def algo(names: Iterable[str], default: str | None = None) -> Callable[[F], F]:
    """``--algo``, one of ``names``; a None default is the scheme's own (rtn; gptq for fp8)."""
    names = list(names)
    text = "; ".join(f"{name}: {ALGOS[name]}" for name in names)
    text += "." if default is not None else " (default: rtn; fp8: gptq)."
    return click.option("--algo", type=click.Choice(names), default=default, help=f"How codes are chosen. {text}")


def calibration(samples: int | None = None, seq_len: int | None = None, what: str = "") -> Callable[[F], F]:
    """``--calib-samples``, ``--calib-seq-len`` and ``--calib-data``; None defaults are the scheme's own."""
    own = samples is None  # quantize: unset unless given, so that a scheme without calibration can refuse them
    data = (
        "'pydoc' (the pydoc corpus from token 60,000, never the evaluation windows; read through the tokenizer "
        "beside the model), a .txt or .jsonl file, or a .npz of feeds (arrays named after the model inputs, first "
        "axis = batch index) for a model without tokenizer"
    )
    return together(
        click.option(
            "--calib-samples",
            type=click.IntRange(min=1),
            default=samples,
            help=f"Calibration windows{what}"
            + (" (default: 16 for --algo gptq/awq, 8 for the activation ranges of w8a8/w4a8/fp8)." if own else "."),
        ),
        click.option(
            "--calib-seq-len",
            type=click.IntRange(min=2),
            default=seq_len,
            help="Tokens per calibration window" + (" (default: 512)." if own else "."),
        ),
        click.option(
            "--calib-data",
            default=None if own else "pydoc",
            metavar="PATH",
            help=f"Calibration data: {data}" + (" (default: pydoc)." if own else "."),
        ),
    )


def device(what: str = "") -> Callable[[F], F]:
    """``--device``, auto in every command."""
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        help=f"Where ONNX Runtime runs{what}: auto is CUDA when a GPU is usable, else the CPU; cuda falls back to "
        "the CPU with a note.",
    )


def exclude(what: str) -> Callable[[F], F]:
    """``--exclude REGEX``, repeatable; ``what`` happens to the layers it matches."""
    return click.option(
        "--exclude",
        multiple=True,
        metavar="REGEX",
        help="Layers whose node name, weight name or module path (model.layers.3.mlp.down_proj) matches REGEX are "
        f"{what} (repeatable; default: none).",
        callback=_check_regexes,
    )


def _check_regexes(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse a pattern that is not a regular expression while the options are read, as the user typed it."""
    for value in values:
        try:
            re.compile(value)
        except re.error as e:
            raise click.BadParameter(f"{value!r} is not a regular expression ({e})") from None
    return values


def windows(default: int) -> Callable[[F], F]:
    """``--windows``: how many perplexity windows (the standard protocol uses 24; the demo, 8 to be quick)."""
    return click.option(
        "--windows",
        type=click.IntRange(min=1),
        default=default,
        help="Perplexity windows: non-overlapping, from the first token (the standard protocol uses 24).",
    )


def json_flag(what: str) -> Callable[[F], F]:
    """``--json``: print ``what`` as JSON on stdout (the parameter is ``as_json``)."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON on stdout.")


class SchemeCommand(click.Command):
    """A command whose help ends with the schemes its ``--scheme`` offers, each with its config's summary."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The Schemes section (the first line of each scheme config's docstring), then the epilog."""
        names = [str(n) for p in self.params if p.name == "scheme" for n in getattr(p.type, "choices", ())]
        with formatter.section("Schemes"):
            formatter.write_dl([(n, (SCHEMES[n].__doc__ or "").split("\n")[0]) for n in names])
        super().format_epilog(ctx, formatter)


def echo(line: str, err: bool = False) -> None:
    """Print one line of a command's text output, control characters escaped (it may quote model names)."""
    click.echo(escape_text(line), err=err)
