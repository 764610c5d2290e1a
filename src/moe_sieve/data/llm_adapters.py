"""The LLM-Adapters data formats (Hu et al. 2023), as used by Routed-PEFT: Commonsense170K / Math50K training
files and the 8 commonsense + 6 math test sets, registered as tasks, with the reference answer parsing.

Rows are ``{"instruction", "input", "output", "answer"}`` (training files: ``ft-training_set/commonsense_170k.json``
and ``math_50k.json``; test sets: ``dataset/<name>/test.json`` of github.com/AGI-Edgerunners/LLM-Adapters). The
files are not on the Hugging Face hub: pass ``--data NAME:PATH``. Answers are parsed as LLM-Adapters'
``commonsense_evaluate.py`` / ``evaluate.py`` do: the first label word of the task's label set; for math the last
number (commas removed, correct within 0.001), for AQuA the first letter A-E.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .tasks import TaskSpec, register_task

SOURCE = "AGI-Edgerunners/LLM-Adapters"

# LLM-Adapters' Alpaca-style template (finetune.py generate_prompt), split at the response.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# test set -> the label words its answers use (commonsense_evaluate.py extract_answer)
COMMONSENSE_LABELS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "arc-challenge": r"answer1|answer2|answer3|answer4|answer5",
    "arc-easy": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
MATH_SETS: tuple[str, ...] = ("multiarith", "addsub", "singleeq", "gsm8k", "svamp", "aqua")
MATH_TOLERANCE = 0.001


def alpaca_prompt(row: Mapping[str, Any]) -> str:
    instruction = row.get("instruction")
    if instruction is None or not str(instruction).strip():
        raise ValueError("missing field 'instruction'")
    extra = row.get("input")
    if extra:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def format_llm_adapters(row: Mapping[str, Any]) -> tuple[str, str]:
    """Prompt = the template up to ``### Response:``; completion = ``output`` (the test sets: ``answer`` if no
    output is given)."""
    completion = row.get("output")
    if completion is None or not str(completion).strip():
        completion = row.get("answer")
    if completion is None or not str(completion).strip():
        raise ValueError("missing field 'output' (or 'answer')")
    return alpaca_prompt(row), str(completion)


def extract_answer(task: str, text: str) -> str | float:
    """The prediction parsed from generated ``text``: a label word ("" if none), a number (inf if none) or a
    letter ("" if none) for AQuA."""
    name = task.removeprefix("commonsense-").removeprefix("math-").lower()
    if name in COMMONSENSE_LABELS:
        found = re.findall(COMMONSENSE_LABELS[name], text.strip())
        return found[0] if found else ""
    if name == "aqua":
        found = re.findall(r"A|B|C|D|E", text.strip())
        return found[0] if found else ""
    if name in MATH_SETS:
        numbers = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
        return float(numbers[-1]) if numbers else math.inf
    raise ValueError(f"unknown LLM-Adapters test set {task!r}")


def is_correct(task: str, prediction: str | float, gold: Any) -> bool:
    """Commonsense and AQuA: exact label match; math: ``|gold - prediction| <= 0.001``."""
    name = task.removeprefix("commonsense-").removeprefix("math-").lower()
    if name in MATH_SETS and name != "aqua":
        try:
            return abs(float(gold) - float(prediction)) <= MATH_TOLERANCE
        except (TypeError, ValueError):
            return False
    return str(prediction) == str(gold).strip()


def accuracy(task: str, generations: list[str], golds: list[Any]) -> float:
    if len(generations) != len(golds) or not golds:
        raise ValueError(f"{task}: {len(generations)} generations for {len(golds)} gold answers")
    return sum(is_correct(task, extract_answer(task, g), a) for g, a in zip(generations, golds, strict=True)) / len(
        golds
    )


def _register() -> None:
    for name, desc in (
        ("commonsense170k", "LLM-Adapters Commonsense170K training mix (8 commonsense tasks)"),
        ("math50k", "LLM-Adapters Math50K training mix (math word problems with rationales)"),
    ):
        register_task(
            TaskSpec(
                name=name,
                hub_path=SOURCE,
                hub_config=None,
                default_split="train",
                required_fields=("instruction",),
                format=format_llm_adapters,
                description=f"{desc}; instruction/input/output/answer rows, pass {name}:PATH to the JSON file.",
            )
        )
    for name in COMMONSENSE_LABELS:
        register_task(
            TaskSpec(
                name=f"commonsense-{name}",
                hub_path=SOURCE,
                hub_config=None,
                default_split="test",
                required_fields=("instruction", "answer"),
                format=format_llm_adapters,
                description=f"LLM-Adapters {name} test set; answer is one of {COMMONSENSE_LABELS[name]}.",
            )
        )
    for name in MATH_SETS:
        register_task(
            TaskSpec(
                name=f"math-{name}",
                hub_path=SOURCE,
                hub_config=None,
                default_split="test",
                required_fields=("instruction", "answer"),
                format=format_llm_adapters,
                description=f"LLM-Adapters {name} test set; "
                + ("answer is a letter A-E." if name == "aqua" else "answer is a number (tolerance 0.001)."),
            )
        )


_register()
