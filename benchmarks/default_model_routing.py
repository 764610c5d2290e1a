"""Routing skew of the embedded default model on each mini task (the table in docs/recipe.md).

python benchmarks/default_model_routing.py [--examples 200]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from moe_sieve.minitasks.generate import generate_minitasks
from moe_sieve.profiling import ProfileConfig, run_profile
from moe_sieve.routing_stats import routing_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp()) / "minitasks"
    generate_minitasks(root, seed=0, sizes={"corpus_train_docs": 40})
    tasks = {
        "arithmetic": f"gsm8k:{root / 'arith'}",
        "sql": f"spider:{root / 'spider'}",
        "endings": f"hellaswag:{root / 'hellaswag'}",
    }
    print("| mini task | layer CV | global CV | ratio | cold % | coverage@25% |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, data in tasks.items():
        profile = run_profile(
            ProfileConfig(
                model="moe-sieve-default",
                data=data,
                split="train",
                max_examples=args.examples,
                device="cpu",
                batch_size=32,
            ),
            progress=False,
        )
        r = routing_stats(profile.counts_LE, profile.mass_LE, layer_ids=profile.layer_ids).to_json()
        print(
            f"| {name} | {r['mean_layer_cv']:.3f} | {r['global_cv']:.3f} | {r['ratio']:.2f}x | "
            f"{100 * r['mean_cold_fraction']:.1f} | {100 * r['mean_coverage']:.1f}% |"
        )


if __name__ == "__main__":
    main()
