"""Run a small recipe end to end through the CLI and write a manifest of its artifacts' hashes.

    python scripts/golden_recipe.py OUT [--manifest tests/fixtures/golden_recipe.json]

The recipe (embedded model, arithmetic mini task): generate -> profile -> stats -> select -> train (4 steps)
-> eval -> export (peft, vllm, merged). The manifest maps each deterministic artifact to its sha256; JSON files
are hashed after dropping the keys that hold wall time, dates, paths or library versions (``VOLATILE_KEYS``).
A refactor that keeps behaviour must reproduce the manifest byte for byte (tests/test_golden_recipe.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

# Wall time, dates, memory peaks, installed library versions and the offline flag transformers records: all
# else in the JSON artifacts must be reproduced exactly.
VOLATILE_KEYS = {
    "created",
    "peft_version",
    "local_files_only",
    "transformers_version",
    "elapsed_s",
    "tokens_per_s",
    "wall_time_s",
    "train_runtime_s",
    "peak_memory_bytes",
    "monitor_seconds",
    "monitor_share_of_wall",
}
SKIP_NAMES = {".lock", "worker.log", "train.log", "README.md"}


def _scrub(value):
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in sorted(value.items()) if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return value


def digest(path: Path) -> str:
    """sha256 of the file, of its JSON less ``VOLATILE_KEYS``, or of a safetensors file's metadata and tensors
    (safetensors writes its metadata map in no fixed order)."""
    if path.suffix == ".json":
        data = _scrub(json.loads(path.read_text()))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    if path.suffix == ".safetensors":
        import torch
        from safetensors import safe_open

        sha = hashlib.sha256()
        with safe_open(path, "pt") as f:
            sha.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
            for name in sorted(f.keys()):
                tensor = f.get_tensor(name).contiguous()
                sha.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
                sha.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        return sha.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_recipe(out: Path) -> None:
    """The recipe, run inside ``out`` with relative paths (artifacts record paths, fingerprints hash them)."""
    from typer.testing import CliRunner

    from moe_sieve.cli import app
    from moe_sieve.minitasks.generate import generate_minitasks

    out.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(out)
    try:
        generate_minitasks(Path("minitasks"), seed=0, sizes={"corpus_train_docs": 4})
        data = "gsm8k:minitasks/arith"
        adapter = "run/adapter"
        steps = [
            ["profile", "--model", "moe-sieve-default", "--data", data, "--max-examples", "32", "--out", "profile"],
            ["stats", "profile", "--json"],
            ["select", "profile", "--k", "25%", "--out", "selection.json"],
            [
                "train",
                "--model",
                "moe-sieve-default",
                "--data",
                data,
                "--out",
                "run",
                "--max-steps",
                "4",
                "--max-examples",
                "64",
                "--batch-size",
                "4",
                "--micro-batch-size",
                "4",
                "--logging-steps",
                "1",
                "--save-steps",
                "4",
                "--seed",
                "0",
            ],
            [
                "eval",
                "--model",
                "moe-sieve-default",
                "--adapter",
                adapter,
                "--data",
                data,
                "--max-examples",
                "8",
                "--out",
                "eval.json",
            ],
            ["export", adapter, "--format", "peft", "--out", "export-peft"],
            ["export", adapter, "--format", "vllm", "--out", "export-vllm"],
            ["export", adapter, "--format", "merged", "--out", "export-merged"],
        ]
        runner = CliRunner()
        for args in steps:
            result = runner.invoke(app, args)
            if result.exit_code != 0:
                sys.exit(f"golden recipe: `moe-sieve {' '.join(args)}` exited {result.exit_code}:\n{result.output}")
            if args[0] == "stats":
                Path("stats.json").write_text(result.output)
    finally:
        os.chdir(previous)


def manifest(out: Path) -> dict[str, str]:
    files = sorted(p for p in out.rglob("*") if p.is_file() and "minitasks" not in p.parts)
    return {
        str(p.relative_to(out)): digest(p)
        for p in files
        if p.name not in SKIP_NAMES and not any(part.startswith("checkpoint-") for part in p.parts)
    }


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--manifest", type=Path, help="write the manifest here (JSON)")
    args = parser.parse_args(argv)
    run_recipe(args.out)
    hashes = manifest(args.out)
    if args.manifest:
        args.manifest.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    return hashes


if __name__ == "__main__":
    main()
