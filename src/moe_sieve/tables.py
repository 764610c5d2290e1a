"""Rich tables shared by the CLI and the demo."""

from __future__ import annotations

import io
import shutil

from rich.console import Console
from rich.table import Table


class TextTable(Table):
    """A rich ``Table`` that ``print()`` and ``str()`` render as text, as the README's ``print(state.table())`` does;
    ``rich.print``/``Console.print`` still draw it with colour."""

    def __str__(self) -> str:
        width = max(shutil.get_terminal_size((120, 24)).columns, 80)
        console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
        console.print(self)
        return console.file.getvalue().rstrip("\n")


def stats_table(report: dict) -> Table:
    """Per-layer rows of ``stats``; "routed" is tokens x top-k (each token goes to top-k experts), while the
    caption gives the counted tokens as ``profile`` reports them."""
    table = Table(title=f"Routing statistics (k = {report['k']})")
    for column in (
        "layer",
        "routed (tokens x top-k)",
        "CV",
        "cold %",
        f"cov@{report['k']} %",
        "norm. entropy",
        "count/mass J",
    ):
        table.add_column(column, justify="right")
    for row in report["layers"]:
        cmj = row.get("count_mass_jaccard")
        table.add_row(
            str(row["layer"]),
            f"{row['routed']:,}",
            f"{row['cv']:.3f}",
            f"{100 * row['cold_fraction']:.1f}",
            f"{100 * row['coverage']:.1f}",
            f"{row['entropy']:.3f}",
            "-" if cmj is None else f"{cmj:.3f}",
        )
    tokens = (report.get("profile") or {}).get("tokens")
    if tokens is not None:
        table.caption = f"{tokens:,} counted tokens (as profile reports them), each routed to top-k experts per layer"
    return table


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def comparison_table(rows: list, metric: str | None = None) -> Table:
    """compare-runs rows (seed_stats.ComparisonRow) as a terminal table; differences and margins in the rows' unit
    (pp for proportions, nats for log-likelihoods)."""
    margins = sorted({m for row in rows for m in row.tost}, key=float)
    reference = rows[0].reference if rows else "?"
    unit = rows[0].unit if rows else "pp"
    metric = metric or (rows[0].metric if rows else "accuracy")
    gap = "" if unit == "pp" else " "
    table = Table(title=f"{metric}: paired comparison with {reference!r} (seeds paired by value; Δ in {unit})")
    for column in ("model", "task", "condition", "n", "mean", "std", f"Δ {unit} [95% CI]", "t-test p"):
        table.add_column(column, justify="left" if column in ("model", "task", "condition") else "right")
    for m in margins:
        table.add_column(f"TOST {m}{gap}{unit} p", justify="right")
    table.add_column("std ratio", justify="right")
    table.add_column("paired (missing)", justify="right")
    digits = ".2f" if unit == "pp" else ".4f"
    for row in rows:
        delta = "-"
        if row.delta is not None:
            delta = format(row.delta, "+" + digits)
            if row.ci_low is not None:
                delta += f" [{row.ci_low:+{digits}}, {row.ci_high:+{digits}}]"
        tost = []
        for m in margins:
            t = row.tost.get(m)
            tost.append("-" if t is None or t["p"] is None else f"{t['p']:.3f}{' ✓' if t['equivalent'] else ''}")
        paired = "-" if row.n_paired is None else f"{row.n_paired} ({len(row.unpaired_seeds)})"
        table.add_row(
            row.model,
            row.task,
            row.condition + (" †" if row.unconverged_seeds else ""),
            str(row.n),
            f"{row.mean:.4f}",
            _num(row.std, ".4f"),
            delta,
            _num(row.ttest_p, ".3f"),
            *tost,
            _num(row.std_ratio, ".2f"),
            paired,
        )
    return table


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def set_summary_table(report: dict) -> Table:
    """Per-dataset rows and per-model means of a profiling study (paper Table 2)."""
    table = Table(title=f"Profiling study (k = {report['k_requested']}): per dataset, then per model (Table 2)")
    for column in (
        "model",
        "dataset",
        "global CV",
        "layer CV",
        "ratio",
        "cold %",
        "cov %",
        "cov+shared %",
        "entropy",
        "count/mass J",
        "stability J",
    ):
        table.add_column(column, justify="left" if column in ("model", "dataset") else "right")
    for row in report["datasets"]:
        stab = row.get("subsample_stability")
        table.add_row(
            row["model"],
            row["name"],
            f"{row['global_cv']:.3f}",
            f"{row['mean_layer_cv']:.3f}",
            _num(row["ratio"], ".2f"),
            _pct(row["mean_cold_fraction"]),
            _pct(row["mean_coverage"]),
            _pct(row["mean_coverage_with_shared"]),
            f"{row['mean_entropy']:.3f}",
            _num(row["mean_count_mass_jaccard"], ".3f"),
            "-" if stab is None else f"{stab['mean_jaccard']:.3f}",
        )
    for m in report["models"]:
        table.add_row(
            f"[bold]{m['model']}[/]",
            f"[bold]mean of {len(m['datasets'])}[/]",
            _num(m["global_cv"], ".3f"),
            _num(m["layer_cv"], ".3f"),
            _num(m["ratio"], ".2f"),
            _pct(m["cold_fraction"]),
            _pct(m["coverage"]),
            _pct(m["coverage_with_shared"]),
            _num(m["entropy"], ".3f"),
            _num(m["count_mass_jaccard"], ".3f"),
            _num(m["subsample_stability"], ".3f"),
        )
    return table


def jaccard_table(block: dict) -> Table:
    """The cross-dataset top-k Jaccard matrix of one model (paper Fig. 3)."""
    table = Table(title=f"{block['model']}: top-{block['k']} Jaccard across datasets")
    table.add_column("")
    for name in block["names"]:
        table.add_column(name, justify="right")
    for name, row in zip(block["names"], block["matrix"], strict=True):
        table.add_row(name, *(f"{v:.3f}" for v in row))
    return table
