"""Collect every run of a sweep into ``results.csv`` + ``results.json`` (one row per run, written atomically)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .._io import atomic_write_json, atomic_write_text, read_json_object
from ..adapters.methods import find_adapter_method
from .config import RunSpec
from .pipeline import ERROR_FILE, EVAL_FILE, is_finished

COLUMNS = (
    "run_id",
    "model",
    "task",
    "condition",
    "k",
    "seed",
    "status",
    "error",
    "accuracy",
    "accuracy_norm",
    "trainable_params",
    "adapter_bytes",
    "wall_time_s",
    "tokens_per_s",
    "peak_memory_bytes",
    "final_loss",
    "run_dir",
)
# Likelihood metrics of the evaluation (eval.json "metrics"; the result_* ones only for tasks with a worked chain)
# and whether training converged (metrics.json "convergence"; blank when the run did not record it), after the
# fixed columns; compare-runs --metric and report --metric take any of them.
METRIC_COLUMNS = (
    "gold_logprob",
    "gold_prob",
    "gold_nll_per_token",
    "result_logprob",
    "result_prob",
    "result_nll_per_token",
)
CONVERGED = "converged"
# Task-specific secondary columns after the fixed ones: the metric's name and how many examples it scored; then
# the adapter family (sieve LoRA or Routed-PEFT) and, for routed runs, what defines the variant (blank otherwise).
SECONDARY = (
    "metric",
    "eval_n",
    "eval_correct",
    "run_wall_time_s",
    "method",
    "variant",
    "adapter_type",
    "num_adapters",
    "top_k_adapters",
)
FIELDNAMES = (*COLUMNS, *METRIC_COLUMNS, CONVERGED, *SECONDARY)
# Metrics of each further evaluation (eval ``also``), written as NAME_METRIC after the fixed columns.
ALSO_METRICS = ("accuracy", *METRIC_COLUMNS)
ROUTED_OPTIONS = ("variant", "adapter_type", "num_adapters", "top_k_adapters")


def _adapter_bytes(path: Path) -> int | None:
    """The adapter checkpoint's weights (paper Table 4); its small JSON config names paths, so it is left out."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else None


def _method_columns(spec: RunSpec) -> dict[str, Any]:
    """The adapter method and the options that define its variant (routed: ROUTED_OPTIONS); blank for sieve."""
    name = spec.train.get("method", "sieve")
    method = find_adapter_method(name)
    return {"method": name, **(method.sweep_columns(spec.train) if method is not None else {})}


def _k_option(spec: RunSpec) -> Any:
    """Before a run finishes, k is what the condition asked for: adapted routed experts per layer (routed S, D
    and R adapt no expert, E the experts its strategy picks)."""
    strategy = spec.train.get("strategy")
    if strategy == "none" or "experts" not in spec.train.get("targets", []):
        return 0
    method = find_adapter_method(spec.train.get("method"))
    if method is not None and not method.adapts_experts(spec.train):
        return 0
    return "all" if strategy == "full" else spec.train.get("k")


def _also_names(spec: RunSpec) -> list[str]:
    """The further evaluations of a run (``eval.also``): each adds NAME_METRIC columns."""
    return list(spec.eval.get("also") or {})


def _also_columns(runs: list[RunSpec]) -> list[str]:
    names = dict.fromkeys(name for spec in runs for name in _also_names(spec))
    return [f"{name}_{metric}" for name in names for metric in ALSO_METRICS]


def run_row(spec: RunSpec, study: Path) -> dict[str, Any]:
    run_dir = study / "runs" / spec.run_id
    row: dict[str, Any] = dict.fromkeys(FIELDNAMES)
    row.update(
        run_id=spec.run_id,
        model=spec.model,
        task=spec.task,
        condition=spec.condition,
        seed=spec.seed,
        k=_k_option(spec),
        run_dir=str(Path("runs") / spec.run_id),
        **_method_columns(spec),
    )
    if is_finished(run_dir, spec):
        ev, metrics = read_json_object(run_dir / EVAL_FILE) or {}, read_json_object(run_dir / "metrics.json") or {}
        k = ev.get("experts_per_layer")
        row.update(
            status="finished",
            error="",
            k=(int(k) if isinstance(k, float) and k.is_integer() else k) if k is not None else row["k"],
            accuracy=ev.get("accuracy"),
            accuracy_norm=ev.get("accuracy_norm"),
            trainable_params=metrics.get("trainable_params"),
            adapter_bytes=_adapter_bytes(run_dir / "adapter"),
            wall_time_s=metrics.get("wall_time_s"),
            tokens_per_s=metrics.get("tokens_per_s"),
            peak_memory_bytes=metrics.get("peak_memory_bytes"),
            final_loss=metrics.get("final_loss"),
            metric=(ev.get("metadata") or {}).get("metric"),
            eval_n=ev.get("n"),
            eval_correct=ev.get("correct"),
            run_wall_time_s=ev.get("run_wall_time_s"),
        )
        scores = ev.get("metrics") if isinstance(ev.get("metrics"), dict) else {}
        row.update({name: scores.get(name) for name in METRIC_COLUMNS})
        also = ev.get("also") if isinstance(ev.get("also"), dict) else {}
        for name in _also_names(spec):
            extra = (also.get(name) or {}).get("metrics") or {}
            row.update({f"{name}_{metric}": extra.get(metric) for metric in ALSO_METRICS})
        convergence = metrics.get("convergence") if isinstance(metrics.get("convergence"), dict) else {}
        converged = convergence.get("converged")
        row[CONVERGED] = str(converged) if isinstance(converged, bool) else None
    elif (error := read_json_object(run_dir / ERROR_FILE)) is not None:
        status = "interrupted" if error.get("interrupted") else "failed"
        row.update(status=status, error=str(error.get("error", "unknown error")))
    else:
        row.update(status="pending", error="")
    return row


def gather(runs: list[RunSpec], study: str | Path) -> list[dict[str, Any]]:
    """Write ``results.csv`` and ``results.json`` under ``study`` from the run directories; return the rows."""
    study = Path(study)
    rows = [run_row(spec, study) for spec in runs]
    buffer = io.StringIO()
    fieldnames = [*FIELDNAMES, *_also_columns(runs)]
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fieldnames})
    atomic_write_text(study / "results.csv", buffer.getvalue())
    atomic_write_json(study / "results.json", rows)
    return rows


def read_results(study: str | Path) -> list[dict[str, Any]]:
    return json.loads((Path(study) / "results.json").read_text(encoding="utf-8"))
