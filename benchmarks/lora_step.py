"""Training-step cost of Sieve LoRA against the attention+router floor and HF PEFT on all experts.

    python benchmarks/lora_step.py                        # small OLMoE shape, CPU-friendly
    python benchmarks/lora_step.py --preset olmoe-1b-7b   # OLMoE-1B-7B shape, bf16, batch 8 x 512 (GPU)

Conditions, all with r=32, alpha=64 and the same random bf16/fp32 base weights:
  floor       LoRA on attention + router only (transformers' own experts backend)
  sieve-hot   + LoRA on the 25% most-routed experts per layer (profiled on the benchmark batch)
  sieve-all   + LoRA on every expert, same code path
  peft-all    HF PEFT LoRA on attention + all experts (target_parameters on gate_up_proj/down_proj)
  routed-S/D/R/E, routed-E-hot   Routed-PEFT adapters only (lora type, N=4, K=2; E inside the grouped experts)
Each step is forward + backward + AdamW. Conditions run one after the other in this process and the
script prints median step times, peak memory (CUDA) and ratios measured side by side.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
from _shapes import PRESETS, build_olmoe

from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora
from moe_sieve.arch import find_moe_layers, get_arch
from moe_sieve.profiling import RoutingRecorder
from moe_sieve.selection import select_topk
from moe_sieve.stats import resolve_k


def build_base(preset: str, seq_len: int, device: torch.device, dtype: torch.dtype):
    return build_olmoe(preset, seq_len).to(device=device, dtype=dtype)


def hot_selection(model, input_ids: torch.Tensor, k: str) -> dict[int, list[int]]:
    layers = find_moe_layers(model)
    recorder = RoutingRecorder(layers, get_arch(model))
    with recorder, torch.no_grad():
        recorder.begin_batch(torch.ones(input_ids.shape, dtype=torch.bool))
        model(input_ids=input_ids)
        counts_LBE, _ = recorder.end_batch()
    return select_topk(counts_LBE.sum(1), resolve_k(k, layers[0].num_experts), [layer.layer_id for layer in layers])


def attach(condition: str, model, hot: dict[int, list[int]], r: int, alpha: float):
    lora = SieveLoraConfig(r=r, alpha=alpha, dropout=0.0, seed=0, targets=("attention", "router", "experts"))
    if condition == "floor":
        apply_sieve_lora(model, None, SieveLoraConfig(**{**lora.to_json(), "experts": "none"}))
    elif condition == "sieve-hot":
        apply_sieve_lora(model, hot, lora)
    elif condition == "sieve-all":
        apply_sieve_lora(model, None, SieveLoraConfig(**{**lora.to_json(), "experts": "all"}))
    elif condition == "peft-all":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
        model = get_peft_model(model, config)
    elif condition.startswith("routed-"):
        from moe_sieve.adapters.routed import RoutedAdapterConfig, apply_routed_adapters

        variant, _, hot_only = condition.removeprefix("routed-").partition("-")
        cfg = RoutedAdapterConfig(
            variant=variant,
            r=r,
            alpha=alpha,
            dropout=0.0,
            num_adapters=4,
            top_k=2,
            experts="selected" if hot_only else "all",
        )
        apply_routed_adapters(model, hot if hot_only else None, cfg)
    else:
        raise ValueError(condition)
    return model


def run_condition(args, condition, base, hot, input_ids, device) -> dict:
    model = attach(condition, copy.deepcopy(base), hot, args.r, args.alpha)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    labels = input_ids.clone()

    def step() -> None:
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    trainable = sum(p.numel() for p in params)
    return {"condition": condition, "step_s": statistics.median(times), "peak_bytes": peak, "trainable": trainable}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on the OLMoE preset, 4 otherwise")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 512 on the OLMoE preset, 128 otherwise")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--k", default="25%")
    parser.add_argument(
        "--conditions",
        default="floor,sieve-hot,sieve-all,peft-all,routed-S,routed-D,routed-R,routed-E,routed-E-hot",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    big = args.preset == "olmoe-1b-7b"
    batch = args.batch_size or (8 if big else 4)
    seq = args.seq_len or (512 if big else 128)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = build_base(args.preset, seq, device, dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    input_ids = torch.randint(3, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)
    hot = hot_selection(base, input_ids, args.k)
    results = []
    for condition in args.conditions.split(","):
        results.append(run_condition(args, condition, base, hot, input_ids, device))
        release(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name} | preset {args.preset} | {dtype} | batch {batch}x{seq} | r={args.r} | k={args.k}")
    by_name = {r["condition"]: r for r in results}
    floor = by_name.get("floor")
    peft = by_name.get("peft-all")
    print(f"{'condition':<12} {'trainable':>12} {'step ms':>10} {'peak GiB':>9} {'vs floor':>9} {'vs peft':>8}")
    for r in results:
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
        vs_floor = f"{r['step_s'] / floor['step_s']:.3f}x" if floor else "-"
        vs_peft = f"{peft['step_s'] / r['step_s']:.2f}x" if peft else "-"
        step_ms = r["step_s"] * 1e3
        print(f"{r['condition']:<12} {r['trainable']:>12,} {step_ms:>10.1f} {peak:>9} {vs_floor:>9} {vs_peft:>8}")
    if peft and "sieve-hot" in by_name and peft["peak_bytes"]:
        print(f"sieve-hot peak memory / peft-all: {by_name['sieve-hot']['peak_bytes'] / peft['peak_bytes']:.2f}")
    print("targets: sieve-hot <= 1.10x floor; peft-all / sieve-hot >= 1.3x; peak <= 0.75 of peft-all")


if __name__ == "__main__":
    main()
