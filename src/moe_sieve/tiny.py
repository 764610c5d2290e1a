"""A tiny random-weight OLMoE with a byte-level tokenizer, built locally in seconds.

It stands in for a real checkpoint wherever no hub is reachable (CI, architecture tests), and
it goes through the real loading path: it is written with ``save_pretrained`` and read back with
``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

TINY_MODEL_ALIASES = ("tiny-random-olmoe",)


def _cache_root() -> Path:
    root = os.environ.get("MOE_SIEVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moe_sieve"
    )
    return Path(root)


def byte_level_tokenizer():
    """A 259-token byte-level tokenizer (256 bytes + bos/eos/pad): no training, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|bos|>", "<|endoftext|>", "<|pad|>"]
    for token in specials:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", vocab["<|bos|>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )


def tiny_olmoe_config(vocab_size: int = 259, **overrides):
    from transformers import OlmoeConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        pad_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 3,
        eos_token_id=vocab_size - 2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return OlmoeConfig(**values)


def build_tiny_model(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a seeded random tiny OLMoE and its tokenizer to ``path``."""
    from transformers import OlmoeForCausalLM

    path = Path(path)
    tokenizer = byte_level_tokenizer()
    config = tiny_olmoe_config(vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(config)
    # Routers start at zero in some inits; give them real spread so routing is not degenerate.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "moe_sieve_tiny.json").write_text(json.dumps({"seed": seed}) + "\n")
    return path


def ensure_tiny_model(alias: str = "tiny-random-olmoe") -> Path:
    """Build the aliased tiny model once into the cache and return its directory."""
    if alias not in TINY_MODEL_ALIASES:
        raise ValueError(f"unknown tiny model {alias!r}; known: {', '.join(TINY_MODEL_ALIASES)}")
    target = _cache_root() / alias
    if (target / "moe_sieve_tiny.json").exists():
        return target
    tmp = target.with_name(f".{alias}.{os.getpid()}.tmp")
    build_tiny_model(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_demo_corpus(path: str | os.PathLike, n: int = 96, seed: int = 0) -> Path:
    """A small mixed-domain prompt/completion JSONL (arithmetic, prose, code) for smoke runs."""
    rng = random.Random(seed)
    names = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay"]
    things = ["apples", "marbles", "books", "coins", "stamps"]
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            who, what = rng.choice(names), rng.choice(things)
            prompt = f"Question: {who} has {a} {what} and gets {b} more. How many {what} now?\nAnswer:"
            completion = f" {who} has {a} + {b} = {a + b} {what}.\n#### {a + b}"
        elif kind == 1:
            who = rng.choice(names)
            prompt = f"Story: {who} walked to the market on a rainy morning and"
            completion = rng.choice([" bought bread.", " met a friend.", " forgot the umbrella."])
        else:
            x = rng.randint(1, 9)
            prompt = f"# python\ndef add_{x}(n):\n"
            completion = f"    return n + {x}\n"
        rows.append({"prompt": prompt, "completion": completion})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
