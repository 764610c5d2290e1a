"""One rank of the two-process expert-parallel check (tests/test_ep.py), run under torch.distributed.run.

For each saved model directory: load it once in this process alone and once through transformers' EP engine
(``DistributedConfig(ep_size=EP_SIZE, fsdp_size=FSDP_SIZE)`` from the environment, default 2 and 2; gloo on
CPU), with moe-sieve's ``sieve_lora`` experts kernel; record
which experts this rank holds, the loss, the embedding gradient, and which hot experts' LoRA factors it holds.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig

from moe_sieve.adapters.factors import full_numel
from moe_sieve.adapters.sieve.config import SieveLoraConfig
from moe_sieve.adapters.sieve.experts import iter_fused_experts, register_sieve_experts_implementation
from moe_sieve.adapters.sieve.model import apply_sieve_lora
from moe_sieve.arch import find_moe_layers
from moe_sieve.training.sharding import reshard

EP_SIZE = int(os.environ.get("EP_SIZE", 2))
FSDP_SIZE = int(os.environ.get("FSDP_SIZE", EP_SIZE))


def check(model_dir: str, device: torch.device) -> dict:
    torch.manual_seed(0)
    ids = torch.randint(0, 250, (2, 24), device=device)
    kwargs = {"dtype": torch.float32, "experts_implementation": "sieve_lora"}
    ref = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device)
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ref_experts = {name: m.gate_up_proj.detach() for name, m in iter_fused_experts(ref)}

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, distributed_config=DistributedConfig(ep_size=EP_SIZE, fsdp_size=FSDP_SIZE), **kwargs
    )
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grad = model.get_input_embeddings().weight.grad.full_tensor()
    owned = {}
    for name, experts in iter_fused_experts(model):
        local = experts.gate_up_proj.to_local().to(device)
        full = ref_experts[name]
        owned[name] = [e for e in range(full.shape[0]) if any(torch.equal(full[e], row) for row in local)]
    return {
        "loss": loss.item(),
        "ref_loss": ref_loss.item(),
        "grad_err": (grad - ref.get_input_embeddings().weight.grad).abs().max().item(),
        "device": str(device),
        "owned": owned,
        "ep_size": EP_SIZE,
        "num_experts_local": [int(m.num_experts) for _, m in iter_fused_experts(model)][0],
        "attach": attach_hot_experts(model),
    }


def attach_hot_experts(model) -> dict:
    """Sieve LoRA on an uneven hot set (layer l: experts 0, E-1 and l mod E): per layer, the global ids of the
    hot experts whose factors this rank holds, and their elements here."""
    reshard(model)
    layers = find_moe_layers(model)
    num_experts = layers[0].num_experts
    hot = {layer.layer_id: sorted({0, num_experts - 1, layer.layer_id % num_experts}) for layer in layers}
    apply_sieve_lora(model, hot, SieveLoraConfig(r=2, alpha=4, router="full", targets=("experts",)))
    attached = {}
    for layer in layers:
        lora = layer.experts.sieve_lora
        attached[str(layer.layer_id)] = {
            "hot": hot[layer.layer_id],
            "held": [lora.first_expert + e for e in lora.selected_experts],
            "numel": sum(p.numel() for p in lora.parameters()),
            "per_expert": sum(full_numel(p) for p in lora.parameters()) // len(hot[layer.layer_id]),
        }
    return attached


def main() -> None:
    out, *dirs = sys.argv[1:]
    torch.set_num_threads(1)
    register_sieve_experts_implementation()
    rank = int(os.environ["RANK"])
    # transformers binds CUDA rank i to cuda:LOCAL_RANK (nccl) and CPU ranks to the CPU (gloo)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    result = {d: check(d, device) for d in dirs}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
