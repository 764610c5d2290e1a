"""A profiling study (paper §3): one model load, one profile per calibration dataset under one directory.

``DIR/profile_set.json`` lists the datasets and ``DIR/<name>/`` holds each profile. A directory of profile
directories without the manifest (e.g. a sweep's ``profiles/``) loads as a set too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from .._io import atomic_dir
from .artifact import METADATA_FILE, Profile
from .profiler import ProfileConfig, run_profile

SET_FILE = "profile_set.json"
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")


def split_data_list(data: str) -> list[str]:
    """``"gsm8k,spider,mbpp:/x/mbpp.jsonl"`` -> its entries; a single entry is a list of one."""
    items = [item.strip() for item in data.split(",")]
    if any(not item for item in items):
        raise ValueError(f"--data {data!r}: empty entry in the comma-separated list")
    return items


def dataset_name(data: str) -> str:
    """Directory name of one dataset's profile: the task name, or a generic file's stem."""
    from ..data.tasks import TASKS

    name, sep, rest = data.partition(":")
    if data in TASKS or (sep and name in TASKS and rest):
        return name
    stem = Path(data).stem
    return stem if _NAME.fullmatch(stem) else re.sub(r"[^A-Za-z0-9_.+-]", "_", stem)


def run_profile_set(
    config: ProfileConfig, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Profile]:
    """Profile each comma-separated entry of ``config.data`` with one model load, written atomically as a set.

    Every dataset is read (and checked) before the model loads, so a bad entry fails fast.
    """
    from ..data.tasks import load_examples
    from ..modeling import load_model, load_tokenizer

    entries = split_data_list(config.data)
    names = [dataset_name(entry) for entry in entries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--data: two entries would both be profiled as {', '.join(repeated)}; list each once")
    for entry in entries:
        load_examples(
            entry,
            split=config.split,
            max_examples=config.max_examples,
            subsample=config.subsample,
            seed=config.seed,
            spider_dir=config.spider_dir,
        )
    model = load_model(config.model_spec)
    tokenizer = load_tokenizer(config.model_spec)
    profiles: dict[str, Profile] = {}
    with atomic_dir(out, overwrite) as tmp:
        for name, entry in zip(names, entries, strict=True):
            one = dataclasses.replace(config, data=entry)
            profiles[name] = run_profile(one, model=model, tokenizer=tokenizer, progress=progress)
            profiles[name].save(tmp / name)
        manifest = {
            "format": "moe-sieve-profile-set",
            "format_version": 1,
            "model": config.model,
            "datasets": [
                {"name": n, "data": e, "examples": p.num_examples, "tokens": p.tokens, "path": n}
                for (n, p), e in zip(profiles.items(), entries, strict=True)
            ],
        }
        (tmp / SET_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return profiles


def is_profile_set(path: str | os.PathLike) -> bool:
    """A directory written by ``profile --data a,b,c`` (it has the set manifest)."""
    return (Path(path) / SET_FILE).is_file()


def load_profile_set(path: str | os.PathLike) -> dict[str, Profile]:
    """The profiles of a set, by dataset name, in manifest order (else sorted by name)."""
    path = Path(path)
    manifest_path = path / SET_FILE
    if manifest_path.is_file():
        try:
            manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
            items = [(d["name"], path / d["path"]) for d in manifest["datasets"]]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{manifest_path}: not a profile-set manifest ({err!r})") from err
    else:
        items = (
            sorted(
                (child.name, child)
                for child in path.iterdir()
                if child.is_dir() and not child.name.startswith(".") and (child / METADATA_FILE).is_file()
            )
            if path.is_dir()
            else []
        )
    if not items:
        raise FileNotFoundError(f"{path} holds no profiles (expected {SET_FILE} or profile directories)")
    return {name: Profile.load(p) for name, p in items}


def shared_equivalents(profile: Profile) -> float | None:
    """Shared experts per layer in routed-expert units; 0 without shared experts, None when unrecorded."""
    model = profile.metadata.get("model", {})
    if "shared_expert_equivalents" in model:
        return float(model["shared_expert_equivalents"])
    return 0.0 if not model.get("shared_experts") else None


def model_id(profile: Profile) -> str:
    return str(profile.metadata.get("model", {}).get("id") or "?")


def profile_stability(
    prof: Profile, k: int | float | str = "25%", fraction: float = 0.1, trials: int = 50, seed: int = 0
) -> dict[str, Any]:
    """Subsample stability of one profile (§3.3), as JSON: how well ``fraction`` of its examples recovers its
    top-k, over ``trials`` seeded draws."""
    from ..routing_stats import resolve_k, subsample_stability

    k_int = resolve_k(k, prof.num_experts)
    return subsample_stability(prof.example_counts_NLE, fraction, k_int, trials=trials, seed=seed).to_json()


def profile_stats(
    prof: Profile,
    k: int | float | str = "25%",
    stability_fraction: float = 0.1,
    stability_trials: int = 50,
    seed: int = 0,
    path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Every §3 statistic of one profile, as ``moe-sieve stats --json`` prints it: the routing skew, the subsample
    stability (unless ``stability_trials`` is 0) and what the profile is (``path``, fingerprint, model, data)."""
    from ..routing_stats import routing_stats

    report = routing_stats(prof.counts_LE, prof.mass_LE, layer_ids=prof.layer_ids, k=k).to_json()
    if stability_trials > 0:
        report["subsample_stability"] = profile_stability(prof, k, stability_fraction, stability_trials, seed)
    report["profile"] = {
        "path": None if path is None else str(path),
        "fingerprint": prof.fingerprint,
        "model": prof.metadata.get("model", {}).get("id"),
        "data": prof.metadata.get("data", {}).get("data"),
        "examples": prof.num_examples,
        "tokens": prof.tokens,
    }
    return report


def set_stats(
    profiles: dict[str, Profile],
    k: int | float | str = "25%",
    stability_fraction: float = 0.1,
    stability_trials: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Every §3 statistic of a profiling study: per dataset, the cross-dataset Jaccard matrix per model and
    the per-model summary of Table 2 (means over datasets; ratio = mean layer CV / mean global CV)."""
    import numpy as np

    from ..routing_stats import coverage_with_shared, jaccard_matrix, routing_stats

    datasets = []
    for name, prof in profiles.items():
        report = routing_stats(prof.counts_LE, prof.mass_LE, layer_ids=prof.layer_ids, k=k).to_json()
        shared = shared_equivalents(prof)
        row: dict[str, Any] = {
            "name": name,
            "model": model_id(prof),
            "examples": prof.num_examples,
            "tokens": prof.tokens,
            "top_k": prof.top_k,
            "shared_expert_equivalents": shared,
            **report,
            "mean_coverage_with_shared": None
            if shared is None
            else float(coverage_with_shared(report["mean_coverage"], shared, prof.top_k)),
        }
        if stability_trials > 0:
            row["subsample_stability"] = profile_stability(prof, k, stability_fraction, stability_trials, seed)
        datasets.append(row)
    models = []
    jaccard = []
    for model in sorted({row["model"] for row in datasets}):
        rows = [row for row in datasets if row["model"] == model]
        names = [row["name"] for row in rows]

        def mean(key: str, rows: list = rows) -> float | None:
            values = [row[key] for row in rows if row.get(key) is not None]
            return float(np.mean(values)) if values else None

        global_cv, layer_cv = mean("global_cv"), mean("mean_layer_cv")
        ratios = [row["ratio"] for row in rows if row["ratio"] is not None]
        stabilities = [row["subsample_stability"]["mean_jaccard"] for row in rows if "subsample_stability" in row]
        models.append(
            {
                "model": model,
                "datasets": names,
                "num_layers": rows[0]["num_layers"],
                "num_experts": rows[0]["num_experts"],
                "k": rows[0]["k"],
                "global_cv": global_cv,
                "layer_cv": layer_cv,
                "ratio": None if not global_cv else layer_cv / global_cv,
                "ratio_range": [min(ratios), max(ratios)] if ratios else None,
                "cold_fraction": mean("mean_cold_fraction"),
                "coverage": mean("mean_coverage"),
                "coverage_with_shared": mean("mean_coverage_with_shared"),
                "entropy": mean("mean_entropy"),
                "count_mass_jaccard": mean("mean_count_mass_jaccard"),
                "subsample_stability": float(np.mean(stabilities)) if stabilities else None,
            }
        )
        k_int = rows[0]["k"]
        matrix = jaccard_matrix([profiles[n].counts_LE for n in names], k_int) if len(names) > 1 else np.ones((1, 1))
        jaccard.append({"model": model, "k": k_int, "names": names, "matrix": matrix.tolist()})
    return {"k_requested": str(k), "datasets": datasets, "models": models, "jaccard": jaccard}
