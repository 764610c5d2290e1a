"""Launched by tests/test_fsdp.py: `torchrun --nproc_per_node N tests/fsdp2_sieve.py OUT` trains Sieve LoRA on the
embedded model for 3 AdamW steps; with N > 1 every decoder layer and the root are FSDP2-sharded (`fully_shard`)
over gloo on CPU. Each rank takes its share of the same global batch, so N = 1 and N = 2 see the same data."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora
from moe_sieve.adapters.attach import trainable_parameters
from moe_sieve.arch import find_moe_layers
from moe_sieve.demo import default_model_path

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
layers = find_moe_layers(model)
apply_sieve_lora(
    model, {layer.layer_id: [0, 3, 5, 9] for layer in layers}, SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=0)
)
sharded = 0
if world > 1:
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
params = list(trainable_parameters(model).values())
optimizer = torch.optim.AdamW(params, lr=1e-2)
generator = torch.Generator().manual_seed(0)
model.train()
for _ in range(3):
    ids = torch.randint(0, model.config.vocab_size - 3, (4, 16), generator=generator)
    per_rank = 4 // world
    losses = []
    for chunk in ids.split(per_rank)[rank : rank + 1] if world > 1 else ids.split(2):
        losses.append(model(input_ids=chunk, labels=chunk).loss)
    loss = torch.stack(losses).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
full = {
    n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    for n, p in trainable_parameters(model).items()
}
if rank == 0:
    save_file(full, f"{sys.argv[1]}/adapter_{world}.safetensors", metadata={"sharded_params": str(sharded)})
dist.destroy_process_group()
