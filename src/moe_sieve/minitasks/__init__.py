"""Seeded mini tasks shaped like GSM8K, Spider and HellaSwag, plus the pretraining corpus they are learned from.

No dataset can be downloaded where the tests run, so the repo trains a small model on a generated corpus and
fine-tunes it on these tasks; see :func:`generate_minitasks`.
"""

from __future__ import annotations

from moe_sieve.minitasks.generate import DEFAULT_SIZES, GENERATOR_VERSION, SMALL_SIZES, generate_minitasks

__all__ = ["DEFAULT_SIZES", "GENERATOR_VERSION", "SMALL_SIZES", "generate_minitasks"]
