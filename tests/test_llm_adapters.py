"""LLM-Adapters formats: Commonsense170K / Math50K training rows, the 14 test sets, answer parsing."""

from __future__ import annotations

import json

import pytest

from moe_sieve.data.llm_adapters import COMMONSENSE_LABELS, MATH_SETS, accuracy, extract_answer, is_correct
from moe_sieve.data.tasks import TASKS, load_examples

TRAIN_ROWS = [
    {
        "instruction": "Please answer the following question with true or false, question: is the sky blue?\n\n"
        "Answer format: true/false",
        "input": "",
        "output": "the correct answer is true",
        "answer": "true",
    },
    {
        "instruction": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
        "May. How many clips did Natalia sell altogether in April and May?",
        "input": "",
        "output": "In May she sold 48 / 2 = 24 clips. Altogether 48 + 24 = 72. The answer is 72.",
        "answer": "72",
    },
    {"instruction": "Add the numbers.", "input": "3 and 4", "output": "3 + 4 = 7", "answer": "7"},
]


def test_all_fourteen_test_sets_and_both_training_mixes_are_registered():
    names = {f"commonsense-{n}" for n in COMMONSENSE_LABELS} | {f"math-{n}" for n in MATH_SETS}
    assert len(names) == 14 and names <= set(TASKS)
    assert {"commonsense170k", "math50k"} <= set(TASKS)


def test_training_file_loads_as_prompt_and_completion(tmp_path):
    path = tmp_path / "commonsense_170k.json"
    path.write_text(json.dumps(TRAIN_ROWS))  # the released files are one JSON list
    examples = load_examples(f"commonsense170k:{path}")
    assert len(examples) == 3
    assert examples[0].prompt.startswith("Below is an instruction that describes a task. Write a response")
    assert examples[0].prompt.endswith("### Response:\n") and examples[0].completion == "the correct answer is true"
    assert "### Input:\n3 and 4\n\n### Response:\n" in examples[2].prompt
    assert examples[2].completion == "3 + 4 = 7"


def test_rows_without_instruction_name_the_row(tmp_path):
    path = tmp_path / "math_50k.json"
    path.write_text(json.dumps([TRAIN_ROWS[1], {"instruction": None, "output": "x"}]))
    with pytest.raises(ValueError, match=r"row 1: missing field 'instruction'"):
        load_examples(f"math50k:{path}")


def test_test_set_rows_fall_back_to_the_answer(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"instruction": "Q?", "input": "", "answer": "option2"}]))
    (example,) = load_examples(f"commonsense-winogrande:{path}")
    assert example.completion == "option2"


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("commonsense-boolq", "the correct answer is false, not true", "false"),
        ("commonsense-piqa", " solution2 ", "solution2"),
        ("commonsense-social_i_qa", "answer3", "answer3"),
        ("commonsense-arc-challenge", "I think answer5", "answer5"),
        ("commonsense-hellaswag", "ending4 ending1", "ending4"),
        ("commonsense-winogrande", "no label here", ""),
        ("math-gsm8k", "She sold 1,234 clips, then 5 more: 1,239", 1239.0),
        ("math-svamp", "The answer is -3.5", -3.5),
        ("math-addsub", "no number", float("inf")),
        ("math-aqua", "the answer is C", "C"),
    ],
)
def test_answer_parsing_follows_llm_adapters(task, text, expected):
    assert extract_answer(task, text) == expected


def test_correctness_and_accuracy():
    assert is_correct("math-multiarith", 72.0004, "72") and not is_correct("math-multiarith", 72.01, "72")
    assert is_correct("math-singleeq", 7.0, 7.0) and not is_correct("math-gsm8k", float("inf"), "3")
    assert is_correct("commonsense-boolq", "true", "true") and not is_correct("commonsense-boolq", "", "true")
    gens = ["the correct answer is option1", "option2", "I cannot tell"]
    assert accuracy("commonsense-winogrande", gens, ["option1", "option1", "option2"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="unknown LLM-Adapters test set"):
        extract_answer("math-foo", "1")
