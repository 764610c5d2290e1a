"""Wall-clock per epoch of `moe-sieve train`, hot-25% against LoRA on all experts (paper Table 4, "time").

    python benchmarks/train_epoch.py --preset olmoe-1b-7b --examples 512      # GPU, bf16, random weights
    python benchmarks/train_epoch.py --preset tiny --device cpu --examples 16 # smoke run (numbers mean nothing)

Both conditions run the whole `train` recipe (profile pass for the selection, Trainer, AdamW, checkpoint-free)
for one epoch over the same GSM8K-shaped synthetic rows (benchmarks/packing_throughput.py), on copies of the
same seeded random-weight model, one after the other in this process. Reported per condition: the Trainer's
train runtime for the epoch, tokens/s, peak memory (CUDA) and trainable parameters; then full / hot-25%.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch
from _shapes import PRESETS, build_olmoe
from packing_throughput import gsm8k_shaped_rows

from moe_sieve.tiny import byte_level_tokenizer
from moe_sieve.training import TrainConfig, train

CONDITIONS = {"hot-25%": {"strategy": "topk", "k": "25%"}, "full": {"strategy": "full"}}


def run_condition(args, base, tokenizer, data: Path, out: Path, options: dict) -> dict:
    config = TrainConfig(
        model=f"random-olmoe-{args.preset}",
        data=str(data),
        out=str(out),
        profile_subsample=0.1,
        r=32,
        alpha=64,
        dropout=0.0,
        epochs=1.0,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        max_length=1024,
        warmup=0.03,
        logging_steps=10,
        save_steps=10**6,
        monitor_every=0,
        packing=args.packing,
        device=args.device,
        seed=0,
        **options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, model=copy.deepcopy(base), tokenizer=tokenizer, overwrite=True)
    m = result.metrics
    return {
        "epoch_s": m["train_runtime_s"],
        "tokens_per_s": m["tokens_per_s"],
        "steps": m["steps"],
        "peak_gib": m["peak_memory_bytes"] / 2**30 if m["peak_memory_kind"] == "cuda_max_allocated" else None,
        "trainable": m["trainable_params"],
        "final_loss": m["final_loss"],
    }


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_olmoe(args.preset, 1024).to(device=device, dtype=dtype)
    tokenizer = byte_level_tokenizer()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gsm8k_shaped.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_shaped_rows(args.examples, 0)))
        for name, options in CONDITIONS.items():
            results[name] = run_condition(args, base, tokenizer, data, Path(tmp) / name, options)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"\nmachine: {machine} ({platform.machine()}); torch {torch.__version__}; preset {args.preset}, {dtype}")
    print(f"{args.examples} GSM8K-shaped examples, batch {args.batch_size}, packing {args.packing}, one epoch\n")
    print("| condition | trainable | steps | epoch s | tokens/s | peak GiB | final loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        peak = "n/a (CPU)" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(
            f"| {name} | {r['trainable']:,} | {r['steps']} | {r['epoch_s']:.1f} | {r['tokens_per_s']:.0f} | {peak} "
            f"| {r['final_loss']:.4f} |"
        )
    ratio = results["full"]["epoch_s"] / results["hot-25%"]["epoch_s"]
    print(f"\nwall-clock per epoch, full / hot-25%: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "full_over_hot": ratio}, indent=2))
    return results


if __name__ == "__main__":
    main()
