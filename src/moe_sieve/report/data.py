"""Everything the report shows, gathered from a study directory; a part whose files are absent stays None.

Layout read: ``results.csv`` (one row per run), ``runs/<run_id>/`` (config.json, selection.json, profile/) and
``profiles/`` (a profiling study). A profile-set directory on its own is a study with profiles only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import read_csv_rows, read_json_object
from ..adapters.methods import find_adapter_method
from ..profiling import Profile
from ..profiling.artifact import METADATA_FILE
from ..profiling.profile_set import SET_FILE, load_profile_set, set_stats

CONDITION_PATTERNS = (
    ("hot+filler", re.compile(r"filler", re.I)),
    ("full", re.compile(r"^(full|all)", re.I)),
    ("random", re.compile(r"^rand", re.I)),
    ("greedy", re.compile(r"^greedy", re.I)),
    ("coverage", re.compile(r"^cov", re.I)),
    ("none", re.compile(r"^(attention|attn|none)", re.I)),
    ("topk", re.compile(r"^(hot|top)", re.I)),
)


@dataclass
class RunInfo:
    """One row of results.csv plus what its run directory says about the selection and the training."""

    row: dict[str, str]
    strategy: str | None
    k: int | None
    selection: dict[str, Any] | None
    run_dir: Path | None
    metrics: dict[str, Any] | None = None  # the run's metrics.json

    @property
    def converged(self) -> bool | None:
        """results.csv's ``converged`` column, else metrics.json's ``convergence``; None when neither says."""
        text = str(self.row.get("converged") or "").strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        record = (self.metrics or {}).get("convergence")
        value = record.get("converged") if isinstance(record, dict) else None
        return value if isinstance(value, bool) else None

    @property
    def wall_time_partial(self) -> bool:
        """A resumed run whose metrics.json times only the last segment (no ``segments`` record): its wall time
        and tokens/s cover the steps after the resume, not the run."""
        m = self.metrics or {}
        return bool(m.get("resumed_from")) and not m.get("segments")

    def loss_curve(self) -> tuple[list[int], list[float]] | None:
        """Every logged training loss: metrics.json's ``loss_curve``, else the newest checkpoint's
        ``trainer_state.json`` log history (which ends at that checkpoint); None when neither exists."""
        curve = (self.metrics or {}).get("loss_curve")
        if isinstance(curve, dict) and curve.get("step") and len(curve["step"]) == len(curve.get("loss") or []):
            pairs = [(int(s), as_float(v)) for s, v in zip(curve["step"], curve["loss"], strict=True)]
            return _unzip(pairs)
        if self.run_dir is None:
            return None
        states = sorted(
            (int(m.group(1)), c / "trainer_state.json")
            for c in (self.run_dir / "checkpoints").glob("checkpoint-*")
            if (m := re.fullmatch(r"checkpoint-(\d+)", c.name)) and (c / "trainer_state.json").is_file()
        )
        state = read_json_object(states[-1][1]) if states else None
        history = (state or {}).get("log_history") or []
        pairs = [(int(h["step"]), as_float(h["loss"])) for h in history if "loss" in h and "step" in h]
        return _unzip(pairs)


@dataclass
class StudyData:
    root: Path
    profiles: dict[str, Profile] | None = None
    profile_stats: dict[str, Any] | None = None
    results_path: Path | None = None
    runs: list[RunInfo] = field(default_factory=list)
    skipped_rows: int = 0

    @property
    def finished(self) -> list[RunInfo]:
        return [r for r in self.runs if as_float(r.row.get("accuracy")) is not None]

    def with_metric(self, metric: str) -> list[RunInfo]:
        """The runs that have a value of ``metric`` (the ones compare-runs reads)."""
        return [r for r in self.runs if as_float(r.row.get(metric)) is not None]

    @property
    def num_experts(self) -> int | None:
        """Routed experts per MoE layer, from a run's selection.json, a profile, or a full run's k column."""
        for run in self.runs:
            if run.selection and isinstance(run.selection.get("num_experts"), int):
                return run.selection["num_experts"]
        if self.profiles:
            return int(next(iter(self.profiles.values())).num_experts)
        ks = [r.k for r in self.runs if r.strategy == "full" and r.k]
        return max(ks) if ks else None


def as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # nan -> None


def _unzip(pairs: list[tuple[int, float | None]]) -> tuple[list[int], list[float]] | None:
    pairs = [(s, v) for s, v in pairs if v is not None]
    return ([s for s, _ in pairs], [v for _, v in pairs]) if pairs else None


def strategy_of(condition: str) -> str | None:
    """A condition's selection strategy guessed from its name, when its run directory does not say."""
    for strategy, pattern in CONDITION_PATTERNS:
        if pattern.search(condition):
            return strategy
    return None


def _run_info(root: Path, row: dict[str, str]) -> RunInfo:
    run_dir = None
    for candidate in (row.get("run_dir"), str(root / "runs" / row.get("run_id", ""))):
        if candidate:
            path = Path(candidate)
            path = path if path.is_absolute() else root / path
            if path.is_dir():
                run_dir = path
                break
    config = read_json_object(run_dir / "config.json") if run_dir else None
    selection = read_json_object(run_dir / "selection.json") if run_dir else None
    train = (config or {}).get("train") if isinstance((config or {}).get("train"), dict) else config
    strategy = (train or {}).get("strategy") or strategy_of(row.get("condition", ""))
    method = (train or {}).get("method") or row.get("method")
    adapter_method = find_adapter_method(method)
    if adapter_method is not None:  # e.g. Routed-PEFT: not a sieve selection at its k (budget, controls)
        strategy = adapter_method.report_strategy(strategy, lambda key: (train or {}).get(key) or row.get(key))
    k = None
    if selection is not None:
        k = (selection.get("params") or {}).get("k_resolved")
    if k is None:
        text = str(row.get("k") or "").strip()
        k = int(float(text)) if re.fullmatch(r"\d+(\.0+)?", text) else None
    metrics = read_json_object(run_dir / "metrics.json") if run_dir else None
    return RunInfo(row=row, strategy=strategy, k=k, selection=selection, run_dir=run_dir, metrics=metrics)


def _profiles_dir(root: Path) -> Path | None:
    if (root / SET_FILE).is_file():
        return root
    path = root / "profiles"
    if path.is_dir() and (
        (path / SET_FILE).is_file() or any((c / METADATA_FILE).is_file() for c in path.iterdir() if c.is_dir())
    ):
        return path
    return None


def load_study(
    root: str | Path,
    k: str = "25%",
    stability_fraction: float = 0.1,
    stability_trials: int = 50,
    seed: int = 0,
) -> StudyData:
    """Read what exists under ``root``; raise only when there is nothing to report at all."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (a study directory or a profile set)")
    data = StudyData(root=root)
    profiles_dir = _profiles_dir(root)
    if profiles_dir is not None:
        data.profiles = load_profile_set(profiles_dir)
        data.profile_stats = set_stats(data.profiles, k, stability_fraction, stability_trials, seed)
    results = root / "results.csv"
    if results.is_file():
        data.results_path = results
        rows = [row for _, row in read_csv_rows(results)[1]]
        if not rows and data.profiles is None:
            raise ValueError(f"{results}: no runs in it (only a header), and no profiles: nothing to report")
        data.runs = [_run_info(root, row) for row in rows]
        data.skipped_rows = sum(1 for r in data.runs if as_float(r.row.get("accuracy")) is None)
    if data.profiles is None and data.results_path is None:
        raise FileNotFoundError(
            f"{root}: nothing to report (expected results.csv and/or profiles/ or a profile set's {SET_FILE})"
        )
    return data
