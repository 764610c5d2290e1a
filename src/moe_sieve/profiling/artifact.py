"""The profile artifact: ``profile.safetensors`` (routing tensors) + ``profile.json`` (metadata)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_dir, atomic_write_safetensors, fingerprint, read_safetensors
from .._version import __version__
from ..arch import MoEShape

PROFILE_FORMAT_VERSION = 1
TENSORS_FILE = "profile.safetensors"
METADATA_FILE = "profile.json"


class OtherModelWarning(UserWarning):
    """A profile, selection or adapter made on a model with the same routing geometry but another config."""


def warn_other_model(what: str, made_on: str | None, this_model: str | None) -> None:
    """Warn (once per input) when ``what`` was made on a model whose config fingerprint differs from this one's:
    it fits, but its experts were ranked, or its factors trained, on another model."""
    if made_on and this_model and made_on != this_model:
        warnings.warn(
            f"{what} was made on another model with the same routing geometry (config fingerprint {made_on}; "
            f"this model: {this_model}); check that it is the model you meant",
            OtherModelWarning,
            stacklevel=1,  # one location for every caller: the same input warns once
        )


class ProfileMismatchError(ValueError):
    """A profile (or a selection made from one) does not fit the model it is used with."""


@dataclass
class Profile:
    """Routing counts of one model over one calibration set.

    ``counts_LE`` and ``mass_LE`` are the sums of the per-example ``example_counts_NLE`` and
    ``example_mass_NLE``, which are kept so a subsample can be re-scored without another forward pass.
    """

    counts_LE: np.ndarray
    mass_LE: np.ndarray
    example_counts_NLE: np.ndarray
    example_mass_NLE: np.ndarray
    example_tokens_N: np.ndarray
    layer_ids: list[int]
    num_experts: int
    top_k: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> MoEShape:
        return MoEShape(tuple(self.layer_ids), self.num_experts, self.top_k)

    @property
    def num_examples(self) -> int:
        return int(self.example_counts_NLE.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.example_tokens_N.sum())

    @property
    def fingerprint(self) -> str:
        """Identifies this profile's content, so a selection can name the profile it came from."""
        return fingerprint(
            {"counts": self.counts_LE.tolist(), "layers": self.layer_ids, "model": self.model_fingerprint}
        )

    @property
    def model_fingerprint(self) -> str | None:
        return self.metadata.get("model", {}).get("config_fingerprint")

    def subset(self, example_ids: np.ndarray) -> Profile:
        """The profile of a subset of the calibration examples, re-scored from per-example counts."""
        example_ids = np.asarray(example_ids, dtype=np.int64)
        counts = self.example_counts_NLE[example_ids]
        mass = self.example_mass_NLE[example_ids]
        meta = json.loads(json.dumps(self.metadata))
        meta.setdefault("data", {})["subset_of"] = self.fingerprint
        return Profile(
            counts.sum(0, dtype=np.int64),
            mass.sum(0, dtype=np.float64).astype(np.float32),
            counts,
            mass,
            self.example_tokens_N[example_ids],
            list(self.layer_ids),
            self.num_experts,
            self.top_k,
            meta,
        )

    def check_fits(self, shape: MoEShape, config_fingerprint: str | None = None, what: str = "model") -> None:
        """Raise :class:`ProfileMismatchError` if this profile was made for another routing geometry."""
        problems = []
        if tuple(self.layer_ids) != tuple(shape.layer_ids):
            problems.append(f"MoE layers {self.layer_ids} vs {list(shape.layer_ids)}")
        if self.num_experts != shape.num_experts:
            problems.append(f"{self.num_experts} vs {shape.num_experts} routed experts per layer")
        if self.top_k != shape.top_k:
            problems.append(f"top-k {self.top_k} vs {shape.top_k}")
        if problems:
            source = self.metadata.get("model", {}).get("id", "?")
            raise ProfileMismatchError(f"profile made on {source!r} does not fit this {what}: " + "; ".join(problems))
        source = self.metadata.get("model", {}).get("id", "?")
        warn_other_model(f"the profile (made on {source!r})", self.model_fingerprint, config_fingerprint)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the profile directory atomically: a crash leaves no half-written profile behind."""
        with atomic_dir(path, overwrite, keep_others=True) as tmp:  # keeps e.g. selections saved beside it
            atomic_write_safetensors(
                tmp / TENSORS_FILE,
                {
                    "counts": torch.from_numpy(np.ascontiguousarray(self.counts_LE, dtype=np.int64)),
                    "mass": torch.from_numpy(np.ascontiguousarray(self.mass_LE, dtype=np.float32)),
                    "example_counts": torch.from_numpy(np.ascontiguousarray(self.example_counts_NLE, dtype=np.int32)),
                    "example_mass": torch.from_numpy(np.ascontiguousarray(self.example_mass_NLE, dtype=np.float32)),
                    "example_tokens": torch.from_numpy(np.ascontiguousarray(self.example_tokens_N, dtype=np.int64)),
                    "layer_ids": torch.tensor(self.layer_ids, dtype=torch.int64),
                },
                {"format": "moe-sieve-profile", "format_version": str(PROFILE_FORMAT_VERSION)},
            )
            meta = {
                "format": "moe-sieve-profile",
                "format_version": PROFILE_FORMAT_VERSION,
                "tool_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **self.metadata,
                "layer_ids": list(self.layer_ids),
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "examples": self.num_examples,
                "tokens": self.tokens,
                "fingerprint": self.fingerprint,
            }
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        self.metadata = meta
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        path = Path(path)
        tensors_path, meta_path = path / TENSORS_FILE, path / METADATA_FILE
        if not path.is_dir() or not tensors_path.exists() or not meta_path.exists():
            raise FileNotFoundError(
                f"{path} is not a moe-sieve profile directory (expected {TENSORS_FILE} and {METADATA_FILE}); "
                "create one with `moe-sieve profile`"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path}: invalid JSON ({err})") from err
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path}: not a moe-sieve profile (a JSON {type(meta).__name__}, not an object)")
        version = meta.get("format_version")
        if meta.get("format") != "moe-sieve-profile" or version != PROFILE_FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: not a moe-sieve profile of format version {PROFILE_FORMAT_VERSION} "
                f"(format={meta.get('format')!r}, version={version!r})"
            )
        missing_keys = [key for key in ("layer_ids", "num_experts", "top_k") if key not in meta]
        if missing_keys:
            raise ValueError(f"{meta_path}: missing keys {missing_keys}")
        tensors = read_safetensors(tensors_path)
        needed = ("counts", "mass", "example_counts", "example_mass", "example_tokens", "layer_ids")
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise ValueError(f"{tensors_path}: missing tensors {missing}")
        counts = tensors["counts"].numpy()
        if counts.shape != (len(meta["layer_ids"]), meta["num_experts"]):
            raise ValueError(f"{tensors_path}: counts of shape {counts.shape} disagree with {meta_path}")
        return cls(
            counts_LE=counts,
            mass_LE=tensors["mass"].numpy(),
            example_counts_NLE=tensors["example_counts"].numpy(),
            example_mass_NLE=tensors["example_mass"].numpy(),
            example_tokens_N=tensors["example_tokens"].numpy(),
            layer_ids=[int(i) for i in tensors["layer_ids"].tolist()],
            num_experts=int(meta["num_experts"]),
            top_k=int(meta["top_k"]),
            metadata=meta,
        )
