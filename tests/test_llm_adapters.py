"""LLM-Adapters formats: Commonsense170K / Math50K training rows, the 14 test sets, answer parsing."""

from __future__ import annotations

import json

import pytest
import torch

from moe_sieve.data.llm_adapters import COMMONSENSE_LABELS, MATH_SETS, accuracy, extract_answer, is_correct
from moe_sieve.data.tasks import TASKS, load_examples
from moe_sieve.modeling import default_model_path

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


# --- evaluation: moe_sieve.evaluation.llm_adapters ---------------------------------------------------------------
#
# The reference below re-implements LLM-Adapters' own scoring, independently of moe_sieve (read from
# github.com/AGI-Edgerunners/LLM-Adapters, commonsense_evaluate.py and evaluate.py): decode prompt + generation,
# keep ``split("### Response:")[1].strip()``, parse per data set, compare.


def _reference_prompt(instruction: str) -> str:
    # generate_prompt(instruction, input=None), template text as in the scripts (only its "### Response:" matters)
    return (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        f"\n\n                ### Instruction:\n                {instruction}\n\n                ### Response:\n"
        "                "
    )


def _reference_correct(dataset: str, row: dict, generation: str) -> bool:
    import re

    output = (_reference_prompt(row["instruction"]) + generation).split("### Response:")[1].strip()
    label = row["answer"]
    if isinstance(label, list):  # older releases: a one-element list, read as answer[-1] by that evaluate.py
        label = label[-1]
    if dataset == "AQuA":
        found = re.findall(r"A|B|C|D|E", output.strip())
        return label == (found[0] if found else "")
    if dataset in ("AddSub", "MultiArith", "SingleEq", "gsm8k", "SVAMP"):
        if isinstance(label, str):
            label = float(label)
        pred = re.findall(r"-?\d+\.?\d*", output.replace(",", ""))
        predict = float(pred[-1]) if pred else float("inf")
        return abs(label - predict) <= 0.001
    patterns = {"boolq": r"true|false", "piqa": r"solution1|solution2", "winogrande": r"option1|option2"}
    found = re.findall(patterns[dataset], output.strip())
    return label == (found[0] if found else "")


# (LLM-Adapters data set name, moe-sieve task, rows, generation per row)
EVAL_CASES = [
    (
        "gsm8k",
        "math-gsm8k",
        [
            {"instruction": "Natalia sold 48 clips, then half as many. How many?", "input": "", "answer": "72"},
            {"instruction": "What is 1,234 + 5?", "input": "", "answer": "1239"},
            {"instruction": "What is 1 + 2?", "input": "", "answer": "3"},
            {"instruction": "What is 4 / 2?", "input": "", "answer": "2.0"},
            {"instruction": "What is 1 - 4.5?", "input": "", "answer": -3.5},
            {"instruction": "What is 10 + 10?", "input": "", "answer": "20"},
        ],
        [
            "A: 48 / 2 = 24. 48 + 24 = 72. The answer is 72.",
            # the run-on next example is kept up to the next "### Response:", so its 5 is the last number
            "The answer is 1,239.\n\n### Instruction:\nfoo 5\n\n### Response:\nThe answer is 1,239.",
            "I do not know.",
            "4 / 2 = 2.0004",
            "1 - 4.5 = -3.5",
            "20 apples, or 19?",
        ],
    ),
    (
        "boolq",
        "commonsense-boolq",
        [
            {"instruction": "is the sky blue?", "input": "", "answer": "true"},
            {"instruction": "is grass red?", "input": "", "answer": "false"},
            {"instruction": "is water wet?", "input": "", "answer": "true"},
            {"instruction": "is fire cold?", "input": "", "answer": "false"},
        ],
        ["the correct answer is true", "the correct answer is true, not false", "True", "false"],
    ),
    (
        "AQuA",
        "math-aqua",
        [
            {"instruction": "60% of 30% of 1400? Answer Choices: (A) 450 (B) 100 (C) 252", "answer": "C"},
            {"instruction": "Units digit of 9^3-7? Answer Choices: (A) 1 (B) 2", "answer": ["B"]},  # old release
            {"instruction": "x? Answer Choices: (A) 1 (B) 2", "input": "", "answer": "B"},
        ],
        ["729 - 7 = 722, so 252 gms.The answer is (C).", "the answer is (B)", "Answer: B"],  # "A" of "Answer"
    ),
]


class _Model(torch.nn.Module):
    """No computation: generation is stubbed (and the likelihood metrics are off); ``generate_completions`` only
    toggles its training mode."""


def _stub(monkeypatch, table: dict[str, str]) -> list[str]:
    from moe_sieve.evaluation import common

    seen: list[str] = []

    def fake(model, tokenizer, prompts, max_new_tokens, stops=()):
        assert stops == ("### Response:",)
        seen.extend(prompts)
        return [table[p] for p in prompts]

    monkeypatch.setattr(common, "_generate", fake)
    return seen


@pytest.mark.parametrize(("dataset", "task", "rows", "generations"), EVAL_CASES, ids=[c[1] for c in EVAL_CASES])
def test_accuracy_matches_llm_adapters_scoring(monkeypatch, tmp_path, dataset, task, rows, generations):
    from moe_sieve.data.llm_adapters import alpaca_prompt
    from moe_sieve.evaluation import evaluate
    from moe_sieve.tiny import byte_level_tokenizer

    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows, indent=4))  # the released layout: one JSON list
    seen = _stub(monkeypatch, {alpaca_prompt(r): g for r, g in zip(rows, generations, strict=True)})
    result = evaluate(
        _Model(), byte_level_tokenizer(), f"{task}:{path}", batch_size=4, progress=False, likelihood=False
    )

    ref = [_reference_correct(dataset, r, g) for r, g in zip(rows, generations, strict=True)]
    assert 0 < sum(ref) < len(rows)  # both outcomes occur, so the comparison can fail
    assert [p["correct"] for p in result.predictions] == ref
    assert result.accuracy == pytest.approx(sum(ref) / len(rows)) and result.n == len(rows)
    assert (result.task, result.metadata["metric"], result.metadata["split"]) == (task, "accuracy", None)
    assert result.metadata["max_new_tokens"] == (32 if task.startswith("commonsense") else 256)  # the scripts'
    assert sorted(seen) == sorted(alpaca_prompt(r) for r in rows)
    assert result.predictions[0]["source"] == f"{path}:0"
    json.loads(json.dumps(result.to_json(), allow_nan=False))  # no inf/nan in the written predictions
    if task == "math-gsm8k":
        assert [p["prediction"] for p in result.predictions][1:3] == [5.0, None]
        assert result.predictions[1]["completion"] == "The answer is 1,239.\n\n### Instruction:\nfoo 5"


def test_eval_data_errors_are_one_line(tmp_path):
    from moe_sieve.evaluation import evaluate, load_task_rows
    from moe_sieve.tiny import byte_level_tokenizer

    for name in ("math50k", "commonsense170k"):
        with pytest.raises(ValueError, match=f"{name} is an LLM-Adapters training mix.*test sets instead"):
            load_task_rows(f"{name}:{tmp_path / 'x.json'}")
    with pytest.raises(ValueError, match="not on the Hugging Face hub; pass math-svamp:PATH"):
        load_task_rows("math-svamp")
    bad = {
        "math-svamp": [{"instruction": "q", "answer": "twelve"}],
        "math-aqua": [{"instruction": "q", "answer": "F"}],
        "commonsense-piqa": [{"instruction": "q", "answer": "solution3"}],
    }
    for task, rows in bad.items():
        path = tmp_path / f"{task}.json"
        path.write_text(json.dumps(rows))
        with pytest.raises(ValueError, match=rf"{path}:0: {task} answer must be"):
            evaluate(_Model(), byte_level_tokenizer(), f"{task}:{path}", progress=False, likelihood=False)


def test_a_dataset_folder_evaluates_its_test_split(monkeypatch, tmp_path):
    """LLM-Adapters keeps dataset/<name>/test.json: the folder reads as its test split; a file is its own split."""
    from moe_sieve.data.llm_adapters import alpaca_prompt
    from moe_sieve.evaluation import evaluate, load_task_rows
    from moe_sieve.tiny import byte_level_tokenizer

    folder = tmp_path / "winogrande"
    folder.mkdir()
    rows = [{"instruction": f"q{i}", "input": "", "output": "", "answer": f"option{1 + i % 2}"} for i in range(3)]
    (folder / "test.json").write_text(json.dumps(rows))
    (folder / "train.json").write_text(json.dumps(rows[:1]))
    task, loaded = load_task_rows(f"commonsense-winogrande:{folder}")
    assert task == "commonsense-winogrande" and [r["answer"] for r in loaded] == [r["answer"] for r in rows]
    _stub(monkeypatch, {alpaca_prompt(r): "option1" for r in rows})
    result = evaluate(
        _Model(), byte_level_tokenizer(), f"commonsense-winogrande:{folder}", progress=False, likelihood=False
    )
    assert result.metadata["split"] == "test" and result.accuracy == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="--split train needs a hub task or a dataset directory"):
        load_task_rows(f"commonsense-winogrande:{folder / 'test.json'}", split="train")


def test_a_sweep_scores_each_test_set_with_the_budget_eval_uses(monkeypatch, tmp_path):
    """A sweep task on an LLM-Adapters test set is scored with LLM-Adapters' own budget (32 commonsense, 256
    math), the one `moe-sieve eval` / ``evaluate`` uses, not a fixed 128; an explicit budget still wins."""
    from types import SimpleNamespace

    from moe_sieve import arch, training
    from moe_sieve.evaluation import common, evaluate, likelihood
    from moe_sieve.sweep import SweepConfig, expand
    from moe_sieve.sweep.pipeline import train_and_evaluate
    from moe_sieve.tiny import byte_level_tokenizer

    budgets: list[int] = []

    def fake_generate(model, tokenizer, prompts, max_new_tokens, stops=()):
        budgets.append(max_new_tokens)
        return ["true"] * len(prompts)

    def fake_score_gold(model, tokenizer, pairs, **kw):
        return [{"gold_logprob": -1.0, "gold_tokens": 1} for _ in pairs]

    monkeypatch.setattr(common, "_generate", fake_generate)
    monkeypatch.setattr(likelihood, "score_gold", fake_score_gold)
    monkeypatch.setattr(training, "train", lambda config, **kw: SimpleNamespace(metrics={}))  # scoring only
    monkeypatch.setattr(arch, "find_moe_layers", lambda model: [])
    tokenizer = byte_level_tokenizer()
    for task, budget in (("commonsense-boolq", 32), ("math-svamp", 256)):
        path = tmp_path / f"{task}.json"
        path.write_text(json.dumps([{"instruction": "q", "input": "", "output": "", "answer": "true"}]))
        if task.startswith("math-"):
            path.write_text(json.dumps([{"instruction": "q", "input": "", "output": "", "answer": "3"}]))
        sweep = {"name": "s", "models": ["m"], "tasks": [{"name": "t", "data": f"{task}:{path}"}]}
        sweep.update(conditions=[{"name": "c"}], seeds=[0])
        for given in (None, 7):
            if given is not None:
                sweep["eval"] = {"max_new_tokens": given}
            spec = expand(SweepConfig.from_dict(sweep, source=str(tmp_path / "s.yaml")), tmp_path / "out")[0]
            budgets.clear()
            _, swept = train_and_evaluate(None, spec.eval, model=_Model(), tokenizer=tokenizer)
            evaluated = evaluate(_Model(), tokenizer, f"{task}:{path}", max_new_tokens=given, progress=False)
            assert budgets == [given or budget] * 2, task
            assert swept.metadata["max_new_tokens"] == evaluated.metadata["max_new_tokens"] == (given or budget)


@pytest.mark.skipif(not (default_model_path() / "model.safetensors").exists(), reason="embedded model not built")
def test_eval_cli_on_the_embedded_model_and_mini_math_task(monkeypatch, capsys, tmp_path):
    """``moe-sieve eval --data math-gsm8k:DIR`` end to end on the embedded model and the mini arithmetic task in the
    LLM-Adapters format; every completion equals an unbatched transformers greedy ``generate`` cut as
    LLM-Adapters cuts it, and the accuracy equals LLM-Adapters' scoring of those generations."""
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_sieve.cli import main
    from moe_sieve.data.llm_adapters import alpaca_prompt
    from moe_sieve.minitasks import SMALL_SIZES, generate_minitasks

    generate_minitasks(tmp_path / "mini", seed=0, sizes=SMALL_SIZES)
    folder = tmp_path / "mini" / "llm-adapters-math"
    out = tmp_path / "eval.json"
    argv = ["moe-sieve", "eval", "--data", f"math-gsm8k:{folder}", "--max-examples", "4", "--batch-size", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--max-new-tokens", "24", "--device", "cpu", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code in (0, None), capsys.readouterr().err
    assert "math-gsm8k: accuracy" in capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = json.loads((folder / "test.json").read_text())[:4]
    assert (result["task"], result["n"], result["metadata"]["split"]) == ("math-gsm8k", 4, "test")

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    generations = []
    for row in rows:
        ids = tokenizer(alpaca_prompt(row), return_tensors="pt")
        with torch.no_grad():
            seq = model.generate(**ids, max_new_tokens=24, do_sample=False, num_beams=1)[0]
        generations.append(tokenizer.decode(seq[ids["input_ids"].shape[1] :], skip_special_tokens=True))
        full = tokenizer.decode(seq, skip_special_tokens=True)
        assert result["predictions"][len(generations) - 1]["completion"] == full.split("### Response:")[1].strip()
    expected = [_reference_correct("gsm8k", row, g) for row, g in zip(rows, generations, strict=True)]
    assert [p["correct"] for p in result["predictions"]] == expected
    assert result["accuracy"] == pytest.approx(sum(expected) / 4)
    assert [p["gold"] for p in result["predictions"]] == [float(r["answer"]) for r in rows]


def test_eval_cli_refuses_a_training_mix_in_one_line_before_loading(monkeypatch, capsys, tmp_path):
    import sys

    from moe_sieve.cli import main

    argv = ["moe-sieve", "eval", "--model", str(tmp_path / "no-model"), "--data", "math50k:x"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code != 0 and len(err.splitlines()) == 1  # the model (a missing path) was never loaded
    assert err.startswith("Error: --data 'math50k:x': math50k is an LLM-Adapters training mix")
