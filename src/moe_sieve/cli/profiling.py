"""Commands over profiles: ``profile``, ``stats``, ``compare`` and ``select``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..selection import strategy_help
from ..tables import stats_table
from .common import DEFAULT_MODEL, DataOpt, JsonOpt, KOpt, ModelOpt, console, fail


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
    from .._io import ensure_writable
    from ..profiling import ProfileConfig, run_profile

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
        from ..profiling.profile_set import run_profile_set

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


def stats(
    profile_dir: Annotated[Path, typer.Argument(help="Profile directory written by `moe-sieve profile`.")],
    k: KOpt = "25%",
    as_json: JsonOpt = False,
    stability_fraction: Annotated[
        float, typer.Option(help="Subsample share for the stability estimate (paper: 0.1).")
    ] = 0.1,
    stability_trials: Annotated[int, typer.Option(help="Subsample trials (0 to skip).")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of the subsample trials.")] = 0,
) -> None:
    """Routing skew of a profile: per-layer CV, cold experts, coverage, entropy; global CV and ratio. On a
    profile set (`profile --data a,b,c`): per-dataset rows, the cross-dataset Jaccard matrix and Table 2."""
    from ..profiling import Profile
    from ..profiling.profile_set import is_profile_set, profile_stats
    from ..routing_stats import check_k, check_trials

    check_k(k)
    check_trials(stability_trials)
    if is_profile_set(profile_dir):
        _set_stats(profile_dir, k, as_json, stability_fraction, stability_trials, seed)
        return

    report = profile_stats(Profile.load(profile_dir), k, stability_fraction, stability_trials, seed, path=profile_dir)
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
    from ..profiling.profile_set import load_profile_set, set_stats
    from ..tables import jaccard_table, set_summary_table

    report = set_stats(load_profile_set(path), k, fraction, trials, seed)
    report["path"] = str(path)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(set_summary_table(report))
    for block in report["jaccard"]:
        console.print(jaccard_table(block))


def _experts_of(path: Path, k: str, rank_by: str) -> tuple[str, dict[int, list[int]]]:
    """A selection file as is, or a profile directory's uniform top-k."""
    from ..profiling import Profile
    from ..routing_stats import resolve_k
    from ..selection import Selection, select_topk

    if path.is_file():
        return path.stem, Selection.load(path).experts
    prof = Profile.load(path)
    scores = prof.mass_LE if rank_by == "mass" else prof.counts_LE
    return path.name, select_topk(scores, resolve_k(k, prof.num_experts), layer_ids=prof.layer_ids)


def compare(
    paths: Annotated[list[Path], typer.Argument(help="Two or more profile directories or selection files.")],
    k: KOpt = "25%",
    rank_by: Annotated[str, typer.Option(help="Rank profiles by count or mass.")] = "count",
    as_json: JsonOpt = False,
) -> None:
    """Mean per-layer Jaccard overlap between the top-k expert sets of several profiles (e.g. tasks)."""
    from ..routing_stats import selection_jaccard

    if rank_by not in ("count", "mass"):
        fail(f"--rank-by must be count or mass, got {rank_by!r}")
    if len(paths) < 2:
        fail("compare needs at least two profiles or selections")
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
    from .._io import ensure_writable
    from ..profiling import Profile
    from ..selection import make_selection, selection_table

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
