"""The seven extra calibration datasets of §3, each read from rows written in its hub schema."""

import json

import datasets
import pytest

from moe_sieve.data.hub_tasks import CALIBRATION_TASKS
from moe_sieve.data.tasks import TASKS, load_examples

# Rows copied in the layout the hub datasets have (field names, types and nesting), shortened.
ARC_ROWS = [
    {
        "id": "Mercury_SC_415702",
        "question": "George wants to warm his hands quickly by rubbing them. "
        "Which skin surface will produce the most heat?",
        "choices": {
            "text": ["dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "A",
    },
    {
        "id": "NYSEDREGENTS_2015_4_8",
        "question": "Which object is the best conductor of electricity?",
        "choices": {
            "text": ["a wax crayon", "a plastic spoon", "a rubber eraser", "an iron nail"],
            "label": list("1234"),
        },
        "answerKey": "4",
    },
]
BOOLQ_ROWS = [
    {"question": "do iran and afghanistan speak the same language", "answer": True, "passage": "Persian is spoken."},
    {"question": "is the sun a planet?", "answer": False, "passage": "The Sun is the star at the centre."},
]
PIQA_ROWS = [
    {
        "goal": "To separate egg whites from the yolk",
        "sol1": "Squeeze a bottle over the yolk.",
        "sol2": "Shake.",
        "label": 0,
    },
    {
        "goal": "How do I ready a guinea pig cage?",
        "sol1": "Use shredded paper.",
        "sol2": "Use jeans material.",
        "label": 1,
    },
]
MMLU_ROWS = [
    {
        "question": "Find the degree for the given field extension Q(sqrt(2)) over Q.",
        "subject": "abstract_algebra",
        "choices": ["0", "2", "1", "3"],
        "answer": 1,
    },
    {"question": "What is 2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
]
CODEALPACA_ROWS = [
    {"instruction": "Create an array of length 5 with numbers 0 to 4.", "input": "", "output": "arr = [0, 1, 2, 3, 4]"},
    {"instruction": "Reverse the string.", "input": "s = 'abc'", "output": "s[::-1]"},
]
WIKITEXT_ROWS = [
    {"text": ""},
    {"text": " = Valkyria Chronicles III = \n"},
    {"text": ""},
    {"text": " Senjō no Valkyria 3 is a tactical role @-@ playing video game . \n"},
    {"text": "   "},
]
MBPP_ROWS = [
    {
        "task_id": 601,
        "text": "Write a function to find the longest chain which can be formed from the given set of pairs.",
        "code": "def max_chain_length(arr, n):\n\treturn n",
        "test_list": ["assert max_chain_length([1, 2], 2) == 2", "assert max_chain_length([], 0) == 0"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
]


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_all_ten_calibration_datasets_are_registered_with_hub_ids():
    assert set(CALIBRATION_TASKS) <= set(TASKS)
    hub = {name: (TASKS[name].hub_path, TASKS[name].hub_config) for name in CALIBRATION_TASKS}
    assert hub["arc_challenge"] == ("allenai/ai2_arc", "ARC-Challenge")
    assert hub["boolq"] == ("google/boolq", None)
    assert hub["mmlu"] == ("cais/mmlu", "all")
    assert hub["codealpaca"] == ("sahil2801/CodeAlpaca-20k", None)
    assert hub["wikitext"] == ("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert hub["mbpp"] == ("google-research-datasets/mbpp", "full")
    assert hub["piqa"][0] == "baber/piqa"


def test_arc_from_parquet_keeps_nested_choices(tmp_path):
    path = tmp_path / "arc.parquet"
    datasets.Dataset.from_list(ARC_ROWS).to_parquet(str(path))
    examples = load_examples(f"arc_challenge:{path}")
    assert examples[0].prompt.startswith("Question: George wants")
    assert "\nA. dry palms\nB. wet palms\nC. palms covered with oil\nD. palms covered with lotion\nAnswer:" in (
        examples[0].prompt
    )
    assert examples[0].completion == " A. dry palms"
    assert examples[1].completion == " 4. an iron nail"
    assert examples[1].source == f"{path}:1"


def test_arc_bad_answer_key_names_row(tmp_path):
    rows = [dict(ARC_ROWS[0], answerKey="E")]
    with pytest.raises(ValueError, match=r"row 0: 'answerKey' 'E' is not one of the choice labels"):
        load_examples(f"arc_challenge:{_write(tmp_path / 'arc.jsonl', rows)}")


def test_boolq(tmp_path):
    examples = load_examples(f"boolq:{_write(tmp_path / 'boolq.jsonl', BOOLQ_ROWS)}")
    assert examples[0].prompt == (
        "Persian is spoken.\nQuestion: do iran and afghanistan speak the same language?\nAnswer:"
    )
    assert [e.completion for e in examples] == [" yes", " no"]
    assert examples[1].prompt.endswith("is the sun a planet?\nAnswer:")


def test_piqa_and_unlabelled_test_rows(tmp_path):
    examples = load_examples(f"piqa:{_write(tmp_path / 'piqa.jsonl', PIQA_ROWS)}")
    assert examples[0].prompt == "Goal: To separate egg whites from the yolk\nSolution:"
    assert [e.completion for e in examples] == [" Squeeze a bottle over the yolk.", " Use jeans material."]
    with pytest.raises(ValueError, match=r"row 0: 'label' is -1 \(unlabelled"):
        load_examples(f"piqa:{_write(tmp_path / 'test.jsonl', [dict(PIQA_ROWS[0], label=-1)])}")


def test_mmlu(tmp_path):
    examples = load_examples(f"mmlu:{_write(tmp_path / 'mmlu.jsonl', MMLU_ROWS)}")
    assert examples[0].prompt == (
        "The following is a multiple choice question about abstract algebra.\n"
        "Find the degree for the given field extension Q(sqrt(2)) over Q.\nA. 0\nB. 2\nC. 1\nD. 3\nAnswer:"
    )
    assert examples[0].completion == " B. 2"
    with pytest.raises(ValueError, match=r"row 0: 'answer' 4 is outside 0..3"):
        load_examples(f"mmlu:{_write(tmp_path / 'bad.jsonl', [dict(MMLU_ROWS[0], answer=4)])}")


def test_codealpaca_with_and_without_input(tmp_path):
    examples = load_examples(f"codealpaca:{_write(tmp_path / 'ca.jsonl', CODEALPACA_ROWS)}")
    assert examples[0].prompt == "### Instruction:\nCreate an array of length 5 with numbers 0 to 4.\n\n### Response:\n"
    assert examples[1].prompt == "### Instruction:\nReverse the string.\n\n### Input:\ns = 'abc'\n\n### Response:\n"
    assert examples[1].completion == "s[::-1]"


def test_wikitext_skips_blank_lines_and_keeps_row_numbers(tmp_path):
    path = _write(tmp_path / "wiki.jsonl", WIKITEXT_ROWS)
    examples = load_examples(f"wikitext:{path}")
    assert [(e.prompt, e.source) for e in examples] == [("", f"{path}:1"), ("", f"{path}:3")]
    assert examples[0].completion == " = Valkyria Chronicles III = \n"
    assert len(load_examples(f"wikitext:{path}", max_examples=1)) == 1
    with pytest.raises(ValueError, match="no examples .every 'text' is blank"):
        load_examples(f"wikitext:{_write(tmp_path / 'blank.jsonl', [{'text': ''}, {'text': ' '}])}")


def test_mbpp(tmp_path):
    (example,) = load_examples(f"mbpp:{_write(tmp_path / 'mbpp.jsonl', MBPP_ROWS)}")
    assert example.prompt == (
        "You are an expert Python programmer, and here is your task: Write a function to find the longest chain "
        "which can be formed from the given set of pairs. Your code should pass these tests:\n\n"
        "assert max_chain_length([1, 2], 2) == 2\nassert max_chain_length([], 0) == 0\n"
    )
    assert example.completion.startswith("def max_chain_length")


@pytest.mark.parametrize(
    "name,rows,split,config",
    [
        ("arc_challenge", ARC_ROWS, "train", "ARC-Challenge"),
        ("mmlu", MMLU_ROWS, "test", "all"),
        ("wikitext", WIKITEXT_ROWS, "train", "wikitext-2-raw-v1"),
        ("mbpp", MBPP_ROWS, "train", "full"),
    ],
)
def test_hub_path_config_and_default_split(monkeypatch, name, rows, split, config):
    calls = []

    def fake_load_dataset(path, name=None, *, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples(name)
    assert calls == [(TASKS[name].hub_path, config, split)]
    assert examples[0].source.startswith(f"{TASKS[name].hub_path}[{split}]:")
