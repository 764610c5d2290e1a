"""`moe-sieve train` tokens/s with padding-free packed micro-batches against right-padded ones, side by side.

    python benchmarks/packing_throughput.py                                  # small OLMoE shape, CPU
    python benchmarks/packing_throughput.py --preset olmoe-1b-7b --steps 30 --repeats 2 \
        --attn sdpa --fused-ce auto                                          # GPU (bf16)

Data: synthetic prompt/completion rows whose token lengths follow a GSM8K-like distribution (the byte-level
tokenizer makes one token per character): prompt ~ lognormal with median 62 tokens, completion ~ lognormal
with median 110 tokens (sigma 0.35 and 0.45, clipped to [16, 400]); these parameters are an approximation of
GSM8K's question/answer lengths under a LLaMA-style BPE tokenizer, not measured from the dataset here.
Both conditions run the full `train` recipe on the same random-weight OLMoE, the same selection (hot 25%),
the same examples in the same micro-batches; the only difference is `--packing`. tokens/s counts real
(non-padding) tokens in both, so it measures useful throughput. The padding fraction is measured on the
padded run's actual batches (padded positions / all positions computed).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _shapes import PRESETS, build_olmoe
from transformers import TrainerCallback

from moe_sieve.data import sft
from moe_sieve.tiny import byte_level_tokenizer
from moe_sieve.training import TrainConfig, train


def gsm8k_shaped_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(np.log(62), 0.35, n), 16, 400).astype(int)
    completion = np.clip(rng.lognormal(np.log(110), 0.45, n), 16, 400).astype(int)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789 "))
    return [
        {"prompt": "".join(rng.choice(letters, p)), "completion": "".join(rng.choice(letters, c))}
        for p, c in zip(prompt, completion, strict=True)
    ]


class PaddingMeter:
    """Counts real and computed positions of every padded micro-batch SFTCollator builds."""

    def __init__(self) -> None:
        self.real = self.total = 0
        self._call = sft.SFTCollator.__call__

    def __enter__(self):
        meter, call = self, self._call

        def counted(collator, features):
            batch = call(collator, features)
            meter.real += int(batch["attention_mask"].sum())
            meter.total += batch["attention_mask"].numel()
            return batch

        sft.SFTCollator.__call__ = counted
        return self

    def __exit__(self, *exc):
        sft.SFTCollator.__call__ = self._call

    @property
    def fraction(self) -> float:
        return 1 - self.real / self.total if self.total else 0.0


class StepTimer(TrainerCallback):
    """Wall time (step end to step end, so batch collation counts) and real tokens of every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []
        self._last = (0.0, 0)

    def _now(self, state) -> tuple[float, int]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter(), state.num_input_tokens_seen

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._now(state)

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now(state)
        self.steps.append((now[0] - self._last[0], now[1] - self._last[1]))
        self._last = now


def run(args, base, tokenizer, data: Path, out: Path, packing: bool, selection: str | None) -> dict:
    config = TrainConfig(
        model=f"random-olmoe-{args.preset}",
        data=str(data),
        out=str(out),
        strategy="topk",
        k="25%",
        selection=selection,
        profile_subsample=0.05,
        r=32,
        alpha=64,
        dropout=0.0,
        max_steps=args.steps,
        batch_size=args.micro_batch_size,
        micro_batch_size=args.micro_batch_size,
        max_length=1024,
        warmup=0,
        logging_steps=max(1, args.steps),
        save_steps=10**6,
        monitor_every=0,
        packing=packing,
        fused_ce=args.fused_ce,
        device=args.device,
        seed=0,
    )
    model = copy.deepcopy(base)
    timer = StepTimer()
    with PaddingMeter() as meter, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config, model=model, tokenizer=tokenizer, overwrite=True, callbacks=[timer])
    metrics = result.metrics
    timed = timer.steps[args.warmup_steps :]
    return {
        "tokens_per_s": sum(n for _, n in timed) / sum(t for t, _ in timed),
        "step_s": statistics.median(t for t, _ in timed),
        "tokens": metrics["tokens_seen"],
        "wall_s": metrics["wall_time_s"],  # whole train() loop, warm-up steps included
        "peak_memory_gib": metrics["peak_memory_bytes"] / 2**30,
        "memory_kind": metrics["peak_memory_kind"],
        "padding_fraction": None if packing else meter.fraction,
        "final_loss": metrics["final_loss"],
        "selection": str(out / "selection.json"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="alternate padded/packed this many times")
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--fused-ce", default="off", choices=("auto", "off", "liger", "cce"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps of each run left out of tokens/s")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.steps <= args.warmup_steps:
        parser.error("--steps must exceed --warmup-steps")
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_olmoe(args.preset, 1024).to(device=device, dtype=dtype)
    base.set_attn_implementation(args.attn)
    tokenizer = byte_level_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "gsm8k_shaped.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_shaped_rows(args.examples, 0)))
        results: dict[bool, list[dict]] = {False: [], True: []}
        selection = None
        for i in range(args.repeats):
            for packing in (False, True):
                row = run(args, base, tokenizer, data, Path(tmp) / f"run-{i}-{int(packing)}", packing, selection)
                selection = selection or row["selection"]
                results[packing].append(row)
                print(f"  run {i} packing={packing}: {row['tokens_per_s']:.1f} tokens/s", file=sys.stderr)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmachine: {machine} ({platform.machine()}), load average {load:.1f}; torch {torch.__version__}")
    print(
        f"preset {args.preset} ({dtype}, attn {args.attn}, fused-ce {args.fused_ce}, {torch.get_num_threads()} "
        f"threads), {args.examples} GSM8K-shaped examples, {args.steps} steps x micro-batch {args.micro_batch_size} "
        f"(first {args.warmup_steps} left out), {args.repeats} repeat(s) alternating, median of repeats\n"
    )
    print("| condition | tokens/s | median step s | padding fraction | peak memory | final loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    med = {}
    for packing, rows in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in rows)
        med[packing] = tps
        pad = rows[0]["padding_fraction"]
        # train() resets CUDA peak statistics per run; a CPU process's max RSS only grows, so it is not shown
        cuda = rows[0]["memory_kind"] == "cuda_max_allocated"
        memory = f"{max(r['peak_memory_gib'] for r in rows):.2f} GiB" if cuda else "n/a (CPU)"
        print(
            f"| {'packed' if packing else 'padded'} | {tps:.1f} | {statistics.median(r['step_s'] for r in rows):.3f} "
            f"| {'0 (none)' if pad is None else f'{pad:.1%}'} | {memory} | {rows[0]['final_loss']:.4f} |"
        )
    print(f"\npacked / padded tokens/s: {med[True] / med[False]:.2f}x")


if __name__ == "__main__":
    main()
