"""``moe-sieve study --preset mini`` (or ``routed-mini``): a shipped sweep (mini tasks, routing study, conditions x
seeds, k sweep), then the statistics table and the report when those modules are installed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..training.config import PRESET_DIR
from .config import SweepConfig
from .runner import SweepOptions, run_sweep

STUDY_PRESETS = {
    "mini": "studies/mini",
    "routed-mini": "studies/routed-mini",
    "evidence": "studies/evidence",
    "evidence-full": "studies/evidence-full",
}


def preset_path(preset: str) -> Path:
    """A study preset name (``mini``) or a path to a sweep YAML."""
    if preset in STUDY_PRESETS:
        return PRESET_DIR / f"{STUDY_PRESETS[preset]}.yaml"
    path = Path(preset)
    if not path.exists():
        raise FileNotFoundError(f"--preset {preset!r}: no such study preset ({', '.join(STUDY_PRESETS)}) or file")
    return path


def run_study(
    preset: str,
    out: str | Path | None,
    options: SweepOptions | None = None,
    log: Callable[[str], None] = print,
    reference: str = "full",
) -> dict[str, Any]:
    """Run the sweep of ``preset`` into ``out`` (default ``runs/<name>``), then compare-runs (if available) and the
    report (if available)."""
    started = time.perf_counter()
    config = SweepConfig.from_yaml(preset_path(preset))
    out = Path("runs") / config.name if out is None else Path(out)
    options = dataclasses.replace(
        options or SweepOptions(), continue_command=f"moe-sieve study --preset {preset} --out {out}"
    )
    rows = run_sweep(config, out, options, log)
    summary: dict[str, Any] = {
        "preset": preset,
        "runs": len(rows),
        "finished": sum(r["status"] == "finished" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
    }
    if summary["finished"]:
        from rich.console import Console

        from ..report import write_report
        from ..seed_stats import compare_runs_csv
        from ..tables import comparison_table

        for i, metric in enumerate(config.metrics):
            suffix = "" if i == 0 else f"-{metric}"
            table, skipped = compare_runs_csv(out / "results.csv", reference=reference, metric=metric)
            atomic_write_json(out / f"compare{suffix}.json", [row.to_json() for row in table])
            Console().print(comparison_table(table, metric))
            log(f"compare-runs ({metric}): {out / f'compare{suffix}.json'} ({skipped} runs without it left out)")
            html, md = out / f"report{suffix}.html", out / f"report{suffix}.md"
            write_report(out, html, md, reference=reference, metric=metric)
            log(f"report ({metric}): {html} and {md}")
        summary["compare"] = str(out / "compare.json")
        summary["report"] = str(out / "report.html")
    summary["wall_time_s"] = round(time.perf_counter() - started, 1)
    atomic_write_json(out / "study.json", summary)
    log(f"study done in {summary['wall_time_s']:.0f} s: {summary['finished']}/{summary['runs']} runs finished")
    return summary
