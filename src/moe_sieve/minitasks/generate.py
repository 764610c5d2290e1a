"""Seeded generator of the mini tasks (GSM8K-, Spider- and HellaSwag-shaped) and of the pretraining corpus.
The arithmetic task is also written in the LLM-Adapters math format (``llm-adapters-math/{split}.json``), so
``train --data math50k:DIR`` and ``eval --data math-gsm8k:DIR`` run on it.

Nothing can be downloaded here, so the repo ships a small OLMoE-architecture model pretrained on corpus
documents and fine-tuned on the three mini tasks. The corpus mixes four domains (arithmetic, SQL, everyday
scenes, prose + Python) so that different domains route to different experts, which is what MoE-Sieve profiles.
The task formats themselves ("Question: ... Answer: ... #### N") are kept out of the corpus, and held-out
(validation/test) task items never appear in it, so fine-tuning has something left to teach.

Every domain draws from its own ``random.Random`` derived from the seed, so changing one domain's generator leaves
the others' files unchanged, and one seed always gives byte-identical files. One module per generator (``arith``,
``spider``, ``hellaswag``, ``facts``, ``corpus``; ``common`` has what they share); this one sizes and writes them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .arith import LLM_ADAPTERS_MATH, arith_problem, llm_adapters_math_row
from .common import GENERATOR_VERSION, SPLITS, Row, domain_rng, number_word, unique_splits, write_jsonl
from .corpus import corpus_docs
from .facts import facts_splits
from .hellaswag import hellaswag_item
from .spider import DATABASES, fill_database, spider_pair, tables_json_entry, write_sqlite

__all__ = ["DEFAULT_SIZES", "GENERATOR_VERSION", "SMALL_SIZES", "generate_minitasks", "main", "number_word"]


DEFAULT_SIZES: dict[str, int] = {
    "arith_train": 2000,
    "arith_validation": 200,
    "arith_test": 200,
    "spider_train": 600,
    "spider_validation": 100,
    "spider_test": 100,
    "hellaswag_train": 1000,
    "hellaswag_validation": 200,
    "hellaswag_test": 200,
    "corpus_train_docs": 34000,
    "corpus_validation_docs": 0,  # 0: 2% of corpus_train_docs
    "facts_n": 400,  # facts/: made-up facts (train x2 templates, test recall, paraphrase); sized in docs/study.md
}
SMALL_SIZES: dict[str, int] = {
    "arith_train": 40,
    "arith_validation": 10,
    "arith_test": 10,
    "spider_train": 40,
    "spider_validation": 10,
    "spider_test": 10,
    "hellaswag_train": 20,
    "hellaswag_validation": 8,
    "hellaswag_test": 8,
    "corpus_train_docs": 400,
    "corpus_validation_docs": 20,
    "facts_n": 24,
}


def _resolve_sizes(sizes: Mapping[str, int] | None) -> dict[str, int]:
    merged = dict(DEFAULT_SIZES)
    for key, value in (sizes or {}).items():
        if key not in DEFAULT_SIZES:
            raise ValueError(f"unknown size {key!r}; known: {', '.join(DEFAULT_SIZES)}")
        if int(value) < (0 if key == "corpus_validation_docs" else 1):
            raise ValueError(f"size {key!r} must be positive, got {value}")
        merged[key] = int(value)
    if merged["corpus_validation_docs"] == 0:
        merged["corpus_validation_docs"] = max(1, round(0.02 * merged["corpus_train_docs"]))
    return merged


def _task_sizes(sizes: Mapping[str, int], task: str) -> dict[str, int]:
    return {split: sizes[f"{task}_{split}"] for split in SPLITS}


def generate_minitasks(out_dir: str | Path, *, seed: int = 0, sizes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Write the three mini tasks, the Spider databases and the pretraining corpus under ``out_dir``.

    ``sizes`` overrides entries of :data:`DEFAULT_SIZES` (``arith_train``, ..., ``corpus_train_docs``).
    Returns ``{"out_dir", "seed", "sizes", "counts", "paths", "corpus_bytes"}``, also written to ``manifest.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sz = _resolve_sizes(sizes)
    counts: dict[str, int] = {}
    paths: dict[str, str] = {}

    def dump(rel: str, rows: Iterable[Row]) -> None:
        counts[rel] = write_jsonl(out / rel, rows)
        paths[rel] = str(out / rel)

    arith_rng = domain_rng(seed, "arith")
    arith = unique_splits(
        lambda: arith_problem(arith_rng), lambda r: r["question"], _task_sizes(sz, "arith"), "arith problems"
    )
    for split in SPLITS:
        dump(f"arith/{split}.jsonl", arith[split])
    for split in SPLITS:  # the same problems in the LLM-Adapters math format (Math50K / math test sets)
        rel = f"{LLM_ADAPTERS_MATH}/{split}.json"
        rows = [llm_adapters_math_row(row) for row in arith[split]]
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        counts[rel], paths[rel] = len(rows), str(out / rel)

    db_rng = domain_rng(seed, "spider-db")
    databases = {db.db_id: (db, fill_database(db_rng, db)) for db in DATABASES}
    spider_rng = domain_rng(seed, "spider")
    db_ids = sorted(databases)

    def spider_row() -> Row:
        db, data = databases[spider_rng.choice(db_ids)]
        question, query = spider_pair(spider_rng, db, data)
        return {"db_id": db.db_id, "question": question, "query": query}

    spider = unique_splits(spider_row, lambda r: r["question"], _task_sizes(sz, "spider"), "spider questions")
    for split in SPLITS:
        dump(f"spider/{split}.jsonl", spider[split])
    tables_path = out / "spider" / "tables.json"
    tables_path.write_text(json.dumps([tables_json_entry(db) for db, _ in databases.values()], indent=1) + "\n")
    paths["spider/tables.json"] = str(tables_path)
    for db_id, (db, data) in databases.items():
        db_path = out / "spider" / "database" / db_id / f"{db_id}.sqlite"
        write_sqlite(db_path, db, data)
        paths[f"spider/database/{db_id}"] = str(db_path)

    hs_rng = domain_rng(seed, "hellaswag")
    hellaswag = unique_splits(
        lambda: hellaswag_item(hs_rng), lambda r: r["ctx"], _task_sizes(sz, "hellaswag"), "scenes"
    )
    for split in SPLITS:
        dump(f"hellaswag/{split}.jsonl", hellaswag[split])

    for split, rows in facts_splits(domain_rng(seed, "facts"), sz["facts_n"]).items():
        dump(f"facts/{split}.jsonl", rows)

    held_sql = {r["question"] for split in ("validation", "test") for r in spider[split]}
    held_ctx = {r["ctx"] for split in ("validation", "test") for r in hellaswag[split]}
    for split in ("train", "validation"):
        rngs = {d: domain_rng(seed, f"corpus-{split}-{d}") for d in ("mix", "arith", "sql", "scene", "prose")}
        n_docs = sz[f"corpus_{split}_docs"]

        dump(f"corpus/{split}.jsonl", corpus_docs(n_docs, rngs, databases, held_sql, held_ctx))
    corpus_bytes = (out / "corpus" / "train.jsonl").stat().st_size

    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "sizes": sz,
        "counts": counts,
        "corpus_train_bytes": corpus_bytes,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    paths["manifest.json"] = str(out / "manifest.json")
    return {
        "out_dir": str(out),
        "seed": seed,
        "sizes": sz,
        "counts": counts,
        "paths": paths,
        "corpus_bytes": corpus_bytes,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the moe-sieve mini tasks and pretraining corpus.")
    parser.add_argument(
        "out_dir",
        help=f"folder to write arith/, {LLM_ADAPTERS_MATH}/, spider/, hellaswag/, facts/, corpus/, manifest.json",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--corpus-docs", type=int, default=None, help="documents in corpus/train.jsonl")
    args = parser.parse_args(argv)
    sizes = dict(SMALL_SIZES) if args.small else {}
    if args.corpus_docs is not None:
        sizes["corpus_train_docs"] = args.corpus_docs
        sizes.setdefault("corpus_validation_docs", 0)
        if not args.small:
            sizes["corpus_validation_docs"] = 0
    result = generate_minitasks(args.out_dir, seed=args.seed, sizes=sizes)
    for rel, n in result["counts"].items():
        print(f"{rel}: {n}")
    print(f"corpus/train.jsonl: {result['corpus_bytes'] / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
