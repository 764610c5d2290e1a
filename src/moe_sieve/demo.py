"""``moe-sieve demo``: the whole recipe on the embedded pretrained MoE and the arithmetic mini task.

profile -> stats -> select hot-25% -> LoRA fine-tune -> held-out exact match before and after, in a few
minutes on a laptop CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

# Re-exported for compatibility: the default-model knowledge lives with the model loading code.
from .modeling import DEFAULT_MODEL_ALIAS, default_model_path

__all__ = ["DEFAULT_MODEL_ALIAS", "DemoConfig", "default_model_path", "run_demo"]


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seed: int = 0
    profile_examples: int = 200
    eval_examples: int = 100
    train_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    r: int = 16
    alpha: float = 32.0
    max_new_tokens: int = 40

    def __post_init__(self) -> None:  # before the minutes of profiling, not after them
        for option, value in (("--train-steps", self.train_steps), ("--eval-examples", self.eval_examples)):
            if value < 1:
                raise ValueError(f"demo {option} must be >= 1, got {value}")


def run_demo(config: DemoConfig, *, overwrite: bool = False, console: Console | None = None) -> dict[str, Any]:
    from .cputhreads import apply_cpu_threads, choose_cpu_threads
    from .evaluation import evaluate
    from .minitasks.generate import generate_minitasks
    from .modeling import ModelSpec, load_model, load_tokenizer
    from .profiling import ProfileConfig, run_profile
    from .routing_stats import routing_stats
    from .selection import make_selection, selection_table
    from .sweep.pipeline import train_and_evaluate
    from .tables import stats_table
    from .training import TrainConfig

    console = console or Console()
    threads = choose_cpu_threads()
    apply_cpu_threads(threads)
    console.print(threads.line("demo"))
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already holds results; pass --overwrite or choose another --out")
    started = time.perf_counter()
    model_path = str(default_model_path())
    console.rule("[bold]0. mini tasks")
    generate_minitasks(out / "minitasks", seed=config.seed, sizes={"corpus_train_docs": 40})
    arith = f"gsm8k:{out / 'minitasks' / 'arith'}"

    console.rule("[bold]1. profile (arithmetic, train split)")
    profile = run_profile(
        ProfileConfig(
            model=model_path,
            data=arith,
            split="train",
            max_examples=config.profile_examples,
            batch_size=32,
            device="cpu",
            seed=config.seed,
        )
    )
    profile.save(out / "profile", overwrite=True)

    console.rule("[bold]2. routing statistics")
    report = routing_stats(profile.counts_LE, profile.mass_LE, layer_ids=profile.layer_ids).to_json()
    console.print(stats_table(report))

    console.rule("[bold]3. select hot-25%")
    selection = make_selection(
        profile.counts_LE,
        profile.mass_LE,
        layer_ids=profile.layer_ids,
        top_k=profile.top_k,
        source={"profile": str(out / "profile"), "profile_fingerprint": profile.fingerprint},
    )
    selection.save(out / "selection.json", overwrite=True)
    console.print(selection_table(selection, profile.counts_LE))

    spec = ModelSpec(model=model_path, device="cpu")
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    eval_settings = {
        "data": arith,
        "split": "test",
        "max_examples": config.eval_examples,
        "batch_size": 25,
        "max_new_tokens": config.max_new_tokens,
    }

    console.rule("[bold]4. held-out accuracy before fine-tuning")
    before = evaluate(  # the base model: adapters are attached only by the training below
        model,
        tokenizer,
        arith,
        split="test",
        max_examples=config.eval_examples,
        batch_size=25,
        max_new_tokens=config.max_new_tokens,
    )
    console.print(f"base model exact match: {before.accuracy:.3f} ({before.correct}/{before.n})")

    console.rule("[bold]5. LoRA fine-tune, hot-25% experts, then 6. held-out accuracy after")
    # the same train -> evaluate pipeline every sweep and study run goes through
    result, after = train_and_evaluate(
        TrainConfig(
            model=model_path,
            data=arith,
            out=str(out / "train"),
            selection=str(out / "selection.json"),
            max_steps=config.train_steps,
            batch_size=config.batch_size,
            micro_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            r=config.r,
            alpha=config.alpha,
            dropout=0.0,
            warmup=0.05,
            logging_steps=25,
            save_steps=config.train_steps,
            device="cpu",
            seed=config.seed,
            max_length=256,
        ),
        eval_settings,
        overwrite=True,
        model=model,
        tokenizer=tokenizer,
        progress=True,
    )
    console.print(f"fine-tuned exact match: {after.accuracy:.3f} ({after.correct}/{after.n})")

    from .adapters import SieveLoraConfig, plan_adapters

    plan = plan_adapters(model_path, k="25%", lora=SieveLoraConfig(r=config.r, alpha=config.alpha))
    summary = {
        "model": DEFAULT_MODEL_ALIAS,
        "routing": {
            "mean_layer_cv": report["mean_layer_cv"],
            "global_cv": report["global_cv"],
            "ratio": report["ratio"],
            "mean_cold_fraction": report["mean_cold_fraction"],
            "mean_coverage_at_25pct": report["mean_coverage"],
        },
        "trainable_params": {"hot_25pct": plan["sieve_params"], "full": plan["full_params"]},
        "accuracy": {"before": before.accuracy, "after": after.accuracy, "n": after.n},
        "train": {k: result.metrics[k] for k in ("steps", "final_loss", "tokens_per_s", "wall_time_s")},
        "wall_time_s": round(time.perf_counter() - started, 1),
        "outputs": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    console.rule("[bold]summary")
    ratio = report["ratio"]
    console.print(
        f"routing skew: mean layer CV {report['mean_layer_cv']:.2f} vs global CV {report['global_cv']:.2f} "
        f"({'n/a' if ratio is None else f'{ratio:.1f}x'}), {100 * report['mean_cold_fraction']:.0f}% cold experts, "
        f"top-25% covers {100 * report['mean_coverage']:.0f}% of activations\n"
        f"trainable LoRA params: hot-25% {plan['sieve_params']:,} vs all experts {plan['full_params']:,} "
        f"({100 * plan['reduction']:.0f}% fewer)\n"
        f"held-out arithmetic exact match: {before.accuracy:.3f} -> [bold]{after.accuracy:.3f}[/] "
        f"({after.n} problems)\n"
        f"outputs in {out}/ (profile/, selection.json, train/adapter, train/metrics.json, summary.json); "
        f"{summary['wall_time_s']:.0f} s in all"
    )
    return summary
