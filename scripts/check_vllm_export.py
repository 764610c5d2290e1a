"""Load moe-sieve's vLLM export with vLLM's own LoRA loading and MoE packing code and compare the per-expert
dense deltas vLLM builds with what ``merge_sieve_lora`` folds into the base weights.

Two steps, two environments (vLLM pins its own torch/transformers; see check_vllm_export.sh):

  python scripts/check_vllm_export.py prepare OUT [--families olmoe,mixtral,...] [--layers 16]
      (project env) builds seeded tiny models of each family with random Sieve LoRA on 3 of 8 experts
      (router LoRA off unless --router), writes OUT/<family>/ with ``moe-sieve``'s vLLM export and
      OUT/<family>/reference.safetensors: the dense per-expert (out, in) deltas of w1/w2/w3 (gate/down/up)
      that merge_sieve_lora adds, keyed ``<vllm experts module>.<expert>.<w1|w2|w3>``, float64.
  python scripts/check_vllm_export.py check OUT
      (vLLM env) for each family: vLLM's PEFTHelper.from_local_dir, LoRAModel.from_local_checkpoint (with the
      model class's hf_to_vllm_mapper rename mapper and the per-expert names of vLLM's
      RoutedExperts.build_expert_params_mapping as the expected modules), then LoRAModelManager's
      _create_merged_loras_inplace (PackedLoRALayerWeights.pack_moe) or, for 3D-expert models (GPT-OSS),
      _stack_moe_lora_weights; the dense ``scaling * B @ A`` per expert from what vLLM packed must equal the
      reference. No model is instantiated: the manager object only carries the packed-module tables the real
      manager derives from the model class (and, for 3D experts, the expert count/rank geometry).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
FAMILY_CLASS = {
    "olmoe": ("vllm.model_executor.models.olmoe", "OlmoeForCausalLM", ("gate_proj", "down_proj", "up_proj")),
    "mixtral": ("vllm.model_executor.models.mixtral", "MixtralForCausalLM", ("w1", "w2", "w3")),
    "qwen2_moe": ("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM", ("gate_proj", "down_proj", "up_proj")),
    "qwen3_moe": ("vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM", ("gate_proj", "down_proj", "up_proj")),
    "deepseek_v3": (
        "vllm.model_executor.models.deepseek_v2",
        "DeepseekV3ForCausalLM",
        ("gate_proj", "down_proj", "up_proj"),
    ),
    "gpt_oss": ("vllm.model_executor.models.gpt_oss", "GptOssForCausalLM", ("w1", "w2", "w3")),
}
# vLLM module leaf names (LinearBase / GateLinear / RoutedExperts) of these model files, for expected_lora_modules
VLLM_LEAVES = {"qkv_proj", "o_proj", "gate", "router", "experts", "gate_up_proj", "down_proj", "shared_expert_gate"}
VLLM_LEAVES |= {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "fused_qkv_a_proj"}


# ----------------------------------------------------------------------------------------------- prepare (project env)
def prepare(out: Path, families: list[str], layers: int, router: bool) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "src"))
    from tests.test_export import adapted, merge_reference  # the test suite's seeded tiny families

    from moe_sieve.adapters.serving import export_serving_adapter
    from moe_sieve.arch import find_moe_layers, get_arch

    for family in families:
        targets = ("attention", "router", "shared", "experts") if router else ("attention", "shared", "experts")
        model = adapted(family, layers, targets=targets)
        spec = get_arch(model)
        reference = merge_reference(model, family, layers)
        result = export_serving_adapter(model, out / family, engine="vllm", overwrite=True)
        gate, up, down = spec.serving_expert_projections
        dense = {}
        for layer in find_moe_layers(model):
            if layer.layout.storage != "fused":
                continue
            block = layer.name
            if spec.serving_moe_block:
                block = f"{block.rpartition('.')[0]}.{spec.serving_moe_block}"
            first = reference[f"{layer.experts_name}.gate_up_proj"]
            second = reference[f"{layer.experts_name}.down_proj"]
            if layer.layout.is_transposed:
                first, second = first.transpose(1, 2), second.transpose(1, 2)
            inter = first.shape[1] // 2
            if layer.layout.is_concatenated:
                gate_d, up_d = first[:, :inter], first[:, inter:]
            else:
                gate_d, up_d = first[:, 0::2], first[:, 1::2]
            for e in range(layer.num_experts):
                for leaf, value in ((gate, gate_d[e]), (up, up_d[e]), (down, second[e])):
                    dense[f"{block}.experts.{e}.{leaf}"] = value.contiguous()
        fused_params = {
            f"{layer.experts_name}.{p}" for layer in find_moe_layers(model) for p in ("gate_up_proj", "down_proj")
        }
        for key, value in reference.items():  # attention, shared experts, routers: by checkpoint module name
            if key in fused_params or not key.endswith(".weight") or not value.abs().max() > 0:
                continue
            module = key.removesuffix(".weight")
            for layer in find_moe_layers(model):
                if spec.serving_moe_block and module.startswith(layer.name + "."):
                    module = f"{layer.name.rpartition('.')[0]}.{spec.serving_moe_block}" + module[len(layer.name) :]
            dense[module] = value.contiguous()
        save_file(dense, str(out / family / "reference.safetensors"))
        meta = {
            "family": family,
            "num_experts": find_moe_layers(model)[0].num_experts,
            "rank": result.rank,
            "reference_projections": [gate, up, down],
        }
        (out / family / "meta.json").write_text(json.dumps(meta))
        print(f"{family}: exported {result.tensors} tensors ({result.bytes} B) to {out / family}")


# ---------------------------------------------------------------------------------------------------- check (vLLM env)
def check(out: Path) -> int:
    import importlib
    from types import SimpleNamespace

    import vllm
    import vllm.lora.lora_model
    import vllm.lora.model_manager
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    print(f"vllm {vllm.__version__} from {Path(vllm.__file__).parent}")
    if not torch.cuda.is_available():  # pinned host memory needs an accelerator; the tensors are the same
        vllm.lora.lora_model.PIN_MEMORY = vllm.lora.model_manager.PIN_MEMORY = False
    failures = 0
    for family_dir in sorted(p for p in out.iterdir() if (p / "meta.json").exists()):
        meta = json.loads((family_dir / "meta.json").read_text())
        module_path, class_name, (ckpt_gate, ckpt_down, ckpt_up) = FAMILY_CLASS[meta["family"]]
        cls = getattr(importlib.import_module(module_path), class_name)
        num_experts = meta["num_experts"]
        is_3d = bool(getattr(cls, "is_3d_moe_weight", False))
        packed_mapping = {k: list(v) for k, v in getattr(cls, "packed_modules_mapping", {}).items()}
        packed_mapping.setdefault("gate_up_proj", ["gate_proj", "up_proj"])  # models add it for shared MLPs
        if not is_3d:  # vllm.lora.utils.process_packed_modules_mapping
            mapping = RoutedExperts.build_expert_params_mapping(
                ckpt_gate, ckpt_down, ckpt_up, num_experts, routed_experts_prefix=""
            )
            packed_mapping["experts"] = [weight_name.rstrip(".") for _, weight_name, _, _ in mapping]
        expected: set[str] = set()  # vllm.lora.worker_manager._load_adapter
        for module in VLLM_LEAVES:
            expected.update(packed_mapping.get(module, [module]))
            if module == "experts":
                expected.add(module)
        mapper = getattr(cls, "hf_to_vllm_mapper", None)
        mapper = mapper.get_rename_mapper() if mapper is not None else None
        helper = PEFTHelper.from_local_dir(str(family_dir), None)
        lora_model = LoRAModel.from_local_checkpoint(
            str(family_dir), expected, helper, lora_model_id=1, device="cpu", dtype=torch.float64, weights_mapper=mapper
        )

        manager = object.__new__(LoRAModelManager)
        manager.packed_modules_mapping = packed_mapping
        manager.packed_modules = {}
        manager.modules = {}
        manager.is_pooling_model = False
        manager._enable_moe_shared_loras = False
        manager._enable_mixed_moe_lora_format = False
        manager._is_non_gated_moe = False
        manager._is_3d_moe_model = is_3d
        experts_modules = sorted({n.split(".experts", 1)[0] + ".experts" for n in lora_model.loras if ".experts" in n})
        parents = set(experts_modules)
        for name in lora_model.loras:
            parent, _, leaf = name.rpartition(".")
            for packed, parts in packed_mapping.items():
                if packed != "experts" and leaf in parts:
                    parents.add(f"{parent}.{packed}")
        for full in sorted(parents):
            manager._register_packed_modules(full)  # the real manager's packed-name registration
        manager._create_merged_loras_inplace(lora_model)  # packs qkv / gate_up / per-expert w1-w3, folds scaling
        if is_3d:
            for name in experts_modules:
                a = lora_model.loras[name].lora_a
                geometry = SimpleNamespace(
                    w13_lora_a_stacked=[torch.empty(1, num_experts, a.shape[0] // num_experts, 1)],
                    global_num_experts=num_experts,
                    ep_rank=0,
                )
                manager._stack_moe_lora_weights(lora_model, geometry, name)

        reference = load_file(str(family_dir / "reference.safetensors"))
        worst, compared = 0.0, 0
        for name in experts_modules:
            packed = lora_model.loras[name]
            if is_3d:  # [gate_up, down] as (E, r, in) / (E, out, r); scaling already folded into B (optimize)
                scaling = packed.scaling
                gate_up = scaling * packed.lora_b[0] @ packed.lora_a[0]
                down = scaling * packed.lora_b[1] @ packed.lora_a[1]
                gate_d, up_d = gate_up[:, 0::2], gate_up[:, 1::2]  # GPT-OSS interleaves gate/up rows
                ref_gate, ref_up, ref_down = meta["reference_projections"]
                per = {ref_gate: gate_d, ref_up: up_d, ref_down: down}
            else:  # pack_moe: [w1, w2, w3] each (E, r, in) / (E, out, r), one scaling each (1 after optimize)
                scalings = packed.scaling
                per = {
                    leaf: scalings[i] * packed.lora_b[i] @ packed.lora_a[i]
                    for i, leaf in enumerate((ckpt_gate, ckpt_down, ckpt_up))
                }
            for leaf, dense_EOI in per.items():
                if dense_EOI.shape[0] != num_experts:
                    raise SystemExit(f"{name}.{leaf}: vLLM packed {dense_EOI.shape[0]} experts, expected {num_experts}")
                for e in range(num_experts):
                    ref = reference[f"{name}.{e}.{leaf}"].to(torch.float64)
                    worst = max(worst, (dense_EOI[e].to(torch.float64) - ref).abs().max().item())
                    compared += 1
        renamed = {}  # the reference by vLLM's module names (e.g. GPT-OSS: self_attn -> attn), as the loader maps
        for key, value in reference.items():
            mapped = mapper._map_name(f"{key}.lora_A.weight") if mapper is not None else f"{key}.lora_A.weight"
            renamed[mapped.removesuffix(".lora_A.weight")] = value
        for name, weights in lora_model.loras.items():  # attention, shared experts, routers
            if ".experts" in name:
                continue
            subs = manager.packed_modules.get(name, [name]) if weights.is_packed else [name]
            a_list = weights.lora_a if weights.is_packed else [weights.lora_a]
            b_list = weights.lora_b if weights.is_packed else [weights.lora_b]
            scalings = weights.scaling if weights.is_packed else [weights.scaling]
            for sub, a, b, scaling in zip(subs, a_list, b_list, scalings, strict=True):
                if a is None:
                    continue
                ref = renamed.get(sub, torch.zeros(b.shape[0], a.shape[1], dtype=torch.float64))
                worst = max(worst, (scaling * b.to(torch.float64) @ a.to(torch.float64) - ref).abs().max().item())
                compared += 1
        missing = {k.rsplit(".", 2)[0] for k in reference if ".experts." in k} - set(experts_modules)
        ok = worst <= 1e-10 and compared == len(reference) and not missing
        failures += not ok
        status = "PASS" if ok else "FAIL"
        note = f" missing {sorted(missing)}" if missing else ""
        print(
            f"{status} {meta['family']}: {len(experts_modules)} MoE layers, {compared}/{len(reference)} deltas "
            f"(expert projections, attention, shared experts, routers) compared, max |vLLM - merge| = {worst:.3g}{note}"
        )
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("out", type=Path)
    p.add_argument("--families", default=",".join(FAMILY_CLASS))
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--router", action="store_true", help="include router LoRA (vLLM's GateLinear takes it)")
    c = sub.add_parser("check")
    c.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.out, [f for f in args.families.split(",") if f], args.layers, args.router)
    else:
        sys.exit(1 if check(args.out) else 0)


if __name__ == "__main__":
    main()
