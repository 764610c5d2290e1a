"""The other seven calibration datasets of the paper's profiling study (§3): ARC-Challenge, BoolQ, PIQA, MMLU,
CodeAlpaca, Wikitext and MBPP, each read in its hub schema (or ``TASK:PATH`` for local files in that schema).

They are profiled, not fine-tuned or scored here, so each row becomes the prompt -> completion text a
fine-tuning run on it would see: the question with its options, then the correct answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .tasks import TaskSpec, register_task

_LETTERS = "ABCDEFGHIJ"


def _int_label(value: Any, field: str, n: int) -> int:
    """A 0-based label checked against ``n`` options; hub test splits mark missing labels with -1."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{field!r} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{field!r} is {value} (unlabelled row; hub test splits are unlabelled, use train/validation)")
    if value >= n:
        raise ValueError(f"{field!r} {value} is outside 0..{n - 1} ({n} options)")
    return int(value)


def _options(texts: Sequence[Any], labels: Sequence[str]) -> str:
    return "\n".join(f"{label}. {text}" for label, text in zip(labels, texts, strict=True))


def format_arc(row: Mapping[str, Any]) -> tuple[str, str]:
    """allenai/ai2_arc: ``question``, ``choices`` {``text``, ``label``} and ``answerKey`` (a letter or digit)."""
    choices = row["choices"]
    if not isinstance(choices, Mapping) or "text" not in choices or "label" not in choices:
        raise ValueError(f"'choices' must be a mapping with 'text' and 'label' lists, got {choices!r}")
    texts, labels = list(choices["text"]), [str(label) for label in choices["label"]]
    if not texts or len(texts) != len(labels):
        raise ValueError(f"'choices' has {len(texts)} texts for {len(labels)} labels")
    key = str(row["answerKey"])
    if key not in labels:
        raise ValueError(f"'answerKey' {key!r} is not one of the choice labels {labels}")
    prompt = f"Question: {row['question']}\n{_options(texts, labels)}\nAnswer:"
    return prompt, f" {key}. {texts[labels.index(key)]}"


def format_boolq(row: Mapping[str, Any]) -> tuple[str, str]:
    """google/boolq: ``passage``, ``question`` and a boolean ``answer``."""
    answer = row["answer"]
    if isinstance(answer, str) and answer.lower() in ("true", "false"):
        answer = answer.lower() == "true"
    if not isinstance(answer, (bool, np.bool_)):
        raise ValueError(f"'answer' must be a boolean, got {answer!r}")
    question = str(row["question"]).strip()
    prompt = f"{row['passage']}\nQuestion: {question}{'' if question.endswith('?') else '?'}\nAnswer:"
    return prompt, " yes" if answer else " no"


def format_piqa(row: Mapping[str, Any]) -> tuple[str, str]:
    """PIQA: ``goal``, two solutions ``sol1``/``sol2`` and ``label`` (0 or 1) naming the right one."""
    label = _int_label(row["label"], "label", 2)
    return f"Goal: {row['goal']}\nSolution:", " " + str(row["sol1" if label == 0 else "sol2"])


def format_mmlu(row: Mapping[str, Any]) -> tuple[str, str]:
    """cais/mmlu: ``question``, ``subject``, four ``choices`` and ``answer`` (0-3, the class label A-D)."""
    choices = row["choices"]
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ValueError(f"'choices' must be a non-empty list, got {choices!r}")
    label = _int_label(row["answer"], "answer", len(choices))
    subject = str(row.get("subject") or "").replace("_", " ").strip()
    header = f"The following is a multiple choice question about {subject}.\n" if subject else ""
    prompt = f"{header}{row['question']}\n{_options(choices, _LETTERS[: len(choices)])}\nAnswer:"
    return prompt, f" {_LETTERS[label]}. {choices[label]}"


def format_codealpaca(row: Mapping[str, Any]) -> tuple[str, str]:
    """sahil2801/CodeAlpaca-20k: ``instruction``, optional ``input`` and ``output`` (Alpaca prompt layout)."""
    extra = str(row.get("input") or "").strip()
    prompt = f"### Instruction:\n{row['instruction']}\n\n"
    if extra:
        prompt += f"### Input:\n{extra}\n\n"
    return prompt + "### Response:\n", str(row["output"])


def format_wikitext(row: Mapping[str, Any]) -> tuple[str, str]:
    """Salesforce/wikitext raw: one ``text`` line (a paragraph or a ``= Heading =``) as plain text."""
    return "", str(row["text"])


def format_mbpp(row: Mapping[str, Any]) -> tuple[str, str]:
    """google-research-datasets/mbpp (full): ``text`` (the task), ``test_list`` (asserts) and ``code``."""
    tests = row.get("test_list") or []
    if not isinstance(tests, (list, tuple)):
        raise ValueError(f"'test_list' must be a list of assert statements, got {tests!r}")
    prompt = f"You are an expert Python programmer, and here is your task: {row['text']}"
    if tests:
        prompt += " Your code should pass these tests:\n\n" + "\n".join(str(t) for t in tests)
    return prompt + "\n", str(row["code"])


HUB_TASKS = (
    TaskSpec(
        name="arc_challenge",
        hub_path="allenai/ai2_arc",
        hub_config="ARC-Challenge",
        default_split="train",
        required_fields=("question", "choices", "answerKey"),
        format=format_arc,
        description="ARC-Challenge science questions; completion is the correct option.",
    ),
    TaskSpec(
        name="boolq",
        hub_path="google/boolq",
        hub_config=None,
        default_split="train",
        required_fields=("question", "passage", "answer"),
        format=format_boolq,
        description="Yes/no questions about a passage; completion is yes or no.",
    ),
    TaskSpec(
        name="piqa",
        # The original ybisk/piqa is a loading script, which datasets>=4 no longer runs; this is its parquet
        # copy (same fields), the one lm-evaluation-harness reads.
        hub_path="baber/piqa",
        hub_config=None,
        default_split="train",
        required_fields=("goal", "sol1", "sol2", "label"),
        format=format_piqa,
        description="Physical commonsense: a goal and the right one of two solutions.",
    ),
    TaskSpec(
        name="mmlu",
        hub_path="cais/mmlu",
        hub_config="all",
        # MMLU has no training split of its own (auxiliary_train is other datasets); its 14k test
        # questions are the usual calibration pool.
        default_split="test",
        required_fields=("question", "choices", "answer"),
        format=format_mmlu,
        description="Multiple-choice questions over 57 subjects; completion is the correct option.",
    ),
    TaskSpec(
        name="codealpaca",
        hub_path="sahil2801/CodeAlpaca-20k",
        hub_config=None,
        default_split="train",
        required_fields=("instruction", "output"),
        format=format_codealpaca,
        description="Code instructions; completion is the code answer.",
    ),
    TaskSpec(
        name="wikitext",
        hub_path="Salesforce/wikitext",
        hub_config="wikitext-2-raw-v1",
        default_split="train",
        required_fields=("text",),
        format=format_wikitext,
        description="Wikipedia paragraphs (wikitext-2 raw), plain text; blank lines are skipped.",
        skip_blank="text",
    ),
    TaskSpec(
        name="mbpp",
        hub_path="google-research-datasets/mbpp",
        hub_config="full",
        default_split="train",
        required_fields=("text", "code"),
        format=format_mbpp,
        description="Basic Python problems (374 train); prompt holds the task and its tests, completion the code.",
    ),
)

for _spec in HUB_TASKS:
    register_task(_spec)

CALIBRATION_TASKS = (
    "spider",
    "gsm8k",
    "hellaswag",
    "arc_challenge",
    "boolq",
    "piqa",
    "mmlu",
    "codealpaca",
    "wikitext",
    "mbpp",
)
"""The ten calibration datasets of the paper's §3, in its order."""
