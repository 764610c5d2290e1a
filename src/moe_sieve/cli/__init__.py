"""``moe-sieve``: a thin command line over the Python API (profile -> stats -> select).

One module per command group (``profiling``, ``runs``, ``adapters``, ``evaluation``, ``training``); each
command parses its options, calls the library and prints. This module builds the app from them, in the order
``moe-sieve --help`` lists them, and turns expected failures into one ``Error:`` line (``main``).
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Annotated

import typer

from . import adapters, evaluation, profiling, runs, training
from .common import DEBUG_ENV, err_console, print_error

app = typer.Typer(
    name="moe-sieve",
    help="Routing-guided LoRA for Mixture-of-Experts models: profile routing, read its statistics, "
    "select the hot experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = {
    "profile": profiling.profile,
    "stats": profiling.stats,
    "compare": profiling.compare,
    "select": profiling.select,
    "compare-runs": runs.compare_runs_command,
    "report": runs.report,
    "plan": adapters.plan,
    "attach": adapters.attach,
    "merge": adapters.merge,
    "demo": runs.demo,
    "export": adapters.export_command,
    "export-peft": adapters.export_peft,
    "eval": evaluation.eval_command(),
    "sweep": runs.sweep,
    "study": runs.study,
    "train": training.train_command(),
}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Show the full traceback of errors (or set {DEBUG_ENV}=1).")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures caused by inputs or the environment: one ``Error:`` line, never a traceback."""
    from safetensors import SafetensorError

    from .._io import ArtifactExistsError, RunLockedError
    from ..adapters.io import UnsupportedExportError
    from ..arch import UnsupportedModelError
    from ..profiling import ProfileMismatchError

    return (
        UnsupportedExportError,  # an adapter with no exact form in the asked export format
        ArtifactExistsError,
        RunLockedError,
        UnsupportedModelError,
        ProfileMismatchError,
        OSError,  # FileNotFoundError, PermissionError, NotADirectoryError, FileExistsError ...
        ValueError,  # includes UnicodeDecodeError, json.JSONDecodeError
        ArithmeticError,  # NonFiniteLossError (the NaN-loss stop)
        SafetensorError,  # truncated or corrupt .safetensors
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """moe-sieve's own warnings are one ``Warning:`` line, like its errors; others keep Python's format."""
    from ..adapters.export import TokenizerNotSavedWarning
    from ..profiling.artifact import OtherModelWarning

    if issubclass(category, (OtherModelWarning, TokenizerNotSavedWarning)):
        err_console.print("[bold yellow]Warning:[/] ", end="")
        err_console.print(" ".join(str(message).split()), markup=False, highlight=False)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main() -> None:
    """The console entry point: every expected failure ends as one ``Error:`` line and exit code 2;
    ``--debug`` (or MOE_SIEVE_DEBUG=1) shows the traceback instead."""
    warnings.showwarning = _show_warning
    try:
        app()
    except expected_errors() as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print_error(str(err) or type(err).__name__)
        sys.exit(2)
    except KeyboardInterrupt as err:
        _interrupted(err)
    except SystemExit as exit_:  # Typer turns Ctrl-C into exit 130 before it gets here: find it in the chain
        cause = _chained_interrupt(exit_)
        if cause is None:
            raise
        _interrupted(cause)


def _chained_interrupt(err: BaseException) -> KeyboardInterrupt | None:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _interrupted(err: KeyboardInterrupt) -> None:
    """Ctrl-C: one line saying how to continue (the command's own, else the general one), exit 130."""
    from .._io import Interrupted

    hint = str(err) if isinstance(err, Interrupted) and str(err) else None
    print_error(hint or "interrupted; a finished result is never half-written (train --resume continues a run)")
    sys.exit(130)
