"""``moe-sieve``: a thin command line over the Python API (profile -> stats -> select)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .adapters.config import LORA
from .reporting import stats_table
from .selection import strategy_help

app = typer.Typer(
    name="moe-sieve",
    help="Routing-guided LoRA for Mixture-of-Experts models: profile routing, read its statistics, "
    "select the hot experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)

DEFAULT_MODEL = "moe-sieve-default"

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Hub id or local directory of a MoE causal LM; default: the embedded pretrained "
        "'moe-sieve-default' ('tiny-random-olmoe' is a random-weight one).",
    ),
]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="A task (gsm8k, hellaswag, spider), TASK:PATH for that task's rows in local files, or a local "
        ".jsonl with `text` or `prompt`+`completion` fields.",
    ),
]
KOpt = Annotated[
    str, typer.Option("--k", help="Experts per layer: a count (16) or a share of the routed experts (25%).")
]


DEBUG_ENV = "MOE_SIEVE_DEBUG"


def _print_error(message: str) -> None:
    """One line, ``Error: ...``; the message is printed verbatim (no rich markup, so ``[0, 1]`` survives)."""
    err_console.print("[bold red]Error:[/] ", end="")
    err_console.print(" ".join(str(message).split()), markup=False, highlight=False)


def _fail(message: str) -> None:
    _print_error(message)
    raise typer.Exit(code=2)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Show the full traceback of errors (or set {DEBUG_ENV}=1).")
    ] = False,
) -> None:
    if debug:
        os.environ[DEBUG_ENV] = "1"


@app.command()
def profile(
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile directory to write.")],
    model: ModelOpt = DEFAULT_MODEL,
    data: DataOpt = "gsm8k",
    split: Annotated[str | None, typer.Option(help="Dataset split (the task's training split by default).")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Keep at most this many examples.")] = None,
    subsample: Annotated[
        float | None, typer.Option(help="Profile a seeded random share of the examples, e.g. 0.1.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of --subsample.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 1024,
    count_tokens: Annotated[str, typer.Option(help="Which tokens count: all, prompt or completion.")] = "all",
    spider_dir: Annotated[
        str | None, typer.Option(help="Spider directory holding tables.json (for --data spider).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), bfloat16, float16, float32.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    device_map: Annotated[str | None, typer.Option(help="Shard a large model with accelerate, e.g. 'auto'.")] = None,
    experts_implementation: Annotated[
        str | None, typer.Option(help="transformers experts backend (eager, batched_mm, grouped_mm).")
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Run the model repository's own code (only for repositories you trust).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing profile at --out.")] = False,
) -> None:
    """Count, per layer, how many tokens each routed expert receives (one gradient-free pass). A
    comma-separated --data (gsm8k,spider,mbpp) profiles each dataset with one model load into --out/<name>."""
    from ._io import ensure_writable
    from .profiling import ProfileConfig, run_profile

    ensure_writable(out, overwrite, directory=True)
    config = ProfileConfig(
        model=model,
        data=data,
        split=split,
        max_examples=max_examples,
        subsample=subsample,
        seed=seed,
        batch_size=batch_size,
        max_length=max_length,
        count_tokens=count_tokens,
        spider_dir=spider_dir,
        dtype=dtype,
        device=device,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
        experts_implementation=experts_implementation,
    )
    if "," in data:
        from .profiling.profile_set import run_profile_set

        profiles = run_profile_set(
            config, out, overwrite=overwrite, progress=sys.stderr.isatty() or console.is_terminal
        )
        for name, prof in profiles.items():
            console.print(f"  {name}: {prof.num_examples} examples, {prof.tokens:,} counted tokens")
        console.print(f"[green]{len(profiles)} profiles written[/] to {out}/<dataset> (one model load)")
        return
    result = run_profile(config, progress=sys.stderr.isatty() or console.is_terminal)
    result.save(out, overwrite=overwrite)
    run = result.metadata["run"]
    console.print(
        f"[green]profile written[/] to {out}: {result.num_examples} examples, "
        f"{result.tokens:,} counted tokens, "
        f"{len(result.layer_ids)} MoE layers x {result.num_experts} experts (top-{result.top_k}), "
        f"{run['tokens_per_s']:,.0f} tok/s"
    )


@app.command()
def stats(
    profile_dir: Annotated[Path, typer.Argument(help="Profile directory written by `moe-sieve profile`.")],
    k: KOpt = "25%",
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    stability_fraction: Annotated[
        float, typer.Option(help="Subsample share for the stability estimate (paper: 0.1).")
    ] = 0.1,
    stability_trials: Annotated[int, typer.Option(help="Subsample trials (0 to skip).")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the subsample trials.")] = 0,
) -> None:
    """Routing skew of a profile: per-layer CV, cold experts, coverage, entropy; global CV and ratio. On a
    profile set (`profile --data a,b,c`): per-dataset rows, the cross-dataset Jaccard matrix and Table 2."""
    from .profiling import Profile
    from .profiling.profile_set import is_profile_set
    from .stats import check_k, check_trials, routing_stats, subsample_stability

    check_k(k)
    check_trials(stability_trials)
    if is_profile_set(profile_dir):
        _set_stats(profile_dir, k, as_json, stability_fraction, stability_trials, seed)
        return

    prof = Profile.load(profile_dir)
    report = routing_stats(prof.counts_LE, prof.mass_LE, layer_ids=prof.layer_ids, k=k).to_json()
    if stability_trials > 0:
        from .stats import resolve_k

        stab = subsample_stability(
            prof.example_counts_NLE,
            stability_fraction,
            resolve_k(k, prof.num_experts),
            trials=stability_trials,
            seed=seed,
        )
        report["subsample_stability"] = {
            "fraction": stab.fraction,
            "trials": stab.trials,
            "seed": stab.seed,
            "mean_jaccard": stab.mean,
            "std_jaccard": stab.std,
        }
    report["profile"] = {"path": str(profile_dir), "fingerprint": prof.fingerprint, **_profile_summary(prof)}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(stats_table(report))
    ratio = report["ratio"]
    console.print(
        f"global CV [bold]{report['global_cv']:.3f}[/]  "
        f"mean layer CV [bold]{report['mean_layer_cv']:.3f}[/]  "
        f"ratio [bold]{'n/a' if ratio is None else f'{ratio:.2f}x'}[/]  "
        f"mean cold {100 * report['mean_cold_fraction']:.1f}%  "
        f"mean coverage {100 * report['mean_coverage']:.1f}%"
    )
    if "subsample_stability" in report:
        s = report["subsample_stability"]
        console.print(
            f"subsample stability ({s['fraction']:.0%}, {s['trials']} trials): "
            f"mean Jaccard {s['mean_jaccard']:.3f} ± {s['std_jaccard']:.3f}"
        )


def _set_stats(path: Path, k: str, as_json: bool, fraction: float, trials: int, seed: int) -> None:
    from .profiling.profile_set import load_profile_set, set_stats
    from .reporting import jaccard_table, set_summary_table

    report = set_stats(load_profile_set(path), k, fraction, trials, seed)
    report["path"] = str(path)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(set_summary_table(report))
    for block in report["jaccard"]:
        console.print(jaccard_table(block))


def _profile_summary(prof) -> dict:
    return {
        "model": prof.metadata.get("model", {}).get("id"),
        "data": prof.metadata.get("data", {}).get("data"),
        "examples": prof.num_examples,
        "tokens": prof.tokens,
    }


def _experts_of(path: Path, k: str, rank_by: str) -> tuple[str, dict[int, list[int]]]:
    """A selection file as is, or a profile directory's uniform top-k."""
    from .profiling import Profile
    from .selection import Selection, select_topk
    from .stats import resolve_k

    if path.is_file():
        return path.stem, Selection.load(path).experts
    prof = Profile.load(path)
    scores = prof.mass_LE if rank_by == "mass" else prof.counts_LE
    return path.name, select_topk(scores, resolve_k(k, prof.num_experts), layer_ids=prof.layer_ids)


@app.command()
def compare(
    paths: Annotated[list[Path], typer.Argument(help="Two or more profile directories or selection files.")],
    k: KOpt = "25%",
    rank_by: Annotated[str, typer.Option(help="Rank profiles by count or mass.")] = "count",
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Mean per-layer Jaccard overlap between the top-k expert sets of several profiles (e.g. tasks)."""
    from .stats import selection_jaccard

    if rank_by not in ("count", "mass"):
        _fail(f"--rank-by must be count or mass, got {rank_by!r}")
    if len(paths) < 2:
        _fail("compare needs at least two profiles or selections")
    named = [_experts_of(path, k, rank_by) for path in paths]
    names = [name for name, _ in named]
    matrix = [[selection_jaccard(a, b) for _, b in named] for _, a in named]
    if as_json:
        print(json.dumps({"names": names, "paths": [str(p) for p in paths], "k": k, "jaccard": matrix}, indent=2))
        return
    table = Table(title=f"Top-k Jaccard (k = {k}, ranked by {rank_by})")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for name, row in zip(names, matrix, strict=True):
        table.add_row(name, *(f"{value:.3f}" for value in row))
    console.print(table)


@app.command()
def select(
    profile_dir: Annotated[Path, typer.Argument(help="Profile directory written by `moe-sieve profile`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Selection JSON file to write.")],
    strategy: Annotated[str, typer.Option(help=f"How experts are chosen: {strategy_help()}.")] = "topk",
    k: KOpt = "25%",
    rank_by: Annotated[str, typer.Option(help="Rank experts by routed-token count or by routing mass.")] = "count",
    seed: Annotated[int, typer.Option(help="Seed of --strategy random and hot+filler.")] = 0,
    hot: Annotated[
        str | None, typer.Option(help="hot+filler: top experts kept per layer, count or share (default: k/2).")
    ] = None,
    min_per_layer: Annotated[
        int | None, typer.Option(help="Greedy: experts every layer starts with (default: the model's top-k).")
    ] = None,
    coverage: Annotated[float, typer.Option(help="Coverage strategy: share of activations to reach.")] = 0.6,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing selection file.")] = False,
) -> None:
    """Choose which routed experts get adapters, per layer."""
    from ._io import ensure_writable
    from .profiling import Profile
    from .selection import make_selection, selection_table

    ensure_writable(out, overwrite, directory=False)
    prof = Profile.load(profile_dir)
    selection = make_selection(
        prof.counts_LE,
        prof.mass_LE,
        strategy=strategy,
        k=k,
        rank_by=rank_by,
        seed=seed,
        min_per_layer=min_per_layer,
        coverage=coverage,
        hot=hot,
        layer_ids=prof.layer_ids,
        top_k=prof.top_k,
        source={
            "profile": str(profile_dir),
            "profile_fingerprint": prof.fingerprint,
            "model": prof.metadata.get("model", {}).get("id"),
            "model_config_fingerprint": prof.model_fingerprint,
            "data": prof.metadata.get("data", {}).get("data"),
        },
    )
    selection.save(out, overwrite=overwrite)
    console.print(selection_table(selection, prof.counts_LE))
    console.print(
        f"[green]selection written[/] to {out}: {selection.total_slots} expert slots over "
        f"{len(selection.experts)} layers ({strategy})"
    )


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


@app.command("compare-runs")
def compare_runs_command(
    results: Annotated[Path, typer.Argument(help="CSV with model, task, condition, seed and the metric column.")],
    reference: Annotated[
        str, typer.Option(help="Condition every other one is compared with, per model/task.")
    ] = "full",
    margins: MarginsOpt = "1,2,3",
    metric: MetricOpt = "accuracy",
    unit: UnitOpt = None,
    alpha: Annotated[float, typer.Option(help="Significance level of the TOST verdicts.")] = 0.05,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Mean and seed std per condition; paired per-seed delta vs --reference with a 95% t interval, the
    paired t-test, TOST equivalence at each margin and the seed-std ratio (paper Tables 3, 6, 8). Warns when a
    compared condition holds runs whose training had not converged (results.csv column converged)."""
    from .reporting import comparison_table
    from .runstats import compare_runs_csv, convergence_warning, metric_info, unit_note

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


@app.command()
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
    from ._io import ensure_writable
    from .report import write_report
    from .runstats import metric_info, parse_margins
    from .stats import check_k, check_trials

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


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


@app.command()
def plan(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Hub id, model directory, or a config.json file.")
    ] = DEFAULT_MODEL,
    k: KOpt = "25%",
    r: Annotated[int, typer.Option(help="LoRA rank.")] = LORA.r,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = LORA.alpha,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the repository's own config code.")] = False,
    method: Annotated[str, typer.Option(help="sieve, or routed (Routed-PEFT adapters).")] = "sieve",
    variant: Annotated[str, typer.Option(help="routed: S, D, R or E.")] = "E",
    adapter_type: Annotated[str, typer.Option(help="routed: lora or parallel.")] = "lora",
    num_adapters: Annotated[int, typer.Option(help="routed: N adapters per layer (D, R).")] = 4,
    top_k_adapters: Annotated[int, typer.Option("--top-k-adapters", "--top-k", help="routed: K of N (R).")] = 2,
    experts: Annotated[str, typer.Option(help="routed E: all experts, or the hot --k selected.")] = "all",
    ep_size: Annotated[int, typer.Option(help="Per-rank plan under transformers' expert parallelism (0: off).")] = 0,
    fsdp_size: Annotated[int, typer.Option(help="EP plan: FSDP ranks (world size; default --ep-size).")] = 0,
    profile: Annotated[Path | None, typer.Option(help="EP plan: a profile, to measure the hot set's spread.")] = None,
    micro_batch: Annotated[int, typer.Option(help="EP plan: sequences per rank per step.")] = 1,
    seq_len: Annotated[int, typer.Option(help="EP plan: tokens per sequence.")] = 4096,
) -> None:
    """Trainable parameters, checkpoint size and optimizer memory of full LoRA vs the hot-k budget,
    computed on the meta device (no weights are loaded, no profile is needed). With --ep-size: per rank
    under transformers' expert-parallel engine (docs/distributed.md)."""
    from .adapters import SieveLoraConfig, plan_adapters

    if ep_size:
        from .adapters.ep import ep_plan_table, plan_ep
        from .profiling.artifact import Profile

        result = plan_ep(
            model, k, ep_size, fsdp_size or None, SieveLoraConfig(r=r, alpha=alpha), micro_batch=micro_batch,
            seq_len=seq_len, profile=Profile.load(profile) if profile else None, trust_remote_code=trust_remote_code,
        )  # fmt: skip
        if as_json:
            print(json.dumps(result, indent=2))
            return
        table, lines = ep_plan_table(result)
        console.print(table)
        for line in lines:
            console.print(line, markup=False, highlight=False)
        return

    if method == "routed":
        from .adapters.routed import RoutedAdapterConfig, plan_routed

        routed = RoutedAdapterConfig(
            variant=variant,
            adapter_type=adapter_type,
            r=r,
            alpha=alpha,
            num_adapters=num_adapters,
            top_k=top_k_adapters,
            experts=experts,
        )
        result = plan_routed(model, routed, k=k, trust_remote_code=trust_remote_code)
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            console.print(
                f"Routed-PEFT {variant}: {result['trainable_params']:,} trainable params = "
                f"{result['trainable_pct_of_total']:.3f}% of {result['base_params']:,} total, "
                f"{result['trainable_pct_of_activated']:.3f}% of {result['activated_params']:,} activated"
            )
        return
    if method != "sieve":
        _fail(f"--method must be sieve or routed, got {method!r}")
    result = plan_adapters(model, k=k, lora=SieveLoraConfig(r=r, alpha=alpha), trust_remote_code=trust_remote_code)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"{result['model']}: LoRA r={r}, alpha={alpha:g}, hot {result['k']}/{result['num_experts']}")
    for column in ("", "trainable params", "fp32 checkpoint", "AdamW state"):
        table.add_column(column, justify="right")
    for name, key in (("full LoRA", "full"), (f"sieve hot-{result['k']}", "sieve")):
        table.add_row(
            name,
            f"{result[f'{key}_params'] / 1e6:,.1f}M",
            _gb(result[f"{key}_bytes"]),
            _gb(result[f"{key}_optimizer_bytes"]),
        )
    console.print(table)
    console.print(f"reduction [bold]{100 * result['reduction']:.1f}%[/] of LoRA trainable parameters")


@app.command()
def attach(
    model: ModelOpt = DEFAULT_MODEL,
    selection: Annotated[
        Path | None, typer.Option("--selection", "-s", help="Selection JSON (needed for --experts selected).")
    ] = None,
    experts: Annotated[str, typer.Option(help="selected (MoE-Sieve), all (full LoRA) or none.")] = "selected",
    r: Annotated[int, typer.Option(help="LoRA rank.")] = LORA.r,
    alpha: Annotated[float, typer.Option(help="LoRA alpha.")] = LORA.alpha,
    targets: Annotated[
        str, typer.Option(help="Comma-separated module groups: attention,router,shared,experts.")
    ] = "attention,router,shared,experts",
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
) -> None:
    """Dry run: load the model on CPU, attach the adapters, verify every selected expert got one and
    print the trainable parameters per layer and module group."""
    from .adapters import SieveLoraConfig, apply_sieve_lora
    from .modeling import ModelSpec, load_model

    net = load_model(ModelSpec(model=model, device="cpu", trust_remote_code=trust_remote_code))
    config = SieveLoraConfig(r=r, alpha=alpha, experts=experts, targets=tuple(t for t in targets.split(",") if t))
    state = apply_sieve_lora(net, selection, config)
    console.print(state.table())


def _load_adapted(adapter: Path, model: str | None, trust_remote_code: bool, dtype: str = "auto"):
    """The base model named by ``--model`` or by the adapter, on CPU, with the adapter loaded."""
    from .adapters import load_sieve_adapter, read_adapter_config
    from .modeling import ModelSpec, load_model

    base = model or read_adapter_config(adapter)["base_model"]["id"]
    if not base:
        _fail(f"{adapter}: the adapter names no base model; pass --model")
    spec = ModelSpec(model=base, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    net = load_model(spec)
    load_sieve_adapter(net, adapter)
    return net, spec


@app.command()
def merge(
    adapter: Annotated[Path, typer.Argument(help="Adapter directory (adapter.safetensors + adapter_config.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the merged checkpoint.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the one named in the adapter).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Load/save dtype (auto: the checkpoint's own on CPU is fp32).")] = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Fold the adapter into the base weights and write a plain transformers checkpoint."""
    from ._io import atomic_dir, ensure_writable
    from .adapters import merge_sieve_lora
    from .modeling import TokenizerMissingError, load_tokenizer

    ensure_writable(out, overwrite, directory=True)
    with atomic_dir(out, overwrite) as tmp:
        merged, spec = _load_adapted(adapter, model, trust_remote_code, dtype)
        merge_sieve_lora(merged).save_pretrained(tmp)
        try:
            load_tokenizer(spec).save_pretrained(tmp)
        except TokenizerMissingError as err:
            # The merged weights are still the result asked for; a degenerate tokenizer is never copied.
            err_console.print(
                f"[bold yellow]Warning:[/] {err}. The merged checkpoint in {out} has NO tokenizer: copy the "
                "base model's tokenizer there before using it.",
                markup=True,
            )
    console.print(f"[green]merged checkpoint written[/] to {out} (loads with AutoModelForCausalLM.from_pretrained)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the demo's artifacts.")] = Path("runs/demo"),
    train_steps: Annotated[int, typer.Option(help="LoRA fine-tuning steps.")] = 300,
    eval_examples: Annotated[int, typer.Option(help="Held-out arithmetic problems to score.")] = 100,
    overwrite: Annotated[bool, typer.Option(help="Replace earlier demo artifacts.")] = False,
) -> None:
    """The recipe end to end on the embedded pretrained MoE: profile -> stats -> select hot-25% -> LoRA
    fine-tune on the arithmetic mini task -> held-out exact match before and after."""
    from ._io import ensure_writable
    from .demo import DemoConfig, run_demo

    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        _fail(f"--out {out} already holds results; pass --overwrite or choose another --out")
    ensure_writable(out, overwrite=True, directory=True)
    run_demo(
        DemoConfig(out=str(out), train_steps=train_steps, eval_examples=eval_examples),
        overwrite=overwrite,
        console=console,
    )


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix == ".safetensors")


def _size(n_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} B"


@app.command("export")
def export_command(
    adapter: Annotated[Path, typer.Argument(help="moe-sieve adapter directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write.")],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="peft (PeftModel.from_pretrained), vllm or sglang (per-expert LoRA the engine loads, "
            "unselected experts zero-filled), merged (plain transformers checkpoint).",
        ),
    ] = "peft",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the one named in the adapter).")
    ] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Write the adapter where it will be used: PEFT, vLLM, SGLang or a merged checkpoint."""
    from ._io import ensure_writable
    from .adapters import export_peft_adapter
    from .adapters.io import UnsupportedExportError
    from .adapters.serving import SERVING_ENGINES, export_serving_adapter

    formats = ("peft", *SERVING_ENGINES, "merged")
    if format not in formats:
        _fail(f"--format {format!r}: choose one of {', '.join(formats)}")
    if format == "merged":
        merge(adapter, out, model=model, dtype="auto", trust_remote_code=trust_remote_code, overwrite=overwrite)
        return
    ensure_writable(out, overwrite, directory=True)
    net, spec = _load_adapted(adapter, model, trust_remote_code)
    sieve_bytes = _dir_bytes(adapter)
    try:
        if format == "peft":
            export_peft_adapter(net, out, base_model=spec.model, overwrite=overwrite)
        else:
            result = export_serving_adapter(net, out, engine=format, base_model=spec.model, overwrite=overwrite)
    except UnsupportedExportError as err:
        _fail(f"{adapter}: --format {format}: {err}")
    if format == "peft":
        console.print(f"[green]PEFT adapter written[/] to {out} (PeftModel.from_pretrained(base, '{out}'))")
    else:
        console.print(
            f"[green]{format} LoRA adapter written[/] to {out}: rank {result.rank}, {result.tensors} tensors, "
            f"{result.zero_filled_experts} unselected experts zero-filled"
        )
    console.print(
        f"size: {_size(_dir_bytes(out))} exported vs {_size(sieve_bytes)} for the sieve adapter "
        f"({_dir_bytes(out) / max(sieve_bytes, 1):.1f}x)"
    )


@app.command("export-peft")
def export_peft(
    adapter: Annotated[Path, typer.Argument(help="moe-sieve adapter directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the PEFT adapter.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Base model (default: the one named in the adapter).")
    ] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
) -> None:
    """Alias of `export --format peft`."""
    export_command(adapter, out, "peft", model, trust_remote_code, overwrite)


@app.command("eval")
def eval_command(
    data: DataOpt,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[Path | None, typer.Option(help="moe-sieve adapter directory to evaluate on the model.")] = None,
    split: Annotated[str | None, typer.Option(help="Split (default: the task's evaluation split).")] = None,
    max_examples: Annotated[int | None, typer.Option(help="Evaluate at most this many examples.")] = None,
    spider_dir: Annotated[str | None, typer.Option(help="Spider directory (tables.json, database/).")] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(help="Generation budget (default: 128; LLM-Adapters sets: 32 commonsense, 256 math)."),
    ] = None,
    keep_distinct: Annotated[
        bool, typer.Option(help="Spider: keep DISTINCT when comparing (the official default removes it).")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results JSON here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the repository's own model code.")] = False,
) -> None:
    """Accuracy on GSM8K (exact match), HellaSwag (normalised), Spider (execution, read-only SQL), the facts mini
    task or an LLM-Adapters test set (commonsense-NAME:PATH, math-NAME:PATH; greedy answer, LLM-Adapters'
    parsing); every generation task also gets the gold completion's likelihood (gold_logprob, gold_prob)."""
    from ._io import atomic_write_json, ensure_writable
    from .adapters import load_sieve_adapter
    from .evaluation import EvalConfig, evaluate
    from .evaluation.evaluate import check_eval_data
    from .modeling import ModelSpec, load_model, load_tokenizer

    if out is not None:
        ensure_writable(out, overwrite, directory=False)
    config = EvalConfig(
        data=data,
        split=split,
        max_examples=max_examples,
        spider_dir=spider_dir,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        keep_distinct=keep_distinct,
    )
    check_eval_data(data)  # a wrong --data fails before the model loads
    spec = ModelSpec(model=model, device=device, trust_remote_code=trust_remote_code)
    net, tokenizer = load_model(spec), load_tokenizer(spec)
    if adapter is not None:
        load_sieve_adapter(net, adapter)
    result = evaluate(net, tokenizer, config)
    norm = "" if result.accuracy_norm is None else f", normalised {result.accuracy_norm:.4f}"
    console.print(f"{result.task}: accuracy [bold]{result.accuracy:.4f}[/]{norm} on {result.n} examples")
    likelihood = {name: value for name, value in result.metrics.items() if name not in ("accuracy", "accuracy_norm")}
    if likelihood:
        console.print("  " + ", ".join(f"{name} {value:.4f}" for name, value in likelihood.items()))
    if out is not None:
        atomic_write_json(
            out, {"model": model, "adapter": None if adapter is None else str(adapter), **result.to_json()}
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
    from .sweep import SweepOptions

    params = {"slurm_partition": partition, "timeout_min": timeout_min, "gpus_per_node": gpus_per_node}
    return SweepOptions(
        executor=executor,
        jobs=jobs,
        cluster=cluster,
        submitit_parameters={k: v for k, v in params.items() if v is not None},
        overwrite=overwrite,
    )


@app.command()
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
    from .sweep import SweepConfig, run_sweep

    cfg = SweepConfig.from_yaml(config)
    options = _sweep_options(executor, jobs, cluster, partition, timeout_min, gpus_per_node, overwrite)
    rows = run_sweep(cfg, out or Path("runs") / cfg.name, options, log=console.print)
    if any(r["status"] != "finished" for r in rows):
        raise typer.Exit(code=1)


@app.command()
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
    from .sweep.study import run_study

    options = _sweep_options(executor, jobs, cluster, None, None, None, False)
    summary = run_study(preset, out, options, log=console.print, reference=reference)
    if summary["failed"]:
        raise typer.Exit(code=1)


def _train(preset: str | None, overwrite: bool, resume: bool, **options) -> None:
    """Profile -> select -> LoRA fine-tune on transformers' Trainer; one GPU, CPU, or under
    `accelerate launch` / `torchrun` for DDP/FSDP."""
    from .training import TrainConfig, train

    given = {key: value for key, value in options.items() if value is not None}
    if "targets" in given:
        given["targets"] = tuple(t for t in given["targets"].split(",") if t)
    if preset:
        config = TrainConfig.from_yaml(preset, **given)
    else:
        missing = [f"--{k}" for k in ("data", "out") if k not in given]
        if missing:
            _fail(f"train needs {' and '.join(missing)} (or a --preset that sets them)")
        config = TrainConfig.from_dict({"model": DEFAULT_MODEL, **given})
    try:
        result = train(config, overwrite=overwrite, resume=resume)
    except KeyboardInterrupt:
        from ._io import Interrupted
        from .training.run import continue_hint

        raise Interrupted(f"interrupted; {continue_hint(Path(config.out))}") from None
    m = result.metrics
    if result.already_finished:
        return  # train said so in one line; its metrics stay as they are
    console.print(
        f"[green]done[/]: {m['steps']} steps, final loss {m['final_loss']:.4f}, {m['trainable_params']:,} "
        f"trainable params, {m['tokens_per_s']:,.0f} tok/s, {m['wall_time_s']:.1f} s. "
        f"Adapter in {result.run_dir / 'adapter'}, metrics in {result.run_dir / 'metrics.json'}"
    )


def _register_train_command() -> None:
    """Expose every TrainConfig field as an option, with its help text, so the two never drift apart."""
    import dataclasses
    import inspect
    import typing

    from .training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    params = [
        inspect.Parameter(
            "preset",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[str | None, typer.Option(help="YAML preset (path or name in moe_sieve/presets).")],
        ),
        inspect.Parameter(
            "overwrite",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option(help="Replace the results of an earlier run in --out.")],
        ),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option(help="Continue from the last checkpoint in --out.")],
        ),
    ]
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        base = (
            str
            if typing.get_origin(hint) is tuple
            else next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        )
        if f.default is not dataclasses.MISSING:
            shown = f.default if not isinstance(f.default, tuple) else ",".join(f.default)
            shown = "none" if shown is None else str(shown)
        else:
            shown = DEFAULT_MODEL if f.name == "model" else False
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[base | None, typer.Option(help=f.metadata.get("help", ""), show_default=shown)],
            )
        )

    def train_command(**kwargs):
        preset, overwrite, resume = kwargs.pop("preset"), kwargs.pop("overwrite"), kwargs.pop("resume")
        _train(preset, overwrite, resume, **kwargs)

    train_command.__signature__ = inspect.Signature(params)
    train_command.__doc__ = _train.__doc__
    app.command("train")(train_command)


_register_train_command()


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures caused by inputs or the environment: one ``Error:`` line, never a traceback."""
    from safetensors import SafetensorError

    from ._io import ArtifactExistsError, RunLockedError
    from .adapters.io import UnsupportedExportError
    from .arch import UnsupportedModelError
    from .profiling import ProfileMismatchError

    return (
        UnsupportedExportError,  # an adapter with no exact form in the asked export format
        ArtifactExistsError,
        RunLockedError,
        UnsupportedModelError,
        ProfileMismatchError,
        OSError,  # FileNotFoundError, PermissionError, NotADirectoryError, FileExistsError ...
        ValueError,  # includes UnicodeDecodeError, json.JSONDecodeError
        ArithmeticError,  # NonFiniteLossError (the NaN-loss stop)
        SafetensorError,  # truncated or corrupt .safetensors
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """moe-sieve's own warnings are one ``Warning:`` line, like its errors; others keep Python's format."""
    from .profiling.artifact import OtherModelWarning

    if issubclass(category, OtherModelWarning):
        err_console.print("[bold yellow]Warning:[/] ", end="")
        err_console.print(" ".join(str(message).split()), markup=False, highlight=False)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main() -> None:
    """The console entry point: every expected failure ends as one ``Error:`` line and exit code 2;
    ``--debug`` (or MOE_SIEVE_DEBUG=1) shows the traceback instead."""
    warnings.showwarning = _show_warning
    try:
        app()
    except expected_errors() as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        _print_error(str(err) or type(err).__name__)
        sys.exit(2)
    except KeyboardInterrupt as err:
        _interrupted(err)
    except SystemExit as exit_:  # Typer turns Ctrl-C into exit 130 before it gets here: find it in the chain
        cause = _chained_interrupt(exit_)
        if cause is None:
            raise
        _interrupted(cause)


def _chained_interrupt(err: BaseException) -> KeyboardInterrupt | None:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _interrupted(err: KeyboardInterrupt) -> None:
    """Ctrl-C: one line saying how to continue (the command's own, else the general one), exit 130."""
    from ._io import Interrupted

    hint = str(err) if isinstance(err, Interrupted) and str(err) else None
    _print_error(hint or "interrupted; a finished result is never half-written (train --resume continues a run)")
    sys.exit(130)


if __name__ == "__main__":
    main()
