"""Sharded training on CPU: FSDP2 (torch `fully_shard`) works over gloo with Sieve adapters, while
transformers/accelerate cannot shard a CPU run, so `train --fsdp` on CPU is refused instead of silently running DDP."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moe_sieve.training import TrainConfig, train
from moe_sieve.training.sharding import FSDP_ON_CPU

HERE = Path(__file__).parent


def _launch(n, out, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port)]
    proc = subprocess.run(
        [*cmd, str(HERE / "fsdp2_sieve.py"), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fsdp2_two_processes_match_one_on_the_embedded_model(tmp_path):
    _launch(1, tmp_path, 29561)
    _launch(2, tmp_path, 29562)
    with safe_open(str(tmp_path / "adapter_2.safetensors"), "pt") as f:
        assert int(f.metadata()["sharded_params"]) > 100  # every parameter was a DTensor shard
    one = load_file(tmp_path / "adapter_1.safetensors")
    two = load_file(tmp_path / "adapter_2.safetensors")
    assert one.keys() == two.keys() and len(one) > 50
    assert any(k.endswith(("lora_B", "lora_B.weight", "down_B")) and one[k].abs().max() > 0 for k in one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


def test_train_refuses_fsdp_on_cpu(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": " b"}\n' * 8)
    config = TrainConfig(
        model=str(tiny_model_dir),
        data=str(data),
        out=str(tmp_path / "r"),
        batch_size=4,
        micro_batch_size=4,
        max_steps=1,
        device="cpu",
        fsdp="full_shard auto_wrap",
        monitor_every=0,
    )
    with pytest.raises(ValueError, match="--fsdp on CPU: accelerate") as err:
        train(config)
    assert str(err.value) == FSDP_ON_CPU
