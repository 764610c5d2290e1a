"""Training-loss curves per condition."""

from __future__ import annotations

from collections import defaultdict

from .. import figures
from ..blocks import Figure, Section
from ..data import StudyData
from .context import NOT_CONVERGED


def curves_section(data: StudyData) -> Section | None:
    """Per-condition training loss over steps: mean and min-max band over seeds."""
    groups: dict[tuple[str, str], dict[str, list[tuple[list[int], list[float]]]]] = defaultdict(dict)
    flagged: set[str] = set()
    missing = []
    for run in data.finished:
        curve = run.loss_curve()
        if curve is None:
            missing.append(run.row.get("run_id", "?"))
            continue
        if run.converged is False:
            flagged.add(run.row["condition"])
        groups[(run.row["model"], run.row["task"])].setdefault(run.row["condition"], []).append(curve)
    if not groups:
        return None
    section = Section(
        "curves",
        "Learning curves",
        "Training loss per condition against the optimizer step: mean over seeds at the steps every seed logged, "
        "with the min-max band over seeds (metrics.json loss_curve; runs without it fall back to their newest "
        f"checkpoint's trainer_state.json, which ends at that checkpoint). {NOT_CONVERGED}: the condition holds runs "
        "that had not converged.",
    )
    for (model, task), curves in sorted(groups.items()):
        labelled = {c + (f" {NOT_CONVERGED}" if c in flagged else ""): v for c, v in sorted(curves.items())}
        section.blocks.append(
            Figure(
                f"curves_{model}_{task}",
                figures.learning_curves(labelled, f"{model} · {task}"),
                f"Training loss, mean and min-max over seeds — {model} · {task}",
            )
        )
    if missing:
        section.blocks.append(
            f"{len(missing)} finished run(s) have no loss curve (no loss_curve in metrics.json and no checkpoint): "
            + ", ".join(missing[:10])
            + (" ..." if len(missing) > 10 else "")
        )
    return section
