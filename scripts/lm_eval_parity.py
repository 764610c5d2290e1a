"""Our GSM8K/HellaSwag accuracies against lm-evaluation-harness's on the same rows (docs/evaluation.md "Evaluation parity").

    python scripts/lm_eval_parity.py                         # the embedded model, every small mini-task row
    python scripts/lm_eval_parity.py --adapter runs/x/adapter  # a sieve adapter, merged with `moe-sieve merge`

Writes the mini tasks (moe_sieve.minitasks, small sizes) and their HellaSwag rows in the hub schema, plain and with
WikiHow markup, runs `lm_eval.simple_evaluate` (model hf, CPU, zero-shot local task YAMLs) and our evaluators, and
prints one JSON report per HellaSwag variant; exit status 1 when any accuracy or document differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from moe_sieve.demo import default_model_path
from moe_sieve.evaluation.harness import compare, merged_for_harness, to_hub_hellaswag, write_jsonl
from moe_sieve.minitasks.generate import SMALL_SIZES, generate_minitasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(default_model_path()), help="Base model (default: embedded).")
    parser.add_argument("--adapter", default=None, help="moe-sieve adapter: merged first, then evaluated.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="Write the reports as JSON here.")
    args = parser.parse_args()
    reports, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = args.model
        if args.adapter:
            model = str(merged_for_harness(args.adapter, tmp_path / "merged", model=args.model))
        generate_minitasks(tmp_path / "mini", sizes=SMALL_SIZES)
        rows = [json.loads(line) for line in (tmp_path / "mini/hellaswag/validation.jsonl").read_text().splitlines()]
        for wikihow in (False, True):
            hs = write_jsonl(tmp_path / f"hs_{wikihow}.jsonl", [to_hub_hellaswag(r, wikihow) for r in rows])
            start = time.perf_counter()
            report = compare(
                model, gsm8k=tmp_path / "mini/arith/test.jsonl", hellaswag=hs, work_dir=tmp_path / f"tasks_{wikihow}",
                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            )  # fmt: skip
            report.update(hellaswag_rows="wikihow markup" if wikihow else "plain hub schema",
                          wall_s=round(time.perf_counter() - start, 1), model=args.adapter or args.model)  # fmt: skip
            for task in ("gsm8k", "hellaswag"):
                ok &= report[task]["ours"] == report[task]["harness"] and not report[task]["disagree"]
                report[task].pop("completions", None)
            reports.append(report)
            print(json.dumps({k: v for k, v in report.items()}, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(reports, indent=1, default=str) + "\n")
    print("PARITY OK" if ok else "PARITY FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
