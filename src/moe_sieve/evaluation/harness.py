"""Parity with lm-evaluation-harness: run the harness's own GSM8K and HellaSwag definitions and ours on the same
rows of the same model, and compare per example.

The harness reads local rows through task YAMLs written here (``dataset_path: json``), copied from its
``gsm8k.yaml`` and ``hellaswag.yaml`` (0.4.x) with zero-shot prompts; HellaSwag's ``process_docs`` is the
harness's own ``utils.py``, copied next to the YAML, not ours. A sieve adapter reaches the harness as a merged
checkpoint (``moe-sieve merge``) or a PEFT adapter (``moe-sieve export-peft``, ``model_args peft=DIR``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The harness's HFLM encodes without special tokens unless add_bos_token=True; ours encodes the prompt with the
# tokenizer's own (as fine-tuning did), so the harness is run with add_bos_token=True for the same token ids.
HARNESS_MODEL_ARGS = "add_bos_token=True,dtype=float32"

_GSM8K_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore:
      - ","
      - "\\\\$"
      - "(?s).*#### "
      - "\\\\.$"
generation_kwargs:
  until:
    - "Question:"
    - "</s>"
    - "<|im_end|>"
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_new_tokens}
repeats: 1
num_fewshot: 0
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
metadata:
  version: 3.0
"""

_HELLASWAG_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_harness_tasks(
    out_dir: str | Path, *, gsm8k: str | Path | None = None, hellaswag: str | Path | None = None,
    max_new_tokens: int = 128, prefix: str = "sieve",
) -> dict[str, str]:  # fmt: skip
    """Task YAMLs for the harness over local JSONL files in the hub schemas; ``{our task: harness task name}``."""
    import lm_eval.tasks

    out = Path(out_dir)
    names: dict[str, str] = {}
    if gsm8k is not None:
        folder = out / f"{prefix}_gsm8k"
        folder.mkdir(parents=True, exist_ok=True)
        names["gsm8k"] = f"{prefix}_gsm8k"
        text = _GSM8K_YAML.format(
            task=names["gsm8k"], path=json.dumps(str(Path(gsm8k).resolve())), max_new_tokens=max_new_tokens
        )
        (folder / f"{prefix}_gsm8k.yaml").write_text(text)
    if hellaswag is not None:
        folder = out / f"{prefix}_hellaswag"
        folder.mkdir(parents=True, exist_ok=True)
        names["hellaswag"] = f"{prefix}_hellaswag"
        shutil.copy(Path(lm_eval.tasks.__file__).parent / "hellaswag" / "utils.py", folder / "utils.py")
        text = _HELLASWAG_YAML.format(task=names["hellaswag"], path=json.dumps(str(Path(hellaswag).resolve())))
        (folder / f"{prefix}_hellaswag.yaml").write_text(text)
    return names


def run_harness(
    tasks_dir: str | Path, task_names: Sequence[str], *, pretrained: str, peft: str | None = None,
    batch_size: int = 8, limit: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """``lm_eval.simple_evaluate`` (model ``hf``, CPU) on the local tasks; returns its results with samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = f"pretrained={pretrained},{HARNESS_MODEL_ARGS}" + (f",peft={peft}" if peft else "")
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=list(task_names),
        task_manager=TaskManager(include_path=str(tasks_dir)),
        device="cpu",
        batch_size=batch_size,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
    )


def harness_scores(results: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per task: the harness's accuracies and its per-document correctness, in document order."""
    out: dict[str, dict[str, Any]] = {}
    for ours, theirs in names.items():
        metrics = results["results"][theirs]
        samples = sorted(results["samples"][theirs], key=lambda s: s["doc_id"])
        if ours == "gsm8k":
            flexible = [s for s in samples if s["filter"] == "flexible-extract"]
            strict = [s for s in samples if s["filter"] == "strict-match"]
            out[ours] = {
                "accuracy": metrics["exact_match,flexible-extract"],
                "strict_match": metrics["exact_match,strict-match"],
                "correct": [bool(s["exact_match"]) for s in flexible],
                "responses": [s["resps"][0][0] for s in flexible],
                "extracted": [
                    (f["filtered_resps"][0], s["filtered_resps"][0]) for f, s in zip(flexible, strict, strict=True)
                ],
            }
        else:
            out[ours] = {
                "accuracy": metrics["acc,none"],
                "accuracy_norm": metrics["acc_norm,none"],
                "correct": [bool(s["acc_norm"]) for s in samples],
                "logprobs": [[float(r[0][0]) for r in s["resps"]] for s in samples],
            }
    return out


def to_hub_hellaswag(row: Mapping[str, Any], wikihow: bool = False) -> dict[str, Any]:
    """A mini-task HellaSwag row (``ctx`` only) in the hub schema: ``ctx_a``/``ctx_b`` split at the last sentence,
    ``ctx_b`` lower-cased as the hub stores it; ``wikihow`` adds the WikiHow markup the hub's WikiHow rows carry
    (``[header]``, ``[title]``, ``[step]``, ``[substeps]``, double spaces)."""
    ctx = str(row["ctx"])
    cut = ctx.rfind(". ")
    ctx_a, ctx_b = (ctx[: cut + 1], ctx[cut + 2 :]) if cut != -1 else (ctx, "")
    ctx_b = ctx_b[:1].lower() + ctx_b[1:]
    endings = [str(e) for e in row["endings"]]
    if wikihow:
        ctx_a = f"[header] How to {str(row['activity_label']).lower()} [title] {ctx_a}"
        ctx_b = f"[step] {ctx_b}"
        endings = [
            f"{e}  [substeps] Take your time. [title] Check the result." if i % 2 else f"{e} [step]  Repeat if needed."
            for i, e in enumerate(endings)
        ]
    return {
        "activity_label": row["activity_label"],
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}",
        "endings": endings,
        "label": str(row["label"]),
        "split": "val",
    }


def write_jsonl(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def compare(
    model_path: str, *, gsm8k: str | Path | None, hellaswag: str | Path | None, work_dir: str | Path,
    peft: str | None = None, max_new_tokens: int = 128, batch_size: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """Ours and the harness's accuracies on the same rows of ``model_path`` (+ ``peft``), with the documents
    where the two disagree (none expected)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import load_task_rows
    from .gsm8k import evaluate_gsm8k, normalise_answer
    from .hellaswag import evaluate_hellaswag

    names = write_harness_tasks(work_dir, gsm8k=gsm8k, hellaswag=hellaswag, max_new_tokens=max_new_tokens)
    theirs = harness_scores(
        run_harness(work_dir, list(names.values()), pretrained=model_path, peft=peft, batch_size=batch_size), names
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if peft:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    report: dict[str, Any] = {"model": model_path, "peft": peft}
    for task, path in (("gsm8k", gsm8k), ("hellaswag", hellaswag)):
        if path is None:
            continue
        _, rows = load_task_rows(f"{task}:{path}")
        if task == "gsm8k":
            ours = evaluate_gsm8k(
                model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False
            )
            ours_scores = {"accuracy": ours.accuracy, "strict_match": ours.metadata["strict_match"]}
        else:
            ours = evaluate_hellaswag(model, tokenizer, rows, batch_size=batch_size, progress=False)
            ours_scores = {"accuracy": ours.accuracy, "accuracy_norm": ours.accuracy_norm}
        correct = [bool(p["correct"]) for p in ours.predictions]
        report[task] = {
            "n": len(rows),
            "ours": ours_scores,
            "harness": {k: v for k, v in theirs[task].items() if "accuracy" in k or "match" in k},
            "disagree": [i for i, (a, b) in enumerate(zip(correct, theirs[task]["correct"], strict=True)) if a != b],
        }
        if task == "gsm8k":  # the extracted strings themselves, so that agreement does not hinge on the golds
            mine = [(p["prediction"] or "[invalid]", p["prediction_strict"] or "[invalid]") for p in ours.predictions]
            report[task]["extracted"] = {
                "ours": mine,
                "harness": [(normalise_answer(a), normalise_answer(b)) for a, b in theirs[task]["extracted"]],
            }
            report[task]["completions"] = {
                "ours": [p["completion"] for p in ours.predictions],
                "harness": theirs[task]["responses"],
            }
        else:
            theirs_lp = theirs[task]["logprobs"]
            report[task]["max_logprob_diff"] = max(
                abs(a - b)
                for p, t in zip(ours.predictions, theirs_lp, strict=True)
                for a, b in zip(p["logprobs"], t, strict=True)
            )
    return report


def merged_for_harness(adapter: str | Path, out: str | Path, *, model: str | None = None) -> Path:
    """The merged transformers checkpoint (+ tokenizer) of ``adapter`` (``moe-sieve merge ADAPTER --out OUT``),
    which the harness loads with ``--model hf --model_args pretrained=OUT``."""
    from ..adapters import merge_adapter

    return merge_adapter(adapter, out, model=model)
