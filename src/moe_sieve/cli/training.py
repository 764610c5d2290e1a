"""The ``train`` command: every TrainConfig field is an option, generated from the dataclass."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import DEFAULT_MODEL, console, fail


def _train(preset: str | None, overwrite: bool, resume: bool, **options) -> None:
    """Profile -> select -> LoRA fine-tune on transformers' Trainer; one GPU, CPU, or under
    `accelerate launch` / `torchrun` for DDP/FSDP."""
    from ..training import TrainConfig, train

    given = {key: value for key, value in options.items() if value is not None}
    if "targets" in given:
        given["targets"] = tuple(t for t in given["targets"].split(",") if t)
    if preset:
        config = TrainConfig.from_yaml(preset, **given)
    else:
        missing = [f"--{k}" for k in ("data", "out") if k not in given]
        if missing:
            fail(f"train needs {' and '.join(missing)} (or a --preset that sets them)")
        config = TrainConfig.from_dict({"model": DEFAULT_MODEL, **given})
    try:
        result = train(config, overwrite=overwrite, resume=resume)
    except KeyboardInterrupt:
        from .._io import Interrupted
        from ..training.rundir import continue_hint

        raise Interrupted(f"interrupted; {continue_hint(Path(config.out))}") from None
    m = result.metrics
    if result.already_finished:
        return  # train said so in one line; its metrics stay as they are
    console.print(
        f"[green]done[/]: {m['steps']} steps, final loss {m['final_loss']:.4f}, {m['trainable_params']:,} "
        f"trainable params, {m['tokens_per_s']:,.0f} tok/s, {m['wall_time_s']:.1f} s. "
        f"Adapter in {result.run_dir / 'adapter'}, metrics in {result.run_dir / 'metrics.json'}"
    )


def train_command():
    """The ``train`` command: every TrainConfig field as an option, with its help text, so the two never drift
    apart."""
    import dataclasses
    import inspect
    import typing

    from ..training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    params = [
        inspect.Parameter(
            "preset",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[str | None, typer.Option(help="YAML preset (path or name in moe_sieve/presets).")],
        ),
        inspect.Parameter(
            "overwrite",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option(help="Replace the results of an earlier run in --out.")],
        ),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")],
        ),
    ]
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        base = (
            str
            if typing.get_origin(hint) is tuple
            else next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        )
        if f.default is not dataclasses.MISSING:
            shown = f.default if not isinstance(f.default, tuple) else ",".join(f.default)
            shown = "none" if shown is None else str(shown)
        else:
            shown = DEFAULT_MODEL if f.name == "model" else False
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[base | None, typer.Option(help=f.metadata.get("help", ""), show_default=shown)],
            )
        )

    def command(**kwargs):
        preset, overwrite, resume = kwargs.pop("preset"), kwargs.pop("overwrite"), kwargs.pop("resume")
        _train(preset, overwrite, resume, **kwargs)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = _train.__doc__
    return command
