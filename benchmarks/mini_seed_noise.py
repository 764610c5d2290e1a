"""Seed-to-seed noise of held-out accuracy on the arithmetic mini task, used to size the mini study.

    python benchmarks/mini_seed_noise.py OUT '[{"strategy": "topk", "lr": 3e-3, "steps": 300, "seed": 0}, ...]'

Each entry trains one run in this process (demo settings: r=16, batch 16, the arithmetic profile's selection)
and scores `n` (default 500) held-out problems; one JSON line per run. Finished entries are skipped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from moe_sieve.evaluation import evaluate
from moe_sieve.minitasks.generate import generate_minitasks
from moe_sieve.modeling import ModelSpec, default_model_path, load_model, load_tokenizer
from moe_sieve.profiling import ProfileConfig, run_profile
from moe_sieve.training import TrainConfig, train


def main() -> None:
    torch.set_num_threads(1)
    root, grid = Path(sys.argv[1]), json.loads(sys.argv[2])
    tasks = root / "minitasks"
    if not (tasks / "manifest.json").exists():
        generate_minitasks(tasks, seed=0, sizes={"corpus_train_docs": 40, "arith_test": 1000})
    arith = f"gsm8k:{tasks / 'arith'}"
    model_path = str(default_model_path())
    if not (root / "profile").exists():
        config = ProfileConfig(model=model_path, data=arith, split="train", max_examples=200, device="cpu")
        run_profile(config, progress=False).save(root / "profile")
    for g in grid:
        name = f"{g['strategy']}-lr{g['lr']}-s{g['steps']}-seed{g['seed']}"
        if (root / name / "eval.json").exists():
            continue
        started = time.perf_counter()
        spec = ModelSpec(model=model_path, device="cpu")
        model, tokenizer = load_model(spec), load_tokenizer(spec)
        config = TrainConfig(
            model=model_path,
            data=arith,
            out=str(root / name),
            profile=str(root / "profile"),
            strategy=g["strategy"],
            max_steps=g["steps"],
            batch_size=16,
            micro_batch_size=16,
            learning_rate=g["lr"],
            r=16,
            alpha=32.0,
            dropout=0.0,
            warmup=0.05,
            logging_steps=25,
            save_steps=10_000,
            device="cpu",
            seed=g["seed"],
            max_length=256,
        )
        result = train(config, overwrite=True, model=model, tokenizer=tokenizer)
        trained = time.perf_counter()
        ev = evaluate(
            model, tokenizer, arith, split="test", max_examples=g.get("n", 500), batch_size=50, max_new_tokens=40
        )
        record = {
            "name": name,
            **g,
            "acc": ev.accuracy,
            "n": ev.n,
            "train_s": round(trained - started, 1),
            "eval_s": round(time.perf_counter() - trained, 1),
            "final_loss": result.metrics["final_loss"],
        }
        (root / name / "eval.json").write_text(json.dumps(record))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
