"""Commands over runs and studies: ``compare-runs``, ``report``, ``demo``, ``sweep`` and ``study``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import JsonOpt, KOpt, console, err_console, fail

MetricOpt = Annotated[
    str,
    typer.Option(
        help="Metric column of results.csv: accuracy, accuracy_norm, gold_prob, result_prob (proportions: Δ and "
        "margins in pp), gold_logprob, gold_nll_per_token, result_logprob, result_nll_per_token (nats), or any "
        "other numeric column (its own units)."
    ),
]
UnitOpt = Annotated[
    str | None,
    typer.Option(help="Override the metric's unit: pp (a proportion in [0, 1]), nats, or raw (the column as is)."),
]
MarginsOpt = Annotated[
    str,
    typer.Option(help="TOST equivalence margins in the metric's unit (pp for proportions, nats for log-likelihoods)."),
]


def compare_runs_command(
    results: Annotated[Path, typer.Argument(help="CSV with model, task, condition, seed and the metric column.")],
    reference: Annotated[
        str, typer.Option(help="Condition every other one is compared with, per model/task.")
    ] = "full",
    margins: MarginsOpt = "1,2,3",
    metric: MetricOpt = "accuracy",
    unit: UnitOpt = None,
    alpha: Annotated[float, typer.Option(help="Significance level of the TOST verdicts.")] = 0.05,
    as_json: JsonOpt = False,
) -> None:
    """Mean and seed std per condition; paired per-seed delta vs --reference with a 95% t interval, the
    paired t-test, TOST equivalence at each margin and the seed-std ratio (paper Tables 3, 6, 8). Warns when a
    compared condition holds runs whose training had not converged (results.csv column converged)."""
    from ..seed_stats import compare_runs_csv, convergence_warning, metric_info, unit_note
    from ..tables import comparison_table

    rows, skipped = compare_runs_csv(results, reference, margins, metric, alpha, unit=unit)
    for prefix, line in (("Note", unit_note(metric_info(metric, unit))), ("Warning", convergence_warning(rows))):
        if line:
            err_console.print(f"[bold yellow]{prefix}:[/] ", end="")
            err_console.print(line, markup=False, highlight=False)
    if as_json:
        print(json.dumps([row.to_json() for row in rows], indent=2))
        return
    console.print(comparison_table(rows, metric))
    unpaired = sum(len(row.unpaired_seeds) for row in rows)
    console.print(
        f"{len(rows)} conditions; {skipped} row(s) without {metric} left out; "
        f"{unpaired} seed(s) without a partner left out of the paired numbers"
    )


def report(
    study_dir: Annotated[
        Path, typer.Argument(help="Study directory (results.csv, runs/, profiles/) or a profile set.")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file (default: STUDY_DIR/report.html).")] = None,
    md: Annotated[Path | None, typer.Option(help="Markdown twin (default: the HTML path with .md).")] = None,
    reference: Annotated[str, typer.Option(help="Condition the others are compared with.")] = "full",
    margins: MarginsOpt = "1,2,3",
    metric: MetricOpt = "accuracy",
    unit: UnitOpt = None,
    k: KOpt = "25%",
    stability_trials: Annotated[int, typer.Option(help="Subsample-stability trials per dataset (0 to skip).")] = 50,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report.")] = False,
) -> None:
    """One self-contained HTML page (figures embedded) and a Markdown twin with every table and figure of the
    paper the study has data for, plus the claims table, forest plot and learning curves; sections without
    data are left out."""
    from .._io import ensure_writable
    from ..report import write_report
    from ..routing_stats import check_k, check_trials
    from ..seed_stats import metric_info, parse_margins

    info = metric_info(metric, unit)
    check_k(k)
    check_trials(stability_trials)
    out = out or study_dir / "report.html"
    md = md or out.with_suffix(".md")
    for path in (out, md):
        ensure_writable(path, overwrite)
    paths = write_report(
        study_dir,
        out,
        md,
        reference=reference,
        margins=parse_margins(margins, info.unit),
        k=k,
        stability_trials=stability_trials,
        overwrite=True,
        metric=metric,
        unit=unit,
    )
    console.print(
        f"[green]report written[/] to {paths['html']} and {paths['md']}: {len(paths['sections'])} sections "
        f"({', '.join(paths['sections'])})"
    )


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the demo's artifacts.")] = Path("runs/demo"),
    train_steps: Annotated[int, typer.Option(help="LoRA fine-tuning steps.")] = 300,
    eval_examples: Annotated[int, typer.Option(help="Held-out arithmetic problems to score.")] = 100,
    overwrite: Annotated[bool, typer.Option(help="Replace earlier demo artifacts.")] = False,
) -> None:
    """The recipe end to end on the embedded pretrained MoE: profile -> stats -> select hot-25% -> LoRA
    fine-tune on the arithmetic mini task -> held-out exact match before and after."""
    from .._io import ensure_writable
    from ..demo import DemoConfig, run_demo

    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        fail(f"--out {out} already holds results; pass --overwrite or choose another --out")
    ensure_writable(out, overwrite=True, directory=True)
    run_demo(
        DemoConfig(out=str(out), train_steps=train_steps, eval_examples=eval_examples),
        overwrite=overwrite,
        console=console,
    )


ExecutorOpt = Annotated[
    str, typer.Option(help="local (here: --jobs at a time, one GPU each) or submitit (SLURM; --cluster local/debug).")
]
JobsOpt = Annotated[int, typer.Option(help="Local executor: runs at a time (one GPU each, or a share of the CPUs).")]
ClusterOpt = Annotated[
    str | None, typer.Option(help="submitit cluster: slurm, local or debug (default: SLURM when present).")
]


def _sweep_options(
    executor: str,
    jobs: int,
    cluster: str | None,
    partition: str | None,
    timeout_min: int | None,
    gpus_per_node: int | None,
    overwrite: bool,
):
    from ..sweep import SweepOptions

    params = {"slurm_partition": partition, "timeout_min": timeout_min, "gpus_per_node": gpus_per_node}
    return SweepOptions(
        executor=executor,
        jobs=jobs,
        cluster=cluster,
        submitit_parameters={k: v for k, v in params.items() if v is not None},
        overwrite=overwrite,
    )


def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep YAML: models, tasks, conditions (train options), seeds.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Study directory (default: runs/NAME).")] = None,
    executor: ExecutorOpt = "local",
    jobs: JobsOpt = 1,
    cluster: ClusterOpt = None,
    partition: Annotated[str | None, typer.Option(help="SLURM partition (submitit).")] = None,
    timeout_min: Annotated[int | None, typer.Option(help="Per-run time limit in minutes (submitit).")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="GPUs per run (submitit).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Redo finished runs whose settings changed.")] = False,
) -> None:
    """Run models x tasks x conditions x seeds, one directory per run; finished runs are skipped, so an
    interrupted sweep resumes; results gather into OUT/results.csv and results.json."""
    from ..sweep import SweepConfig, run_sweep

    cfg = SweepConfig.from_yaml(config)
    options = _sweep_options(executor, jobs, cluster, partition, timeout_min, gpus_per_node, overwrite)
    rows = run_sweep(cfg, out or Path("runs") / cfg.name, options, log=console.print)
    if any(r["status"] != "finished" for r in rows):
        raise typer.Exit(code=1)


def study(
    preset: Annotated[str, typer.Option(help="Study preset (mini, routed-mini) or a sweep YAML.")] = "mini",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Study directory (default: runs/NAME).")] = None,
    executor: ExecutorOpt = "local",
    jobs: JobsOpt = 2,
    cluster: ClusterOpt = None,
    reference: Annotated[str, typer.Option(help="Reference condition of the comparison table.")] = "full",
) -> None:
    """The paper's design in miniature on the embedded model: mini tasks, routing study, hot-25% vs all
    experts vs random-25% vs attention-only over seeds, a k sweep, then statistics and the report."""
    from ..sweep.study import run_study

    options = _sweep_options(executor, jobs, cluster, None, None, None, False)
    summary = run_study(preset, out, options, log=console.print, reference=reference)
    if summary["failed"]:
        raise typer.Exit(code=1)
