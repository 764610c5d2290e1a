"""The ``eval`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DEFAULT_MODEL, ModelOpt, console


def _run_eval(
    config,
    *,
    model: str,
    adapter: Path | None,
    device: str,
    out: Path | None,
    overwrite: bool,
    trust_remote_code: bool,
) -> None:
    """Accuracy on GSM8K (exact match), HellaSwag (normalised), Spider (execution, read-only SQL), the facts mini
    task or an LLM-Adapters test set (commonsense-NAME:PATH, math-NAME:PATH; greedy answer, LLM-Adapters'
    parsing); every generation task also gets the gold completion's likelihood (gold_logprob, gold_prob)."""
    from .._io import atomic_write_json, ensure_writable
    from ..adapters import load_sieve_adapter
    from ..evaluation import evaluate
    from ..evaluation.evaluate import check_eval_data
    from ..modeling import ModelSpec, load_model, load_tokenizer

    if out is not None:
        ensure_writable(out, overwrite, directory=False)
    check_eval_data(config.data)  # a wrong --data fails before the model loads
    spec = ModelSpec(model=model, device=device, trust_remote_code=trust_remote_code)
    net, tokenizer = load_model(spec), load_tokenizer(spec)
    if adapter is not None:
        load_sieve_adapter(net, adapter)
    result = evaluate(net, tokenizer, config)
    norm = "" if result.accuracy_norm is None else f", normalised {result.accuracy_norm:.4f}"
    console.print(f"{result.task}: accuracy [bold]{result.accuracy:.4f}[/]{norm} on {result.n} examples")
    likelihood = {name: value for name, value in result.metrics.items() if name not in ("accuracy", "accuracy_norm")}
    if likelihood:
        console.print("  " + ", ".join(f"{name} {value:.4f}" for name, value in likelihood.items()))
    if out is not None:
        atomic_write_json(
            out, {"model": model, "adapter": None if adapter is None else str(adapter), **result.to_json()}
        )


def eval_command():
    """The ``eval`` command: every EvalConfig field as an option with its help and default (so ``eval`` and the
    sweep's eval settings cannot drift apart), then the model, adapter and output options."""
    import dataclasses
    import inspect
    import typing

    from ..evaluation import EvalConfig

    keyword = inspect.Parameter.KEYWORD_ONLY
    hints = typing.get_type_hints(EvalConfig)
    config_params = []
    for f in dataclasses.fields(EvalConfig):
        if f.name == "data":  # required here (a sweep's task gives it instead)
            annotation = Annotated[str, typer.Option("--data", "-d", help=f.metadata["help"])]
            config_params.append(inspect.Parameter("data", keyword, annotation=annotation))
        else:
            annotation = Annotated[hints[f.name], typer.Option(help=f.metadata.get("help", ""))]
            config_params.append(inspect.Parameter(f.name, keyword, default=f.default, annotation=annotation))
    run_params = [
        inspect.Parameter("model", keyword, default=DEFAULT_MODEL, annotation=ModelOpt),
        inspect.Parameter(
            "adapter",
            keyword,
            default=None,
            annotation=Annotated[
                Path | None, typer.Option(help="moe-sieve adapter directory to evaluate on the model.")
            ],
        ),
        inspect.Parameter(
            "device", keyword, default="auto", annotation=Annotated[str, typer.Option(help="auto, cpu or cuda.")]
        ),
        inspect.Parameter(
            "out",
            keyword,
            default=None,
            annotation=Annotated[Path | None, typer.Option("--out", "-o", help="Write the results JSON here.")],
        ),
        inspect.Parameter(
            "overwrite",
            keyword,
            default=False,
            annotation=Annotated[bool, typer.Option(help="Replace an existing --out.")],
        ),
        inspect.Parameter(
            "trust_remote_code",
            keyword,
            default=False,
            annotation=Annotated[bool, typer.Option(help="Run the repository's own model code.")],
        ),
    ]
    config_names = [p.name for p in config_params]

    def command(**kwargs):
        config = EvalConfig(**{name: kwargs.pop(name) for name in config_names})
        _run_eval(config, **kwargs)

    command.__signature__ = inspect.Signature(config_params + run_params)
    command.__doc__ = _run_eval.__doc__
    return command
