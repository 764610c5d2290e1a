"""Seeded mini tasks shaped like GSM8K, Spider and HellaSwag, plus the pretraining corpus they are learned from.

No dataset can be downloaded where the tests run, so the repo trains a small model on a generated corpus and
fine-tunes it on these tasks; see :func:`moe_sieve.minitasks.generate.generate_minitasks`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_SIZES", "GENERATOR_VERSION", "SMALL_SIZES", "generate_minitasks"]


def __getattr__(name: str) -> Any:
    # Imported lazily so ``python -m moe_sieve.minitasks.generate`` does not find its module already loaded.
    if name in __all__:
        from moe_sieve.minitasks import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
