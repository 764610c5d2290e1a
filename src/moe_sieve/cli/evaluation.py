"""The ``eval`` command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DEFAULT_MODEL, DataOpt, ModelOpt, console


def eval_command(
    data: DataOpt,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[Path | None, typer.Option(help="moe-sieve adapter directory to evaluate on the model.")] = None,
    split: Annotated[str | None, typer.Option(help="Split (default: the task's evaluation split).")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Evaluate at most this many examples.")] = None,
    spider_dir: Annotated[str | None, typer.Option(help="Spider directory (tables.json, database/).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(help="Generation budget (default: 128; LLM-Adapters sets: 32 commonsense, 256 math)."),
    ] = None,
    keep_distinct: Annotated[
        bool, typer.Option(help="Spider: keep DISTINCT when comparing (the official default removes it).")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results JSON here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
) -> None:
    """Accuracy on GSM8K (exact match), HellaSwag (normalised), Spider (execution, read-only SQL), the facts mini
    task or an LLM-Adapters test set (commonsense-NAME:PATH, math-NAME:PATH; greedy answer, LLM-Adapters'
    parsing); every generation task also gets the gold completion's likelihood (gold_logprob, gold_prob)."""
    from .._io import atomic_write_json, ensure_writable
    from ..adapters import load_sieve_adapter
    from ..evaluation import EvalConfig, evaluate
    from ..evaluation.evaluate import check_eval_data
    from ..modeling import ModelSpec, load_model, load_tokenizer

    if out is not None:
        ensure_writable(out, overwrite, directory=False)
    config = EvalConfig(
        data=data,
        split=split,
        max_examples=max_examples,
        spider_dir=spider_dir,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        keep_distinct=keep_distinct,
    )
    check_eval_data(data)  # a wrong --data fails before the model loads
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
