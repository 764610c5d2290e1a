"""Measured routing-drift runs on the embedded model (docs/training.md "Routing drift during training").

Trains the demo's hot-25% recipe on the arithmetic mini task three times: router LoRA (the paper) with the
drift monitor, router frozen with the monitor, and router LoRA with the monitor off (for its overhead);
then plots coverage / Jaccard / KL drift and prints a summary.

    PYTHONPATH=src python scripts/drift_runs.py --out runs/drift --steps 40 --every 5 --batch 8 --lr 5e-3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from moe_sieve.demo import default_model_path
from moe_sieve.minitasks.generate import generate_minitasks
from moe_sieve.training import TrainConfig, train
from moe_sieve.training.monitor import plot_drift


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/drift")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--overhead", action="store_true", help="also train with the monitor off")
    parser.add_argument("--figure", default="docs/routing_drift.png")
    args = parser.parse_args()
    out = Path(args.out)
    generate_minitasks(out / "minitasks", seed=0, sizes={"corpus_train_docs": 40})
    data = f"gsm8k:{out / 'minitasks' / 'arith'}"
    runs = {"router LoRA": ("lora", args.every), "router frozen": ("freeze", args.every)}
    if args.overhead:
        runs["monitor off"] = ("lora", 0)
    summary = {}
    for label, (router, every) in runs.items():
        name = label.replace(" ", "-")
        start = time.perf_counter()
        result = train(
            TrainConfig(
                model=str(default_model_path()),
                data=data,
                out=str(out / name),
                max_steps=args.steps,
                batch_size=args.batch,
                micro_batch_size=args.batch,
                learning_rate=args.lr,
                r=16,
                alpha=32.0,
                dropout=0.0,
                warmup=0.05,
                logging_steps=25,
                save_steps=args.steps,
                device="cpu",
                max_length=256,
                router=router,
                monitor_every=every,
            ),
            overwrite=True,
        )
        m = result.metrics
        summary[label] = {
            "wall_s": round(time.perf_counter() - start, 1),
            "train_runtime_s": m["train_runtime_s"],
            "final_loss": m["final_loss"],
            "routing_drift": {k: v for k, v in m.get("routing_drift", {}).items() if k in ("final", "monitor_seconds")},
        }
    plot_drift({label: out / label.replace(" ", "-") for label in ("router LoRA", "router frozen")}, args.figure)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
