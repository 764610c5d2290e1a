"""Padding-free packed micro-batches for ``moe-sieve train --packing``.

A micro-batch's examples are concatenated into one row (transformers' ``DataCollatorWithFlattening``):
``position_ids`` restart at 0 for every example, there is no ``attention_mask``, and each example's first
label is -100, so no example predicts the next one's first token. With no 2D mask and no KV cache,
transformers' ``masking_utils`` detects the restarts in ``position_ids`` and builds a block-causal mask
(sdpa/eager), or flash-attention gets the ``cu_seq_lens`` boundaries. Nothing is padded, so neither the
experts nor the routing statistics see pad tokens.

The loss is unchanged: Trainer counts the label tokens of the whole accumulated batch over
``labels[..., 1:]`` and the model divides the summed token losses by that count, so packed and padded
micro-batches holding the same examples give the same loss and gradients (tests/test_packing.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..arch import get_arch


def check_packing(model: Any) -> None:
    """Refuse, in one line, a model whose packed forward would not equal its padded forward."""
    spec = get_arch(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if spec.packing_unsupported:
        raise ValueError(
            f"--packing: model family {spec.name!r} (model_type {model_type!r}) cannot pack exactly: "
            f"{spec.packing_unsupported}; train without --packing"
        )
    module = type(model).__module__
    if not module.startswith("transformers."):
        raise ValueError(
            f"--packing: {type(model).__name__} (model_type {model_type!r}) comes from {module}, not transformers, "
            "so its attention may ignore the position_ids that separate packed examples; train without --packing"
        )


def packing_collator(model: Any) -> Any:
    """``DataCollatorWithFlattening`` set up for ``model`` (flash-attention kernels get the boundaries)."""
    from transformers import DataCollatorWithFlattening

    attn = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs="flash" in attn)


def padding_fraction(lengths: Sequence[int], micro_batch_size: int, pad_to_multiple_of: int | None = None) -> float:
    """Share of the positions a right-padded run computes that are padding, for micro-batches taken in order."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    real = padded = 0
    for start in range(0, len(lengths), micro_batch_size):
        chunk = lengths[start : start + micro_batch_size]
        width = max(chunk)
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        real += sum(chunk)
        padded += width * len(chunk)
    return 0.0 if padded == 0 else 1.0 - real / padded
