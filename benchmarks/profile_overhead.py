"""Profiling overhead: a profiled forward pass against the same plain forward, side by side in one run.

    python benchmarks/profile_overhead.py                      # small OLMoE shape, CPU-friendly
    python benchmarks/profile_overhead.py --preset olmoe-1b-7b # the paper's OLMoE-1B-7B shape (GPU)

The model has random weights (routing geometry is what matters for the cost of counting). Plain and
profiled passes alternate, so clock drift hits both; the script prints median times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _shapes import PRESETS, build_olmoe

from moe_sieve.arch import find_moe_layers, get_arch
from moe_sieve.profiling import RoutingRecorder
from moe_sieve.profiling.profiler import _forward_kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--experts-implementation", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_olmoe(args.preset, args.seq_len, args.experts_implementation).to(device=device, dtype=dtype).eval()
    config = model.config
    layers = find_moe_layers(model)
    input_ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
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
    print(
        f"device {name} | preset {args.preset} | {dtype} | batch {args.batch_size}x{args.seq_len} "
        f"| experts backend {config._experts_implementation}"
    )
    print(f"plain forward    {plain_med * 1e3:9.2f} ms  ({tokens / plain_med:,.0f} tok/s)")
    print(f"profiled forward {prof_med * 1e3:9.2f} ms  ({tokens / prof_med:,.0f} tok/s)")
    print(f"overhead ratio   {prof_med / plain_med:9.3f}x  (target <= 1.05x)")


if __name__ == "__main__":
    main()
