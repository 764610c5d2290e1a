"""Profiling overhead: a profiled forward pass against the same plain forward, side by side in one run.

    python benchmarks/profile_overhead.py                      # small OLMoE shape, CPU-friendly
    python benchmarks/profile_overhead.py --preset olmoe-1b-7b # the paper's OLMoE-1B-7B shape (GPU)
    python benchmarks/profile_overhead.py --preset qwen3-30b-a3b-16l --batch-size 8 --seq-len 512

The model has random weights (routing geometry is what matters for the cost of counting). Plain and
profiled passes alternate, so clock drift hits both; the script prints median times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _shapes import PRESETS, build_model

from moe_sieve.arch import find_moe_layers, get_arch
from moe_sieve.profiling import RoutingRecorder
from moe_sieve.profiling.profiler import _forward_kwargs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--experts-implementation", default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="append a markdown table row block here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(args.preset, args.seq_len, args.experts_implementation, device=device, dtype=dtype).eval()
    config = model.config
    layers = find_moe_layers(model)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    count_mask = torch.ones(args.batch_size, args.seq_len, dtype=torch.bool)
    kwargs = _forward_kwargs(model)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain() -> None:
        model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        sync()

    recorder = RoutingRecorder(layers, get_arch(model))

    def profiled() -> None:
        with recorder:  # hooks exist only during profiled calls, so plain calls run hook-free
            recorder.begin_batch(count_mask)
            model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            recorder.end_batch()  # copies the counts to the host, which syncs

    plain_s, profiled_s = [], []
    with torch.inference_mode():
        for fn in (plain, profiled, plain, profiled):  # warm-up
            fn()
        for _ in range(args.repeats):
            for fn, sink in ((plain, plain_s), (profiled, profiled_s)):
                start = time.perf_counter()
                fn()
                sink.append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq_len
    plain_med, prof_med = statistics.median(plain_s), statistics.median(profiled_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (
        f"device {name} | torch {torch.__version__} | preset {args.preset} | {dtype} | "
        f"batch {args.batch_size}x{args.seq_len} | experts backend {config._experts_implementation}"
    )
    ratio = prof_med / plain_med
    print(header)
    print(f"plain forward    {plain_med * 1e3:9.2f} ms  ({tokens / plain_med:,.0f} tok/s)")
    print(f"profiled forward {prof_med * 1e3:9.2f} ms  ({tokens / prof_med:,.0f} tok/s)")
    print(f"overhead ratio   {ratio:9.3f}x  (target <= 1.02x)")
    if args.markdown:
        command = " ".join(["python benchmarks/profile_overhead.py", *(argv if argv is not None else sys.argv[1:])])
        text = (
            f"`{command}`  \n{header}, median of {args.repeats} alternating pairs\n\n"
            "| forward | ms | tokens/s |\n|---|---:|---:|\n"
            f"| plain | {plain_med * 1e3:.2f} | {tokens / plain_med:,.0f} |\n"
            f"| profiled | {prof_med * 1e3:.2f} | {tokens / prof_med:,.0f} |\n\n"
            f"Overhead: {ratio:.3f}x (target <= 1.02x)\n"
        )
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return {"plain_s": plain_med, "profiled_s": prof_med, "ratio": ratio}


if __name__ == "__main__":
    main()
