"""Mini comparison on the embedded model: Routed-PEFT S/D/R/E vs Sieve hot-25% vs attention-only LoRA.

    python benchmarks/routed_compare.py --out runs/routed_compare --seeds 0 1 --steps 200

Each condition fine-tunes ``moe-sieve-default`` on the arithmetic mini task (train split) with the same data
order, steps and batch, then scores greedy exact match on the held-out test split. Results go to
``OUT/results.json`` and a markdown table is printed.

Learning rate: each condition runs at its own entry of ``LEARNING_RATES`` (``--learning-rate`` sets one for all).
Per AdamW step at the same learning rate, S (one rank-r adapter) moves the MoE block output about 3x less than D
(four summed adapters, i.e. rank 4r), and E about 3-5x less than S: its output is scaled by the frozen router's
weights (0.19 and 0.11 on average on the embedded model: 16 experts, top-2, no renormalisation). So D tolerates
the least and E wants the most. The defaults come from ``--sweep-lr`` (train only, final train loss per
condition and learning rate):

    python benchmarks/routed_compare.py --out runs/routed_lr --sweep-lr 3e-3 5e-3 1e-2 --steps 250 --batch-size 8 \
        --seeds 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CONDITIONS = {
    "attention-only LoRA": {"method": "sieve", "strategy": "none", "targets": ("attention",)},
    "sieve hot-25%": {"method": "sieve", "strategy": "topk", "k": "25%"},
    "routed S": {"method": "routed", "variant": "S"},
    "routed D (N=4)": {"method": "routed", "variant": "D", "num_adapters": 4},
    "routed R (N=4, K=2)": {"method": "routed", "variant": "R", "num_adapters": 4, "top_k_adapters": 2},
    "routed E (all experts)": {"method": "routed", "variant": "E", "strategy": "full"},
    "routed E (hot-25%)": {"method": "routed", "variant": "E", "strategy": "topk", "k": "25%"},
}
# Per-condition learning rate (AdamW peak, 5% warmup, linear decay) at r=16, batch 8, 200-400 steps: the best of
# --sweep-lr 1e-3 3e-3 5e-3 1e-2 3e-2 on this task (seed 0, docs/study.md, "Learning rate"). Every condition
# diverges at 3e-2; D (four summed adapters) already at 1e-2; S gains at 5e-3, E (routing-weight scaled) at 1e-2.
LEARNING_RATES = {
    "attention-only LoRA": 3e-3,
    "sieve hot-25%": 3e-3,
    "routed S": 5e-3,
    "routed D (N=4)": 3e-3,
    "routed R (N=4, K=2)": 3e-3,
    "routed E (all experts)": 1e-2,
    "routed E (hot-25%)": 1e-2,
}


def _run_dir(out: Path, name: str, seed: int, args_r: int, lr: float | None = None) -> Path:
    stem = f"{name.split(' (')[0].replace(' ', '_')}{'_hot' if 'hot' in name and 'routed' in name else ''}"
    stem += "" if args_r == 16 else f"_r{args_r}"
    return out / (f"{stem}_s{seed}" if lr is None else f"lr_sweep/{stem}_lr{lr:g}_s{seed}")


def _train(name: str, seed: int, lr: float, args: argparse.Namespace, arith: str, run_dir: Path):
    """Fine-tune one condition; returns the loaded model, tokenizer and ``train``'s result."""
    from moe_sieve.demo import default_model_path
    from moe_sieve.modeling import ModelSpec, load_model, load_tokenizer
    from moe_sieve.training import TrainConfig, train

    model_path = str(default_model_path())
    spec = ModelSpec(model=model_path, device="cpu")
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    result = train(
        TrainConfig(
            model=model_path,
            data=arith,
            out=str(run_dir),
            max_steps=args.steps,
            batch_size=args.batch_size,
            micro_batch_size=args.batch_size,
            learning_rate=lr,
            r=args.r,
            alpha=2.0 * args.r,
            dropout=0.0,
            warmup=0.05,
            logging_steps=min(25, args.steps),
            save_steps=args.steps,
            device="cpu",
            seed=seed,
            max_length=256,
            profile_subsample=0.1,
            **CONDITIONS[name],
        ),
        overwrite=True,
        model=model,
        tokenizer=tokenizer,
    )
    return model, tokenizer, result


def _sweep(args: argparse.Namespace, out: Path, arith: str) -> None:
    """Train only: final train loss for every condition x learning rate (first seed), table printed."""
    path = out / "lr_sweep.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    key = ("condition", "learning_rate", "seed", "steps", "r", "batch_size")
    done = {tuple(r.get(k) for k in key) for r in rows}
    seed = args.seeds[0]
    for name in args.conditions:
        for lr in args.sweep_lr:
            if (name, lr, seed, args.steps, args.r, args.batch_size) in done:
                continue
            start = time.perf_counter()
            _, _, result = _train(name, seed, lr, args, arith, _run_dir(out, name, seed, args.r, lr))
            rows.append(
                {
                    "condition": name,
                    "learning_rate": lr,
                    "seed": seed,
                    "steps": args.steps,
                    "r": args.r,
                    "batch_size": args.batch_size,
                    "final_loss": result.metrics["final_loss"],
                    "first_loss": result.metrics["first_loss"],
                    "wall_s": round(time.perf_counter() - start, 1),
                }
            )
            path.write_text(json.dumps(rows, indent=2) + "\n")
            print(json.dumps(rows[-1]), flush=True)
    setting = f"seed {seed}, batch {args.batch_size}, r={args.r}, alpha={2 * args.r}"
    print(f"final train loss after {args.steps} steps ({setting}):")
    print("| condition | " + " | ".join(f"lr {lr:g}" for lr in args.sweep_lr) + " |")
    print("| --- |" + " --- |" * len(args.sweep_lr))
    for name in args.conditions:
        cells = []
        for lr in args.sweep_lr:
            want = (name, lr, seed, args.steps, args.r, args.batch_size)
            hit = [r for r in rows if tuple(r.get(k) for k in key) == want]
            cells.append(f"{hit[-1]['final_loss']:.3f}" if hit else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


def _init_check(args: argparse.Namespace, arith: str) -> None:
    """init="zero" (PEFT) vs "perft" (released code) for S and E: a plain AdamW loop, 5% warmup + linear decay,
    mean loss of the last 25 steps (TrainConfig has no init option, so this bypasses ``train``)."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from moe_sieve.adapters.routed import RoutedAdapterConfig, apply_routed_adapters
    from moe_sieve.data.sft import SFTCollator, build_sft_dataset, load_sft_examples
    from moe_sieve.demo import default_model_path
    from moe_sieve.modeling import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec(model=str(default_model_path()), device="cpu")
    tokenizer = load_tokenizer(spec)
    examples = load_sft_examples(arith, split="train", seed=args.seeds[0], tokenizer=tokenizer)
    dataset, _ = build_sft_dataset(examples, tokenizer, 256, overflow="truncate")
    collate = SFTCollator(tokenizer)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seeds[0])).tolist()
    print("| variant | init | " + " | ".join(f"lr {lr:g}" for lr in args.sweep_lr) + " |")
    print("| --- | --- |" + " --- |" * len(args.sweep_lr))
    for variant in ("S", "E"):
        for init in ("zero", "perft"):
            cells = []
            for lr in args.sweep_lr:
                model = load_model(spec)
                cfg = RoutedAdapterConfig(variant=variant, r=args.r, alpha=2.0 * args.r, dropout=0.0, init=init)
                apply_routed_adapters(model, None, cfg)
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
                schedule = get_linear_schedule_with_warmup(opt, max(1, args.steps // 20), args.steps)
                model.train()
                losses = []
                for step in range(args.steps):
                    rows = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
                    loss = model(**collate([dataset[i] for i in rows])).loss
                    loss.backward()
                    opt.step()
                    schedule.step()
                    opt.zero_grad()
                    losses.append(loss.item())
                cells.append(f"{statistics.mean(losses[-25:]):.3f}")
            print(f"| {variant} | {init} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/routed_compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--conditions", nargs="*", default=list(CONDITIONS))
    parser.add_argument("--r", type=int, default=16, help="rank (bottleneck width) of every condition; alpha = 2r")
    parser.add_argument(
        "--learning-rate", type=float, default=None, help="one learning rate for all (default: LEARNING_RATES)"
    )
    parser.add_argument(
        "--sweep-lr", type=float, nargs="+", default=None, help="train only: final loss per condition x these lrs"
    )
    parser.add_argument(
        "--init-check", action="store_true", help="with --sweep-lr: S and E with init zero vs perft (no Trainer)"
    )
    args = parser.parse_args()
    if args.init_check and not args.sweep_lr:
        parser.error("--init-check needs --sweep-lr LR [LR ...]")
    unknown = [name for name in args.conditions if name not in CONDITIONS]
    if unknown:
        parser.error(f"--conditions: unknown {unknown}; known: {list(CONDITIONS)}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from moe_sieve.evaluation import evaluate
    from moe_sieve.minitasks.generate import generate_minitasks

    out = Path(args.out)
    tasks = out / "minitasks"
    if not (tasks / "arith").exists():
        generate_minitasks(tasks, seed=0, sizes={"corpus_train_docs": 40})
    arith = f"gsm8k:{tasks / 'arith'}"
    if args.init_check:
        _init_check(args, arith)
        return
    if args.sweep_lr:
        _sweep(args, out, arith)
        return
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["condition"], r["seed"]) for r in results}
    for seed in args.seeds:
        for name in args.conditions:
            if (name, seed) in done:
                continue
            lr = args.learning_rate or LEARNING_RATES[name]
            start = time.perf_counter()
            model, tokenizer, result = _train(name, seed, lr, args, arith, _run_dir(out, name, seed, args.r))
            model.eval()
            score = evaluate(
                model, tokenizer, arith, split="test", max_examples=args.eval_examples, batch_size=25, max_new_tokens=40
            )
            results.append(
                {
                    "condition": name,
                    "seed": seed,
                    "learning_rate": lr,
                    "exact_match": score.accuracy,
                    "n": score.n,
                    "trainable_params": result.metrics["trainable_params"],
                    "final_loss": result.metrics["final_loss"],
                    "wall_s": round(time.perf_counter() - start, 1),
                }
            )
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(results[-1]), flush=True)
    print("| condition | lr | trainable params | exact match (per seed) | mean EM | mean final train loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.conditions:
        rows = sorted((r for r in results if r["condition"] == name), key=lambda r: r["seed"])
        if rows:
            ems = [r["exact_match"] for r in rows]
            loss = statistics.mean(r["final_loss"] for r in rows)
            lrs = sorted({r.get("learning_rate", 3e-3) for r in rows})
            print(
                f"| {name} | {', '.join(f'{x:g}' for x in lrs)} | {rows[0]['trainable_params']:,} | "
                f"{', '.join(f'{e:.2f}' for e in ems)} | {statistics.mean(ems):.3f} | {loss:.3f} |"
            )


if __name__ == "__main__":
    main()
