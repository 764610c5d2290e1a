"""Training-step cost of Sieve LoRA against the attention+router floor and HF PEFT on all experts.

    python benchmarks/lora_step.py                              # small OLMoE shape, CPU-friendly
    python benchmarks/lora_step.py --preset olmoe-1b-7b         # OLMoE-1B-7B shape, bf16, batch 8 x 512 (GPU)
    python benchmarks/lora_step.py --preset qwen3-30b-a3b-16l   # Qwen3-30B-A3B layer shape, 16 layers (GPU)
    python benchmarks/lora_step.py --preset tiny --device cpu --steps 1 --warmup 0   # smoke run

Conditions, all with r=32, alpha=64 and the same seeded random base weights (rebuilt per condition):
  floor        LoRA on attention + router only, transformers' own experts backend (--base-backend)
  floor-sieve  the same adapters, experts through the ``sieve_lora`` backend (no expert LoRA)
  sieve-hot    + LoRA on the 25% most-routed experts per layer (profiled on the benchmark batch)
  sieve-all    + LoRA on every expert, same code path
  peft-all     HF PEFT LoRA on attention + all experts (target_parameters on gate_up_proj/down_proj)
  routed-S/D/R/E, routed-E-hot   Routed-PEFT adapters only (lora type, N=4, K=2; E inside the grouped experts)
  <condition>+compile   the same with every decoder layer under torch.compile(fullgraph=True) (needs --warmup >= 1)
  <condition>+loop      the same with CPU grouped GEMMs as a Python loop of per-expert mm (the CPU path before
                        torch's one-op CPU grouped_mm was used), to measure the two side by side
Each step is forward + backward + AdamW (CUDA-synchronised). Conditions run one after the other in this
process; the script prints median step time, tokens/s, MFU, peak memory (CUDA) and the memory predicted
from shapes (parameters + grads + AdamW states, and the sieve experts' saved activations), plus the
activations autograd actually saved in one forward. ``--profile CONDITION`` adds a torch.profiler table
of that condition's step time by kernel category.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from _shapes import PRESETS, build_model, step_flops

import moe_sieve.adapters.sieve.experts as experts_mod
from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora
from moe_sieve.adapters.sieve.experts import (
    SIEVE_EXPERTS_IMPLEMENTATION,
    compile_config,
    iter_fused_experts,
    use_sieve_experts,
)
from moe_sieve.adapters.sieve.memory import SavedTensorMeter, sieve_experts_saved_bytes, training_state_bytes
from moe_sieve.arch import find_moe_layers, get_arch
from moe_sieve.profiling import RoutingRecorder
from moe_sieve.routing_stats import resolve_k
from moe_sieve.selection import select_topk

DEFAULT_CONDITIONS = "floor,floor-sieve,sieve-hot,sieve-all,peft-all"
# Dense bf16 tensor-core peak by device name (vendor spec sheets, SXM parts); MFU is n/a elsewhere.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def hot_selection(model, input_ids: torch.Tensor, k: str) -> tuple[dict[int, list[int]], torch.Tensor]:
    """The benchmark batch's top-k experts per layer, and its routing counts ``counts_LE``."""
    layers = find_moe_layers(model)
    recorder = RoutingRecorder(layers, get_arch(model))
    with recorder, torch.no_grad():
        recorder.begin_batch(torch.ones(input_ids.shape, dtype=torch.bool))
        model(input_ids=input_ids)
        counts_LBE, _ = recorder.end_batch()
    counts_LE = counts_LBE.sum(1)
    hot = select_topk(counts_LE, resolve_k(k, layers[0].num_experts), [layer.layer_id for layer in layers])
    return hot, counts_LE


def attach(condition: str, model, hot: dict[int, list[int]], r: int, alpha: float):
    lora = SieveLoraConfig(r=r, alpha=alpha, dropout=0.0, seed=0, targets=("attention", "router", "experts"))
    if condition in ("floor", "floor-sieve"):
        apply_sieve_lora(model, None, SieveLoraConfig(**{**lora.to_json(), "experts": "none"}))
        if condition == "floor-sieve":
            use_sieve_experts(model)
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
        raise ValueError(f"--conditions: unknown condition {condition!r}")
    return model


def predicted_experts_bytes(model, tokens: int, counts_LE: torch.Tensor, r: int) -> int | None:
    """Sum over MoE layers of :func:`sieve_experts_saved_bytes`; None when the experts are not ``sieve_lora``."""
    found = list(iter_fused_experts(model))
    if not found or any(m.config._experts_implementation != SIEVE_EXPERTS_IMPLEMENTATION for _, m in found):
        return None
    total = 0
    for layer_idx, (_, experts) in enumerate(found):
        lora = getattr(experts, "sieve_lora", None)
        ids = list(lora.selected_experts) if lora is not None else []
        down = experts.down_proj
        inter = down.shape[1] if experts.is_transposed else down.shape[2]
        hidden = down.shape[2] if experts.is_transposed else down.shape[1]
        total += sieve_experts_saved_bytes(
            num_tokens=tokens,
            top_k=model.config.num_experts_per_tok,
            hidden_size=hidden,
            intermediate_size=inter,
            num_experts=experts.num_experts,
            dtype=down.dtype,
            has_gate=experts.has_gate,
            rows_selected=int(counts_LE[layer_idx, ids].sum()) if ids else 0,
            num_selected=len(ids),
            r=r,
            lora_dtype=lora.up_A.dtype if lora is not None else None,
        )["total"]
    return total


_CATEGORIES = [
    ("GEMM", r"^aten::(mm|bmm|addmm|baddbmm|_grouped_mm|grouped_mm|matmul|linear)$|grouped_mm"),
    ("attention", r"attention|flash|_efficient"),
    ("masked_fill", r"masked_fill"),
    ("dtype/copy", r"^aten::(copy_|_to_copy|to|clone|contiguous)$"),
    ("index/gather/scatter", r"index|gather|scatter|embedding|take"),
    ("elementwise mul", r"^aten::mul_?$"),
    (
        "other elementwise",
        r"^aten::(add|add_|sub|sub_|div|div_|silu|silu_backward|neg|pow|rsqrt|sigmoid|where|"
        r"fill_|zero_|zeros_like|cat|stack|cos|sin|exp|threshold_backward|gelu|gelu_backward|clamp|clamp_|lerp_)$",
    ),
    ("softmax/loss", r"softmax|nll_loss|cross_entropy"),
    ("sort/histc/cumsum/topk", r"^aten::(sort|histc|cumsum|topk|argsort|nonzero|arange)$"),
    ("reduction", r"^aten::(sum|mean|norm|max|amax)$"),
    ("optimizer", r"_foreach|_fused_adam|adam"),
]


def categorise(op: str) -> str:
    for name, pattern in _CATEGORIES:
        if re.search(pattern, op):
            return name
    return "other"


def profile_table(step, steps: int, device: torch.device) -> tuple[list[tuple[str, float, float]], list]:
    """Per-step self time (device time on CUDA, CPU time otherwise) by op category, and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    per_op: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        if us > 0 and evt.key.startswith(("aten::", "moe_sieve::", "transformers::")):
            per_op[evt.key] += us / 1e3 / steps
    by_cat: dict[str, float] = defaultdict(float)
    for op, ms in per_op.items():
        by_cat[categorise(op)] += ms
    total = sum(by_cat.values()) or 1.0
    cats = sorted(((c, ms, 100 * ms / total) for c, ms in by_cat.items()), key=lambda x: -x[1])
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return cats, [(op, ms, 100 * ms / total, categorise(op)) for op, ms in top]


@contextlib.contextmanager
def mm_loop_only():
    """Force the per-expert ``mm`` loop in every grouped GEMM (what ``+loop`` measures)."""
    previous = experts_mod._cpu_native_grouped_mm_ok
    experts_mod._cpu_native_grouped_mm_ok = lambda *args: False
    try:
        yield
    finally:
        experts_mod._cpu_native_grouped_mm_ok = previous


def run_condition(args, condition: str, hot, counts_LE, input_ids, device, dtype) -> dict:
    compiled = condition.endswith("+compile")
    looped = condition.endswith("+loop")
    with contextlib.ExitStack() as stack:
        if compiled:
            stack.enter_context(compile_config())
        if looped:
            stack.enter_context(mm_loop_only())
        return _run_condition(args, condition, hot, counts_LE, input_ids, device, dtype, compiled)


def _run_condition(args, condition: str, hot, counts_LE, input_ids, device, dtype, compiled: bool) -> dict:
    model = build_model(args.preset, input_ids.shape[1], args.base_backend, device=device, dtype=dtype)
    model = attach(condition.removesuffix("+compile").removesuffix("+loop"), model, hot, args.r, args.alpha)
    if compiled:
        for layer in model.get_decoder().layers:
            layer.compile(fullgraph=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    labels = input_ids.clone()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> None:
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    tokens = input_ids.numel()
    # What autograd keeps for the backward in one forward (parameters excluded), measured on real tensors.
    meter = SavedTensorMeter(exclude=list(model.parameters()))
    with meter:
        loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    optimizer.zero_grad(set_to_none=True)
    step_s = statistics.median(times)
    flops = step_flops(model, input_ids.shape[0], input_ids.shape[1])
    peak_tflops = args.peak_tflops
    if peak_tflops is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    backends = {m.config._experts_implementation for _, m in iter_fused_experts(model)}
    result = {
        "condition": condition,
        "experts_backend": ",".join(sorted(str(b) for b in backends)),
        "trainable": sum(p.numel() for p in params),
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "tflops_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / (peak_tflops * 1e12) if peak_tflops else None,
        "peak_bytes": peak,
        "state_bytes_pred": training_state_bytes(model)["total"],
        "experts_act_bytes_pred": predicted_experts_bytes(model, tokens, counts_LE, args.r),
        "saved_act_bytes_meas": meter.bytes,
    }
    if condition in args.profile:
        result["profile"] = profile_table(step, args.profile_steps, device)
        sync()
    return result  # the model and optimizer go with this frame; release() then empties the cache


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _gib(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**30:.3g}"


def markdown(results: list[dict], header: str) -> str:
    by_name = {r["condition"]: r for r in results}
    floor, peft = by_name.get("floor"), by_name.get("peft-all")
    lines = [
        header,
        "",
        "| condition | experts backend | trainable | step ms | tokens/s | TFLOP/s | MFU | peak GiB | "
        "pred. params+grads+AdamW GiB | pred. sieve experts act. GiB | saved act. GiB (measured) | "
        "vs floor | PEFT / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        vs_floor = f"{r['step_s'] / floor['step_s']:.3f}x" if floor else "-"
        vs_peft = f"{peft['step_s'] / r['step_s']:.2f}x" if peft else "-"
        lines.append(
            f"| {r['condition']} | {r['experts_backend']} | {r['trainable']:,} | {r['step_s'] * 1e3:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tflops_per_s']:.1f} | {mfu} | {_gib(r['peak_bytes'])} | "
            f"{_gib(r['state_bytes_pred'])} | {_gib(r['experts_act_bytes_pred'])} | "
            f"{_gib(r['saved_act_bytes_meas'])} | {vs_floor} | {vs_peft} |"
        )
    hot = by_name.get("sieve-hot")
    if peft and hot:
        lines.append("")
        lines.append(f"Targets (issue 12): PEFT / sieve-hot = {peft['step_s'] / hot['step_s']:.2f}x (>= 2.0x)")
        if floor:
            lines[-1] += f"; sieve-hot / floor = {hot['step_s'] / floor['step_s']:.3f}x (<= 1.05x)"
        if peft["peak_bytes"] and hot["peak_bytes"]:
            lines[-1] += f"; peak sieve-hot / PEFT = {hot['peak_bytes'] / peft['peak_bytes']:.2f} (<= 0.65)"
    for r in results:
        if "profile" in r:
            cats, top = r["profile"]
            unit = "GPU" if r["peak_bytes"] is not None else "CPU"
            lines += ["", f"{unit} self time of one `{r['condition']}` step by op category (torch.profiler):", ""]
            lines += [f"| category | {unit} ms/step | share |", "|---|---:|---:|"]
            lines += [f"| {c} | {ms:.2f} | {pct:.1f}% |" for c, ms, pct in cats]
            lines += ["", "Top ops:", "", f"| op | category | {unit} ms/step | share |", "|---|---|---:|---:|"]
            lines += [f"| `{op}` | {cat} | {ms:.2f} | {pct:.1f}% |" for op, ms, pct, cat in top]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's (8 on the GPU shapes)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's (512 on the GPU shapes)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--k", default="25%")
    parser.add_argument("--conditions", default=DEFAULT_CONDITIONS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--base-backend",
        default=None,
        help="transformers experts backend of the base model (default: grouped_mm on CUDA, eager on CPU)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: by device name)")
    parser.add_argument("--profile", default=None, help="conditions to profile with torch.profiler (comma-separated)")
    parser.add_argument("--keep-going", action="store_true", help="record a failing condition and go on")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = parser.parse_args(argv)
    _, _, default_batch, default_seq = PRESETS[args.preset]
    batch, seq = args.batch_size or default_batch, args.seq_len or default_seq
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.base_backend is None:
        args.base_backend = "grouped_mm" if device.type == "cuda" else "eager"
    conditions = args.conditions.split(",")
    args.profile = args.profile.split(",") if args.profile else []
    if set(args.profile) - set(conditions):
        raise ValueError(f"--profile {args.profile!r}: not all among --conditions {args.conditions!r}")

    base = build_model(args.preset, seq, args.base_backend, device=device, dtype=dtype)
    input_ids = torch.randint(3, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(device)
    hot, counts_LE = hot_selection(base, input_ids, args.k)
    del base
    release(device)
    results = []
    failures = []
    for condition in conditions:
        try:
            results.append(run_condition(args, condition, hot, counts_LE, input_ids, device, dtype))
        except Exception as exc:  # e.g. out of memory on one condition: the others are still measured
            if not args.keep_going:
                raise
            failures.append(f"{condition}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        release(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (
        f"`{' '.join(['python benchmarks/lora_step.py', *(argv if argv is not None else sys.argv[1:])])}`  \n"
        f"device {name} | torch {torch.__version__} | preset {args.preset} | {dtype} | batch {batch}x{seq} | "
        f"r={args.r} | k={args.k} | base experts backend {args.base_backend} | median of {args.steps} steps "
        f"after {args.warmup} warm-up"
    )
    text = markdown(results, header) + "".join(f"\nFAILED {line}\n" for line in failures)
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
