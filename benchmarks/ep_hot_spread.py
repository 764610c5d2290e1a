"""How unevenly the hot set lands on EP ranks under transformers' contiguous expert placement, measured.

Profiles (moe_sieve's profiler, real forward passes) on the project's own docs text:
- 16-layer seeded OLMoE and Qwen3-MoE fixtures with 64 experts, top-8, built like tests/conftest.py
  ``build_tiny`` (random weights, router rows drawn N(0, 1) so routing has real spread), byte tokenizer;
- the embedded ``moe-sieve-default`` model (4 layers, 16 experts, top-2, *trained* routers).
Then, for k = 25% and each ep size, the hot experts per rank per layer and the routed-row share per rank,
under the engine's placement and under round-robin by hotness (``moe_sieve.adapters.ep``).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/ep_hot_spread.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from moe_sieve.adapters.ep import hot_spread, spread_owner_LE
from moe_sieve.data.tasks import Example
from moe_sieve.profiling.profiler import profile_examples
from moe_sieve.routing_stats import resolve_k

ROOT = Path(__file__).resolve().parents[1]


def docs_text(chunk: int = 400, limit: int = 48) -> list[Example]:
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"])
    return [
        Example(prompt="", completion=text[i : i + chunk], source=f"docs:{i // chunk}")
        for i in range(0, chunk * limit, chunk)
    ]


def fixture(family: str, layers: int = 16, experts: int = 64, top_k: int = 8, seed: int = 0):
    import transformers as tf

    from moe_sieve.tiny import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_experts=experts,
        num_experts_per_tok=top_k,
    )
    if family == "olmoe":
        config = tf.OlmoeConfig(**common, intermediate_size=32)
    else:
        config = tf.Qwen3MoeConfig(**common, intermediate_size=96, moe_intermediate_size=32)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 1.0)
    return model.eval(), tokenizer


def default_model():
    from moe_sieve.modeling import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec(model="moe-sieve-default", device="cpu", dtype="float32")
    return load_model(spec).eval(), load_tokenizer(spec)


def summarise(counts_LE: np.ndarray, k_spec: str, ep_sizes: list[int]) -> list[dict]:
    num_experts = counts_LE.shape[1]
    k = resolve_k(k_spec, num_experts)
    rows = []
    for ep in ep_sizes:
        engine = hot_spread(counts_LE, k, ep)
        spread = hot_spread(counts_LE, k, ep, spread_owner_LE(counts_LE, ep))
        rows.append(
            {
                "ep": ep,
                "k": k,
                "even_hot": k / ep,
                "engine_max_hot": engine["max_hot"],
                "engine_mean_max_hot": round(engine["mean_max_hot"], 2),
                "engine_hot_total_R": engine["hot_total_R"].tolist(),
                "engine_max_rows": round(engine["max_rows"], 3),
                "engine_mean_max_rows": round(engine["mean_max_rows"], 3),
                "rr_max_hot": spread["max_hot"],
                "rr_max_rows": round(spread["max_rows"], 3),
                "rr_mean_max_rows": round(spread["mean_max_rows"], 3),
                "even_rows": round(1 / ep, 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    examples = docs_text()
    results = {}
    for name, build, eps in (
        ("olmoe-16L-64E-top8", lambda: fixture("olmoe"), [2, 4, 8]),
        ("qwen3_moe-16L-64E-top8", lambda: fixture("qwen3_moe"), [2, 4, 8]),
        ("moe-sieve-default-4L-16E-top2 (trained)", default_model, [2, 4, 8]),
    ):
        model, tokenizer = build()
        profile = profile_examples(model, tokenizer, examples, batch_size=8, max_length=256, progress=False)
        results[name] = {"tokens": profile.tokens, "rows": summarise(profile.counts_LE, "25%", eps)}
        print(
            f"== {name}: {profile.tokens} tokens, {profile.counts_LE.shape[0]} layers x {profile.num_experts} experts"
        )
        for row in results[name]["rows"]:
            engine = f"max {row['engine_max_hot']}, mean-of-layer-max {row['engine_mean_max_hot']}, "
            engine += f"totals {row['engine_hot_total_R']}, max row share {row['engine_max_rows']} "
            engine += f"(mean {row['engine_mean_max_rows']}, even {row['even_rows']})"
            spread = f"max {row['rr_max_hot']}, max row share {row['rr_max_rows']} (mean {row['rr_mean_max_rows']})"
            print(
                f"  ep={row['ep']} k={row['k']} even={row['even_hot']:g} hot/rank | engine: {engine} | round-robin: "
                + spread
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
