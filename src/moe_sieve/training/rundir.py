"""The run-directory contract of ``train``: which files make a run, what its settings are recorded as (the selection
fingerprint), when a directory is finished, resumable or refused, and how ``--overwrite`` stages a replacement."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import (
    ArtifactExistsError,
    clean_stale_temps,
    clean_stale_temps_in,
    ensure_writable,
    fingerprint,
    make_staging_dir,
)
from .._version import __version__
from ..selection import strategy_settings
from .config import TrainConfig

RESULT_FILES = ("metrics.json", "adapter")
STAGE_OUTPUTS = ("metrics.json", "adapter", "selection.json", "profile", "checkpoints", "data_report.json")

# Settings a run may change when it resumes (they extend or reshape the schedule, not what was computed).
RESUMABLE_SETTINGS = (
    "max_steps",
    "epochs",
    "save_steps",
    "logging_steps",
    "report_to",
    "save_total_limit",
    "packing",  # packing and the fused loss change how the loss is computed, not its value
    "fused_ce",
)
# Settings that decide the selection (and so the adapter's shape), recorded as one fingerprint: the data and
# profiling inputs below, then the options the registered strategies read (selection.strategy_settings()).
SELECTION_INPUTS = (
    "model",
    "data",
    "split",
    "max_examples",
    "spider_dir",
    "strategy",
    "k",
    "rank_by",
    "selection",
    "profile",
    "profile_subsample",
    "seed",
    "max_length",
)
# Frozen: the strategy options fingerprinted always, as before the list was derived. Any other (hot, or a newly
# registered strategy's) is fingerprinted only when set, so runs that do not use it keep their recorded fingerprint.
_FINGERPRINTED_ALWAYS = ("coverage", "min_per_layer")


def selection_settings() -> tuple[str, ...]:
    """The TrainConfig fields that decide the selection (``SELECTION_INPUTS`` and every strategy's options)."""
    return tuple(dict.fromkeys((*SELECTION_INPUTS, *strategy_settings())))


RUN_ARTIFACTS = ("config.json", *STAGE_OUTPUTS)


def _file_digest(path: str | None) -> str | None:
    """Content hash of a --selection file or --profile directory, so an edited input counts as a change."""
    import hashlib

    if not path:
        return None
    target = Path(path)
    files = [target] if target.is_file() else sorted(target.glob("profile.*")) if target.is_dir() else []
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16] if files else None


def selection_fingerprint(config: TrainConfig) -> str:
    settings = {name: getattr(config, name) for name in selection_settings()}
    settings = {
        name: value
        for name, value in settings.items()
        if value is not None or name in SELECTION_INPUTS or name in _FINGERPRINTED_ALWAYS
    }
    settings["selection_content"] = _file_digest(config.selection)
    settings["profile_content"] = _file_digest(config.profile)
    return fingerprint(settings)


def run_record(config: TrainConfig) -> dict[str, Any]:
    """What ``config.json`` holds: the settings that produced this directory's artifacts."""
    return {
        "tool_version": __version__,
        "train": config.to_json(),
        "selection_fingerprint": selection_fingerprint(config),
    }


@dataclass
class RunDir:
    """Where a run's artifacts go: ``path`` itself, or a staging directory swapped in on success."""

    path: Path
    work: Path

    @property
    def staged(self) -> bool:
        return self.work != self.path


def is_finished_run(run_dir: Path, config: TrainConfig) -> bool:
    """Adapter and metrics written by a run whose schedule (--max-steps, --epochs) is the one asked for now: a
    --resume of it has nothing left to train (a longer schedule continues it instead)."""
    if not all((run_dir / name).exists() for name in RESULT_FILES):
        return False
    record = _read_record(run_dir) or {"train": {}}
    return all(record["train"].get(key) == getattr(config, key) for key in ("max_steps", "epochs"))


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    saved = run_dir / "config.json"
    if not saved.exists():
        return None
    try:
        record = json.loads(saved.read_text(encoding="utf-8"))
        record["train"].items()
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{saved}: not a moe-sieve run record ({err}); pass --overwrite to start over") from None
    return record


def _newest_complete_checkpoint(run_dir: Path) -> Path | None:
    from .trainer import checkpoint_complete, list_checkpoints

    return next((p for _, p in reversed(list_checkpoints(run_dir / "checkpoints")) if checkpoint_complete(p)), None)


def continue_hint(run_dir: Path) -> str:
    """How to go on with the run in ``run_dir`` once it stopped (Ctrl-C, a refusal): one sentence."""
    if all((run_dir / name).exists() for name in RESULT_FILES):
        return f"{run_dir} holds a finished run; --overwrite replaces it"
    found = _newest_complete_checkpoint(run_dir)
    if found is not None:
        return f"--resume continues {run_dir} from {found.name} (same settings)"
    if (run_dir / "config.json").exists():
        return f"{run_dir} has no complete checkpoint yet, so there is nothing to resume: --overwrite starts it again"
    return f"{run_dir} holds no run yet; run the same command again"


def check_run_dir(config: TrainConfig, overwrite: bool, resume: bool) -> Path:
    """Every check on ``--out`` that needs no model: before any work, and before anything is written.

    A directory's ``config.json`` records the settings that produced its artifacts; continuing with other
    settings (or without ``--resume``) would mix two experiments, so it is refused unless ``--overwrite``.
    """
    run_dir = Path(config.out)
    if overwrite and resume:
        raise ValueError(
            "--overwrite and --resume exclude each other: --resume continues the run in --out, --overwrite replaces it"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--out {run_dir} is a file, not a directory")
    ensure_writable(run_dir, overwrite=True, directory=True)
    inputs = {Path(p).resolve() for p in (config.profile, config.selection) if p}  # e.g. RUN/profile made first
    present = [name for name in RUN_ARTIFACTS if (run_dir / name).exists() and (run_dir / name).resolve() not in inputs]
    finished = [name for name in RESULT_FILES if (run_dir / name).exists()]
    if resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"--resume: {run_dir} does not exist")
        record = _read_record(run_dir)
        if record is None:
            raise FileNotFoundError(f"--resume: {run_dir / 'config.json'} not found; {run_dir} holds no run to resume")
        now = config.to_json()
        # a setting added to train since the run started is absent from its record: it ran with the default
        saved = {**TrainConfig(model="", data="", out="").to_json(), **record["train"]}
        changed = {
            key: (saved.get(key), value)
            for key, value in now.items()
            if key not in RESUMABLE_SETTINGS and saved.get(key) != value
        }
        if changed:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
            raise ValueError(
                f"--resume: {run_dir / 'config.json'} was written with other settings ({listed}); "
                "resume with the same settings or pass --overwrite to start over"
            )
        saved_fp = record.get("selection_fingerprint")
        if saved_fp is not None and saved_fp != selection_fingerprint(config):
            raise ValueError(
                f"--resume: the --selection/--profile input of {run_dir} changed since the run started "
                "(its content fingerprint differs); pass --overwrite to start over"
            )
    elif present and not overwrite:
        if finished:
            raise ArtifactExistsError(
                f"{run_dir} already holds results ({', '.join(finished)}); pass --overwrite to replace them "
                "or --resume to continue"
            )
        if _newest_complete_checkpoint(run_dir) is None:
            raise ArtifactExistsError(
                f"{run_dir} holds an unfinished run that stopped before its first complete checkpoint "
                f"({', '.join(present)}); there is nothing to resume: pass --overwrite to start it again"
            )
        raise ArtifactExistsError(
            f"{run_dir} holds an unfinished run ({', '.join(present)}); pass --resume to continue it with the "
            "same settings or --overwrite to start over (its selection and checkpoints are never reused silently)"
        )
    return run_dir


def prepare_run_dir(config: TrainConfig, overwrite: bool, resume: bool) -> RunDir:
    """The directory to write into: the run directory, or (``--overwrite`` of an existing run) a staging
    directory beside it that replaces the old run only when the new one has finished."""
    run_dir = check_run_dir(config, overwrite, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps_in(run_dir)
    clean_stale_temps(run_dir)
    inputs = {Path(p).resolve() for p in (config.profile, config.selection) if p}
    if overwrite and any((run_dir / n).exists() and (run_dir / n).resolve() not in inputs for n in RUN_ARTIFACTS):
        return RunDir(run_dir, make_staging_dir(run_dir))
    return RunDir(run_dir, run_dir)


def keep_foreign_files(run_dir: Path, work: Path, config: TrainConfig) -> None:
    """What ``--overwrite`` keeps of the old run when it swaps in the new one: files ``train`` does not write (a
    sweep's run.json and worker.log, notes of the user) and this run's own inputs (``--profile RUN/profile``),
    so that config.json never names a file that is gone; none of the old run's other artifacts."""
    from .._io import link_or_copy
    from .monitor import TRACE_FILE
    from .reselect import RESELECT_FILE

    owned = {*RUN_ARTIFACTS, TRACE_FILE, RESELECT_FILE, "tensorboard"}
    inputs = {Path(p).resolve() for p in (config.profile, config.selection) if p}
    for entry in run_dir.iterdir():
        wanted = entry.resolve() in inputs or (entry.name not in owned and not entry.name.startswith("."))
        if wanted and not (work / entry.name).exists():
            link_or_copy(entry, work / entry.name)
