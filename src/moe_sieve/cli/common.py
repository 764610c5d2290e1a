"""What every command module shares: the consoles, the one-line ``Error:`` exit and the common options."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

DEFAULT_MODEL = "moe-sieve-default"
DEBUG_ENV = "MOE_SIEVE_DEBUG"

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Hub id or local directory of a MoE causal LM; default: the embedded pretrained "
        "'moe-sieve-default' ('tiny-random-olmoe' is a random-weight one).",
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="A task (gsm8k, hellaswag, spider), TASK:PATH for that task's rows in local files, or a local "
        ".jsonl with `text` or `prompt`+`completion` fields.",
    ),
]
KOpt = Annotated[
    str, typer.Option("--k", help="Experts per layer: a count (16) or a share of the routed experts (25%).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def print_error(message: str) -> None:
    """One line, ``Error: ...``; the message is printed verbatim (no rich markup, so ``[0, 1]`` survives)."""
    err_console.print("[bold red]Error:[/] ", end="")
    err_console.print(" ".join(str(message).split()), markup=False, highlight=False)


def fail(message: str) -> None:
    print_error(message)
    raise typer.Exit(code=2)
