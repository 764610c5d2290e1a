"""Expert-guard overhead: the guard's own time against the training steps it checks, and guarded against plain steps.

    python benchmarks/guard_overhead.py                          # small OLMoE shape, CPU-friendly
    python benchmarks/guard_overhead.py --preset olmoe-1b-7b     # OLMoE-1B-7B's shape (GPU)
    python benchmarks/guard_overhead.py --peft                   # through get_peft_model(SieveConfig)

A Sieve LoRA model (top 25% of the experts of every layer) trains with AdamW. ``--steps`` guarded steps (the guard
checks every one of them; by default it checks only the first 2 of a run and then removes itself) alternate with
as many unguarded ones, so clock drift hits both. The guard times itself (token counting in the forward hooks, the
gradient check before each optimizer step); its share of the guarded step time is the number that matters (< 1%).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _shapes import PRESETS, build_model

from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora
from moe_sieve.adapters.guard import install_expert_guard
from moe_sieve.arch import find_moe_layers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=6, help="guarded steps (and as many plain ones)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--peft", action="store_true", help="attach through get_peft_model(SieveConfig)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    _, _, batch, seq = PRESETS[args.preset]
    batch, seq = args.batch_size or batch, args.seq_len or seq
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.preset, seq, device=device, dtype=dtype)
    layers = find_moe_layers(model)
    k = max(1, layers[0].num_experts // 4)
    selection = {layer.layer_id: list(range(0, layers[0].num_experts, 4))[:k] for layer in layers}
    if args.peft:
        from peft import get_peft_model

        from moe_sieve.adapters.peft_method import SieveConfig

        model = get_peft_model(model, SieveConfig(selection=selection, r=args.r, lora_alpha=2 * args.r, guard_steps=0))
        inner = model.get_base_model()
    else:
        apply_sieve_lora(model, selection, SieveLoraConfig(r=args.r, alpha=2 * args.r))
        inner = model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    vocab = inner.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=gen).to(device)
    labels = ids.clone()
    labels[:, : seq // 4] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        sync()
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    plain_s, guarded_s, guard_s = [], [], []
    for _ in range(args.steps):
        plain_s.append(step())
        guard = install_expert_guard(inner, steps=1)
        guarded_s.append(step())
        guard_s.append(guard.overhead_s)
        assert guard.checked == 1 and not guard.active and guard.verified
    result = {
        "preset": args.preset,
        "device": str(device),
        "tokens_per_step": batch * seq,
        "peft": args.peft,
        "plain_step_s": statistics.median(plain_s),
        "guarded_step_s": statistics.median(guarded_s),
        "guard_s": statistics.median(guard_s),
    }
    result["guard_share_of_step"] = result["guard_s"] / result["guarded_step_s"]
    result["guarded_over_plain"] = result["guarded_step_s"] / result["plain_step_s"]
    print(
        f"{args.preset} on {device} ({batch}x{seq} tokens, {'PEFT' if args.peft else 'apply_sieve_lora'}): "
        f"step {1e3 * result['plain_step_s']:.1f} ms plain, {1e3 * result['guarded_step_s']:.1f} ms guarded; "
        f"guard {1e3 * result['guard_s']:.2f} ms = {100 * result['guard_share_of_step']:.3f}% of the guarded step "
        f"(guarded/plain {result['guarded_over_plain']:.4f})"
    )
    return result


if __name__ == "__main__":
    main()
