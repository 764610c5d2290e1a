"""One run: train -> held-out evaluation, the pipeline shared by ``demo``, ``sweep`` and ``study``.

A run directory is *finished* only when ``adapter/``, ``metrics.json`` and a complete ``eval.json`` (written
last, atomically, carrying the run's settings fingerprint) are all there; anything less is redone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .._io import atomic_write_json, read_json_object
from .config import EvalSettings, RunSpec

RUN_FILE = "run.json"  # the resolved RunSpec, written before the run starts
EVAL_FILE = "eval.json"  # written last: its presence (complete, same fingerprint) marks a finished run
ERROR_FILE = "error.json"  # the last failure of this run
INTERRUPTED = 130  # a worker's exit status after Ctrl-C (128 + SIGINT), as a shell reports it


def record_interrupted(run_dir: Path, run_id: str | None = None) -> None:
    """Mark the run interrupted (not failed): the next sweep resumes it from its newest checkpoint."""
    error = "interrupted (Ctrl-C); running the sweep again continues it (from its last checkpoint, if any)"
    atomic_write_json(Path(run_dir) / ERROR_FILE, {"run_id": run_id, "error": error, "interrupted": True})


def is_finished(run_dir: str | Path, spec: RunSpec | None = None) -> bool:
    """Adapter, metrics and a complete evaluation, produced with ``spec``'s settings (when given)."""
    run_dir = Path(run_dir)
    ev, metrics = read_json_object(run_dir / EVAL_FILE), read_json_object(run_dir / "metrics.json")
    adapter = run_dir / "adapter"
    if ev is None or metrics is None or not adapter.is_dir() or not any(adapter.iterdir()):
        return False
    if not isinstance(ev.get("accuracy"), int | float) or not ev.get("n"):
        return False
    return spec is None or ev.get("fingerprint") == spec.fingerprint or _same_settings(run_dir, spec)


def _same_settings(run_dir: Path, spec: RunSpec) -> bool:
    """Settings equal up to options added to ``train`` or ``eval`` since the run was made (absent there,
    default here), so a new TrainConfig or EvalSettings field does not turn every finished run into a stale one."""
    from ..training import TrainConfig

    stored = read_json_object(run_dir / RUN_FILE)
    if stored is None:
        return False
    old_eval = stored.get("eval")
    if isinstance(old_eval, dict) and old_eval.get("max_new_tokens") != spec.eval.get("max_new_tokens"):
        # a run recorded with the sweep's former fixed 128 is the same run where that is the task's own budget
        budgets = _generation_budgets(old_eval)
        if budgets is not None and budgets == _generation_budgets(spec.eval):
            old_eval = {**old_eval, "max_new_tokens": spec.eval.get("max_new_tokens")}
    return _same_up_to_new_defaults(stored.get("train"), spec.train, TrainConfig) and _same_up_to_new_defaults(
        old_eval, spec.eval, EvalSettings
    )


def _generation_budgets(settings: dict[str, Any]) -> dict[str, int | None] | None:
    """The generation budget of each evaluation of a run (its data and each ``also``; None for a task that does
    not generate), as ``evaluate`` resolves it; None where the settings cannot be read."""
    from ..evaluation.evaluate import check_eval_data
    from ..evaluation.registry import get_eval_task

    datasets = {"": settings.get("data"), **(settings.get("also") or {})}
    try:
        return {
            name: get_eval_task(check_eval_data(data)).budget(settings.get("max_new_tokens"))
            for name, data in datasets.items()
        }
    except (AttributeError, TypeError, ValueError):
        return None


def _same_up_to_new_defaults(old: Any, new: dict[str, Any], cls: type) -> bool:
    import dataclasses

    if not isinstance(old, dict):
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    if "targets" in defaults:
        defaults["targets"] = list(defaults["targets"])
    return all(
        old.get(key, defaults.get(key, object())) == value for key, value in new.items() if key != "out"
    ) and set(old) <= set(new)


def train_and_evaluate(
    train_config: Any,
    eval_settings: dict[str, Any],
    *,
    overwrite: bool = False,
    resume: bool = False,
    model: Any = None,
    tokenizer: Any = None,
    progress: bool = False,
) -> tuple[Any, Any]:
    """``train`` then ``evaluate`` on the trained model (already in memory, adapters attached); ``eval_settings``
    holds :class:`EvalSettings` fields (absent ones take their defaults)."""
    import dataclasses

    from ..evaluation import evaluate
    from ..modeling import ModelSpec, load_model, load_tokenizer
    from ..training import train

    if model is None:
        spec = ModelSpec(
            model=train_config.model,
            dtype=train_config.dtype,
            device=train_config.device,
            trust_remote_code=train_config.trust_remote_code,
            experts_implementation=train_config.experts_implementation,
        )
        model, tokenizer = load_model(spec), load_tokenizer(spec)
    result = train(train_config, overwrite=overwrite, resume=resume, model=model, tokenizer=tokenizer)
    from ..arch import find_moe_layers

    result.metrics.setdefault("moe_layers", len(find_moe_layers(model)))
    model.eval()

    settings = EvalSettings.from_json(eval_settings)

    def score(data: str, split: str | None) -> Any:
        return evaluate(model, tokenizer, dataclasses.replace(settings, data=data, split=split), progress=progress)

    evaluation = score(eval_settings["data"], eval_settings.get("split"))
    evaluation.metadata["also"] = {
        name: score(data, None).to_json() for name, data in (eval_settings.get("also") or {}).items()
    }
    return result, evaluation


def _resumable(run_dir: Path) -> bool:
    """A checkpoint that holds the adapter factors and the trainer state (written last by Trainer)."""
    from ..adapters.io import ADAPTER_WEIGHTS

    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return False
    return any(
        (ckpt / "trainer_state.json").is_file() and (ckpt / ADAPTER_WEIGHTS).is_file()
        for ckpt in folder.glob("checkpoint-*")
    )


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate one run in its directory; returns the evaluation record written to eval.json.

    A run killed earlier continues from its newest complete checkpoint (``--resume``); without one it starts
    again (``--overwrite``: it has no finished result to lose). A finished run is returned untouched.
    """
    from ..training import TrainConfig

    config = TrainConfig.from_dict({**spec.train, "targets": tuple(spec.train["targets"])}, source=spec.run_id)
    run_dir = Path(config.out)
    if is_finished(run_dir, spec):
        return read_json_object(run_dir / EVAL_FILE) or {}
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RUN_FILE, spec.to_json())
    (run_dir / EVAL_FILE).unlink(missing_ok=True)  # stale (other settings or incomplete)
    started = time.perf_counter()
    resume = _resumable(run_dir) and not (run_dir / "metrics.json").exists()
    try:
        result, evaluation = train_and_evaluate(config, spec.eval, overwrite=not resume, resume=resume)
    except Exception:
        if not resume:
            raise
        # the checkpoint did not load (e.g. cut short by a kill): nothing finished to lose, start again
        result, evaluation = train_and_evaluate(config, spec.eval, overwrite=True)
    record = {
        "run_id": spec.run_id,
        "fingerprint": spec.fingerprint,
        "task": evaluation.task,
        "n": evaluation.n,
        "accuracy": evaluation.accuracy,
        "accuracy_norm": evaluation.accuracy_norm,
        "correct": evaluation.correct,
        "metrics": evaluation.metrics,
        "also": evaluation.metadata.pop("also", {}),
        "metadata": evaluation.metadata,
        "experts_per_layer": _experts_per_layer(run_dir, result),
        "run_wall_time_s": round(time.perf_counter() - started, 3),
        "predictions": evaluation.predictions,
    }
    atomic_write_json(run_dir / EVAL_FILE, record)
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
    return record


def _experts_per_layer(run_dir: Path, result: Any) -> float | None:
    """Mean adapted routed experts per MoE layer: the budget k of the run (0 when experts are not targeted)."""
    adapted, layers = result.metrics.get("adapted_experts", 0), result.metrics.get("moe_layers")
    if not adapted:
        return 0.0
    return round(adapted / layers, 4) if layers else None


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_sieve.sweep.pipeline RUN_DIR``: the worker process of one run."""
    import sys
    import traceback

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m moe_sieve.sweep.pipeline RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    data = read_json_object(run_dir / RUN_FILE)
    if data is None:
        print(f"Error: {run_dir / RUN_FILE}: missing or unreadable run spec", file=sys.stderr)
        return 2
    spec = RunSpec.from_json(data)
    try:
        run_one(spec)
    except KeyboardInterrupt:
        import signal

        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the record short
        try:
            record_interrupted(run_dir, spec.run_id)
        finally:
            signal.signal(signal.SIGINT, previous)
        print(f"Error: {spec.run_id}: interrupted; the next sweep resumes it", file=sys.stderr)
        return INTERRUPTED
    except BaseException as err:  # recorded for the results table, then re-raised for the exit status
        atomic_write_json(
            run_dir / ERROR_FILE,
            {"run_id": spec.run_id, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()},
        )
        print(f"Error: {spec.run_id}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
