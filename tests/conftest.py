"""Tiny seeded MoE models of every supported family, built in fixtures (no downloads)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 259  # the byte-level tokenizer of moe_sieve.tiny


def tiny_config(family: str):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=VOCAB - 1,
        bos_token_id=VOCAB - 3,
        eos_token_id=VOCAB - 2,
    )
    if family == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2
        )
    if family == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4},
            intermediate_size=48,
            moe_intermediate_size=16,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            kv_lora_rank=8,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            routed_scaling_factor=2.5,
        )
    if family == "gpt_oss":
        return tf.GptOssConfig(
            **common,
            intermediate_size=16,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    raise ValueError(family)


FUSED_FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]


def build_tiny(family: str, seed: int = 0, experts_implementation: str | None = None, layers: int | None = None):
    """A seeded random model (``layers`` decoder layers, else the tiny config's); routers get real spread so
    every expert can win some tokens."""
    from transformers import AutoModelForCausalLM

    from .modulelist_model import build_modulelist_model

    torch.manual_seed(seed)
    if family == "modulelist":
        model = build_modulelist_model(seed, layers)
    else:
        config = tiny_config(family)
        if layers is not None:
            config.num_hidden_layers = layers
            if isinstance(getattr(config, "layer_types", None), list):
                pattern = config.layer_types
                config.layer_types = [pattern[i % len(pattern)] for i in range(layers)]
        if experts_implementation:
            config._experts_implementation = experts_implementation
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.normal_(0.0, 1.0)
            elif name.endswith("e_score_correction_bias"):
                param.normal_(0.0, 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.1)
    return model.eval()


def small_train_config(model_dir, data, out, **settings):
    """A CPU ``TrainConfig`` for a few-step run of a tiny model; each test file passes what it varies."""
    from moe_sieve.training import TrainConfig

    values = dict(device="cpu", warmup=0, logging_steps=1, r=4, alpha=8, batch_size=8, micro_batch_size=4)
    return TrainConfig(model=str(model_dir), data=str(data), out=str(out), **{**values, **settings})


@pytest.fixture(scope="session")
def byte_tokenizer():
    from moe_sieve.tiny import byte_level_tokenizer

    return byte_level_tokenizer()


@pytest.fixture(params=FUSED_FAMILIES + ["modulelist"])
def tiny_family(request):
    return request.param


@pytest.fixture
def tiny_model(tiny_family):
    return build_tiny(tiny_family)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, byte_tokenizer):
    """A saved tiny OLMoE + tokenizer, loaded by path through the real from_pretrained code."""
    path = tmp_path_factory.mktemp("tiny-olmoe")
    model = build_tiny("olmoe")
    model.save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def copy_digits_jsonl(tmp_path_factory):
    """A learnable toy SFT task (repeat a digit three times), 40 prompt/completion rows."""
    import json

    rows = [{"prompt": f"copy {a}:", "completion": f" {a}{a}{a}"} for a in range(10)] * 4
    path = tmp_path_factory.mktemp("copy-digits") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(monkeypatch, capsys, *args):
    """``moe-sieve ARGS`` in this process through the real entry point: (exit code, stdout, stderr)."""
    from moe_sieve.cli import main

    monkeypatch.setattr(sys, "argv", ["moe-sieve", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = exit_.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
