"""What each condition costs: trainable parameters, checkpoint size, wall time, memory."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ..blocks import Section, Table
from ..data import RunInfo, StudyData, as_float


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s >= 3600:
        return f"{int(s // 3600)}h {int(s % 3600 // 60)}m"
    if s >= 60:
        return f"{int(s // 60)}m {int(s % 60)}s"
    return f"{s:.1f} s"


_COST_COLUMNS = (
    ("trainable_params", "trainable params", lambda v: f"{v / 1e6:.2f}M" if v >= 1e5 else f"{v:,.0f}"),
    ("adapter_bytes", "checkpoint", _bytes),
    ("wall_time_s", "wall time", _seconds),
    ("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}"),
    ("peak_memory_bytes", "peak memory", _bytes),
)


PARTIAL_TIME = "‡"
_TIMED = ("wall_time_s", "tokens_per_s")  # measured by the last training segment only, in a resumed run


def cost_section(data: StudyData, ref: str | None) -> Section | None:
    """Table 4: parameters, checkpoint size and time per condition, with the reduction against the reference.

    A resumed run whose metrics.json has no ``segments`` timed only the steps after its resume: it is left out
    of the wall time and tokens/s means, and the cell is marked."""
    groups: dict[tuple[str, str, str], list[RunInfo]] = defaultdict(list)
    for run in data.finished:
        groups[(run.row["model"], run.row["task"], run.row["condition"])].append(run)
    present = [
        c for c in _COST_COLUMNS if any(as_float(r.row.get(c[0])) is not None for rs in groups.values() for r in rs)
    ]
    if not present:
        return None

    def mean(runs: list[RunInfo], col: str) -> float | None:
        usable = [r for r in runs if not (col in _TIMED and r.wall_time_partial)]
        values = [v for v in (as_float(r.row.get(col)) for r in usable) if v is not None]
        return float(np.mean(values)) if values else None

    headers = ["model", "task", "condition"]
    for col, label, _ in present:
        headers.append(label)
        if ref and col in ("trainable_params", "adapter_bytes", "wall_time_s"):
            headers.append("red.")
    rows, partial = [], []
    for (model, task, condition), rs in sorted(groups.items()):
        row = [model, task, condition]
        base = groups.get((model, task, ref)) if ref else None
        flagged = [r for r in rs if r.wall_time_partial]
        partial += flagged
        base_flagged = bool(base) and any(r.wall_time_partial for r in base)
        for col, _, fmt in present:
            value = mean(rs, col)
            mark = f" {PARTIAL_TIME}" if col in _TIMED and flagged else ""
            row.append(("–" if value is None else fmt(value)) + mark)
            if ref and col in ("trainable_params", "adapter_bytes", "wall_time_s"):
                b = mean(base, col) if base else None
                cell = "–" if value is None or not b or condition == ref else f"{100 * (1 - value / b):.1f}%"
                if col == "wall_time_s" and (flagged or base_flagged) and cell != "–":
                    cell += f" {PARTIAL_TIME}"
                row.append(cell)
        rows.append(row)
    section = Section(
        "cost",
        "Parameters, checkpoint and time (Table 4)",
        "Means over each condition's finished runs"
        + (f"; reductions are relative to {ref!r}." if ref else ".")
        + " Times were measured on whatever machine ran each run.",
    )
    section.blocks.append(Table(headers, rows))
    if partial:
        section.blocks.append(
            f"{PARTIAL_TIME} {len(partial)} resumed run(s) timed only the steps after their resume (metrics.json has "
            "resumed_from but no segments): "
            + ", ".join(
                f"{r.row.get('run_id', '?')} (from {Path(str(r.metrics['resumed_from'])).name})" for r in partial
            )
            + ". They are left out of the wall time and tokens/s means; a condition with no other run shows –."
        )
    return section
