"""Rich tables shared by the CLI and the demo."""

from __future__ import annotations

from rich.table import Table


def stats_table(report: dict) -> Table:
    table = Table(title=f"Routing statistics (k = {report['k']})")
    for column in (
        "layer",
        "tokens",
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
            f"{row['tokens']:,}",
            f"{row['cv']:.3f}",
            f"{100 * row['cold_fraction']:.1f}",
            f"{100 * row['coverage']:.1f}",
            f"{row['entropy']:.3f}",
            "-" if cmj is None else f"{cmj:.3f}",
        )
    return table
