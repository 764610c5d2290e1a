"""Mini comparison on the embedded model: Routed-PEFT S/D/R/E vs Sieve hot-25% vs attention-only LoRA.

    python benchmarks/routed_compare.py --out runs/routed_compare --seeds 0 1 --steps 200

Each condition fine-tunes ``moe-sieve-default`` on the arithmetic mini task (train split) with the same data
order, steps, batch and learning rate, then scores greedy exact match on the held-out test split. Results go to
``OUT/results.json`` and a markdown table is printed.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/routed_compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--conditions", nargs="*", default=list(CONDITIONS))
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from moe_sieve.demo import default_model_path
    from moe_sieve.evaluation import evaluate
    from moe_sieve.minitasks.generate import generate_minitasks
    from moe_sieve.modeling import ModelSpec, load_model, load_tokenizer
    from moe_sieve.training import TrainConfig, train

    out = Path(args.out)
    tasks = out / "minitasks"
    if not (tasks / "arith").exists():
        generate_minitasks(tasks, seed=0, sizes={"corpus_train_docs": 40})
    arith = f"gsm8k:{tasks / 'arith'}"
    model_path = str(default_model_path())
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["condition"], r["seed"]) for r in results}
    for seed in args.seeds:
        for name in args.conditions:
            if (name, seed) in done:
                continue
            spec = ModelSpec(model=model_path, device="cpu")
            model, tokenizer = load_model(spec), load_tokenizer(spec)
            start = time.perf_counter()
            options = dict(CONDITIONS[name])
            result = train(
                TrainConfig(
                    model=model_path,
                    data=arith,
                    out=str(
                        out / f"{name.split(' (')[0].replace(' ', '_')}"
                        f"{'_hot' if 'hot' in name and 'routed' in name else ''}_s{seed}"
                    ),
                    max_steps=args.steps,
                    batch_size=args.batch_size,
                    micro_batch_size=args.batch_size,
                    learning_rate=3e-3,
                    r=16,
                    alpha=32.0,
                    dropout=0.0,
                    warmup=0.05,
                    logging_steps=25,
                    save_steps=args.steps,
                    device="cpu",
                    seed=seed,
                    max_length=256,
                    profile_subsample=0.1,
                    **options,
                ),
                overwrite=True,
                model=model,
                tokenizer=tokenizer,
            )
            model.eval()
            score = evaluate(
                model, tokenizer, arith, split="test", max_examples=args.eval_examples, batch_size=25, max_new_tokens=40
            )
            results.append(
                {
                    "condition": name,
                    "seed": seed,
                    "exact_match": score.accuracy,
                    "n": score.n,
                    "trainable_params": result.metrics["trainable_params"],
                    "final_loss": result.metrics["final_loss"],
                    "wall_s": round(time.perf_counter() - start, 1),
                }
            )
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(results[-1]), flush=True)
    print("| condition | trainable params | exact match (per seed) | mean EM | mean final train loss |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.conditions:
        rows = sorted((r for r in results if r["condition"] == name), key=lambda r: r["seed"])
        if rows:
            ems = [r["exact_match"] for r in rows]
            loss = statistics.mean(r["final_loss"] for r in rows)
            print(
                f"| {name} | {rows[0]['trainable_params']:,} | {', '.join(f'{e:.2f}' for e in ems)} | "
                f"{statistics.mean(ems):.3f} | {loss:.3f} |"
            )


if __name__ == "__main__":
    main()
