"""Calibration data: task formatting from local files in hub schema, loader errors, tokenisation, batching."""

import json

import datasets
import pytest
import torch

from moe_sieve.data.calibration import (
    TokenizedExample,
    count_mask,
    make_batches,
    pad_token_id_for,
    tokenize_example,
)
from moe_sieve.data.tasks import TASKS, Example, get_task, load_examples, render_spider_schema

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "What is 4 times 6?", "answer": "4 * 6 = 24\n#### 24"},
    {"question": "Half of 10?", "answer": "10 / 2 = 5\n#### 5"},
]

HELLASWAG_ROWS = [
    {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car.",
        "ctx_b": "a woman wearing winter clothes smiles.",
        "ctx": "Then, the man writes over the snow covering the window of a car. "
        "A woman wearing winter clothes smiles.",
        "endings": [
            ", the man adds wax.",
            ". then, a person is skiing.",
            ", the man puts on a hat.",
            ". the end",
        ],
        "label": "3",
    },
    {
        "activity_label": "Baking cookies",
        "ctx_a": "A woman mixes dough in a bowl.",
        "ctx_b": "she",
        "endings": ["drives away.", "puts the tray in the oven.", "sings.", "sleeps."],
        "label": 1,
    },
]

TABLES = [
    {
        "db_id": "concert_singer",
        "table_names_original": ["stadium", "concert"],
        "column_names_original": [
            [-1, "*"],
            [0, "Stadium_ID"],
            [0, "Name"],
            [1, "concert_ID"],
            [1, "Stadium_ID"],
        ],
        "column_types": ["text", "number", "text", "number", "number"],
        "primary_keys": [1, 3],
        "foreign_keys": [[4, 1]],
    },
    {
        "db_id": "pets",
        "table_names_original": ["Pets"],
        "column_names_original": [[-1, "*"], [0, "PetID"], [0, "pet age"]],
        "column_types": ["text", "number", "number"],
        "primary_keys": [],
        "foreign_keys": [],
    },
]

SPIDER_ROWS = [
    {
        "db_id": "concert_singer",
        "question": "How many stadiums are there?",
        "query": "SELECT count(*) FROM stadium",
    },
    {"db_id": "pets", "question": "Oldest pet?", "query": 'SELECT max("pet age") FROM Pets'},
]

CONCERT_SCHEMA = (
    "CREATE TABLE stadium (Stadium_ID number, Name text, PRIMARY KEY (Stadium_ID));\n"
    "CREATE TABLE concert (concert_ID number, Stadium_ID number, PRIMARY KEY (concert_ID), "
    "FOREIGN KEY (Stadium_ID) REFERENCES stadium(Stadium_ID));"
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE without merges (one token per byte) plus bos/eos/pad: offline and exact to decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


# --- tasks ------------------------------------------------------------------------------------------------


def test_registry():
    assert {"gsm8k", "hellaswag", "spider"} <= set(TASKS)
    spec = get_task("gsm8k")
    assert (spec.hub_path, spec.hub_config, spec.default_split) == ("openai/gsm8k", "main", "train")
    assert get_task("hellaswag").hub_path == "Rowan/hellaswag"
    assert get_task("spider").hub_path == "xlangai/spider"
    with pytest.raises(ValueError, match="unknown task 'squad'.*gsm8k, hellaswag"):
        get_task("squad")


def test_gsm8k_from_local_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)
    examples = load_examples(f"gsm8k:{path}")
    assert examples[0] == Example(
        "Question: Tom has 3 apples and buys 2. How many?\nAnswer:", " 3 + 2 = 5\n#### 5", f"{path}:0"
    )
    assert [e.completion.rsplit("#### ", 1)[1] for e in examples] == ["5", "24", "5"]
    assert examples[2].source == f"{path}:2"


def test_gsm8k_from_parquet_and_csv(tmp_path):
    datasets.Dataset.from_list(GSM8K_ROWS).to_parquet(str(tmp_path / "g.parquet"))
    datasets.Dataset.from_list(GSM8K_ROWS).to_csv(str(tmp_path / "g.csv"), index=False)
    expected = [
        (e.prompt, e.completion) for e in load_examples(f"gsm8k:{write_jsonl(tmp_path / 'g.jsonl', GSM8K_ROWS)}")
    ]
    for name in ("g.parquet", "g.csv"):
        assert [(e.prompt, e.completion) for e in load_examples(f"gsm8k:{tmp_path / name}")] == expected


def test_task_directory_with_splits(tmp_path):
    folder = tmp_path / "gsm8k_local"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", GSM8K_ROWS[:2])
    write_jsonl(folder / "test.jsonl", GSM8K_ROWS[2:])
    train = load_examples(f"gsm8k:{folder}")
    test = load_examples(f"gsm8k:{folder}", split="test")
    assert [e.prompt for e in train] == [f"Question: {r['question']}\nAnswer:" for r in GSM8K_ROWS[:2]]
    assert [e.completion for e in test] == [" 10 / 2 = 5\n#### 5"]
    assert test[0].source == f"{folder}[test]:0"
    with pytest.raises(ValueError, match="split 'validation'"):
        load_examples(f"gsm8k:{folder}", split="validation")


def test_hellaswag_formatting(tmp_path):
    path = write_jsonl(tmp_path / "hs.jsonl", HELLASWAG_ROWS)
    first, second = load_examples(f"hellaswag:{path}")
    assert first.prompt == "Removing ice from car: " + HELLASWAG_ROWS[0]["ctx"]
    assert first.completion == " . the end"
    # No ctx column value: ctx_a + " " + ctx_b.capitalize().
    assert second.prompt == "Baking cookies: A woman mixes dough in a bowl. She"
    assert second.completion == " puts the tray in the oven."


def test_hellaswag_directory_and_bad_labels(tmp_path):
    folder = tmp_path / "hs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", HELLASWAG_ROWS)
    write_jsonl(folder / "test.jsonl", [{**HELLASWAG_ROWS[0], "label": ""}])
    assert len(load_examples(f"hellaswag:{folder}")) == 2
    with pytest.raises(ValueError, match=r"\[test\] row 0: empty 'label'"):
        load_examples(f"hellaswag:{folder}", split="test")
    bad = write_jsonl(tmp_path / "bad.jsonl", [HELLASWAG_ROWS[1], {**HELLASWAG_ROWS[1], "label": 4}])
    with pytest.raises(ValueError, match=r"bad.jsonl row 1: 'label' 4 is outside 0..3"):
        load_examples(f"hellaswag:{bad}")


def test_spider_schema_rendering():
    assert render_spider_schema(TABLES[0]) == CONCERT_SCHEMA
    assert render_spider_schema(TABLES[1]) == 'CREATE TABLE Pets (PetID number, "pet age" number);'


def test_spider_formatting(tmp_path):
    spider_dir = tmp_path / "spider"
    spider_dir.mkdir()
    (spider_dir / "tables.json").write_text(json.dumps(TABLES))
    rows = write_jsonl(tmp_path / "dev.jsonl", SPIDER_ROWS)
    first, second = load_examples(f"spider:{rows}", spider_dir=str(spider_dir))
    assert first.prompt == (
        f"-- Database: concert_singer\n{CONCERT_SCHEMA}\n-- Question: How many stadiums are there?\n-- SQL:\n"
    )
    assert first.completion == "SELECT count(*) FROM stadium"
    assert second.prompt.startswith('-- Database: pets\nCREATE TABLE Pets (PetID number, "pet age" number);\n')

    # Spider's release keeps tables.json next to its rows: found without spider_dir.
    write_jsonl(spider_dir / "train.jsonl", SPIDER_ROWS)
    assert load_examples(f"spider:{spider_dir}")[0] == Example(first.prompt, first.completion, f"{spider_dir}[train]:0")

    with pytest.raises(ValueError, match="--spider-dir"):
        load_examples(f"spider:{rows}")
    with pytest.raises(ValueError, match="--spider-dir"):
        load_examples("spider")
    with pytest.raises(FileNotFoundError, match="tables.json"):
        load_examples(f"spider:{rows}", spider_dir=str(tmp_path))
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [SPIDER_ROWS[0], {**SPIDER_ROWS[1], "db_id": "flights"}])
    with pytest.raises(ValueError, match=r"unknown.jsonl row 1: db_id 'flights' is not in .*tables.json"):
        load_examples(f"spider:{unknown}", spider_dir=str(spider_dir))


def test_hub_loading_arguments_and_offline_hint(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, *, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(GSM8K_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("gsm8k", max_examples=2)
    assert calls == [("openai/gsm8k", "main", "train")]
    assert [e.source for e in examples] == ["openai/gsm8k[train]:0", "openai/gsm8k[train]:1"]
    load_examples("gsm8k", split="test")
    assert calls[-1] == ("openai/gsm8k", "main", "test")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"Rowan/hellaswag\[validation\].*pass hellaswag:PATH"):
        load_examples("hellaswag", split="validation")


def test_missing_field_names_row_and_field(tmp_path):
    rows = [GSM8K_ROWS[0], {"question": "no answer here"}]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    with pytest.raises(ValueError, match=r"g.jsonl row 1: missing field 'answer'"):
        load_examples(f"gsm8k:{path}")
    nowhere = write_jsonl(tmp_path / "q.jsonl", [{"question": "a"}, {"question": "b"}])
    with pytest.raises(ValueError, match=r"q.jsonl row 0: missing field 'answer'"):
        load_examples(f"gsm8k:{nowhere}")


def test_generic_jsonl(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "plain words"}\n\n{"prompt": "Q:", "completion": " A", "id": 7}\n')
    assert load_examples(str(path)) == [
        Example("", "plain words", f"{path}:1"),
        Example("Q:", " A", f"{path}:3"),
    ]


def test_generic_jsonl_errors(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
        load_examples(str(bad_json))
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "ok"}, {"prompt": "only a prompt"}])
    with pytest.raises(ValueError, match=r"wrong.jsonl:2: missing field 'completion'.*'text', or 'prompt' and"):
        load_examples(str(wrong))
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match=r"other.jsonl:1: missing field 'text'.*found: body"):
        load_examples(str(other))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.jsonl: no examples"):
        load_examples(str(empty))
    (tmp_path / "empty_task.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty_task.jsonl: no examples"):
        load_examples(f"gsm8k:{tmp_path / 'empty_task.jsonl'}")
    with pytest.raises(ValueError, match="single file"):
        load_examples(str(write_jsonl(tmp_path / "ok.jsonl", [{"text": "ok"}])), split="test")


def test_unknown_data(tmp_path):
    with pytest.raises(ValueError, match=r"'squad'.*gsm8k, hellaswag.*\.jsonl"):
        load_examples("squad")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(f"gsm8k:{tmp_path / 'nope.jsonl'}")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="must be a .jsonl file"):
        load_examples(str(tmp_path / "notes.txt"))


def test_subsample_and_max_examples(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"text": f"row {i}"} for i in range(50)])
    rows = lambda examples: [int(e.completion.split()[1]) for e in examples]  # noqa: E731
    a = rows(load_examples(str(path), subsample=0.2, seed=3))
    assert a == rows(load_examples(str(path), subsample=0.2, seed=3))
    assert len(a) == 10 and a == sorted(a) and len(set(a)) == 10
    assert a != rows(load_examples(str(path), subsample=0.2, seed=4))
    assert len(load_examples(str(path), subsample=0.001)) == 1
    assert rows(load_examples(str(path), subsample=0.2, seed=3, max_examples=4)) == a[:4]
    assert rows(load_examples(str(path), max_examples=3)) == [0, 1, 2]
    assert len(load_examples(str(path), subsample=1.0)) == 50
    # Task data follows the same rule, and sources keep the original row numbers.
    task = write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS * 10)
    plain30 = write_jsonl(tmp_path / "p.jsonl", [{"text": f"row {i}"} for i in range(30)])
    picked = load_examples(f"gsm8k:{task}", subsample=0.2, seed=3)
    assert [int(e.source.rsplit(":", 1)[1]) for e in picked] == rows(load_examples(str(plain30), subsample=0.2, seed=3))
    assert [e.prompt for e in picked] == [
        f"Question: {GSM8K_ROWS[i % 3]['question']}\nAnswer:"
        for i in rows(load_examples(str(plain30), subsample=0.2, seed=3))
    ]
    for kwargs, match in [
        ({"subsample": 0.0}, "--subsample"),
        ({"subsample": 1.5}, "--subsample"),
        ({"max_examples": 0}, "--max-examples"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_examples(str(path), **kwargs)


# --- calibration ------------------------------------------------------------------------------------------


def test_tokenize_masks_match_text(tokenizer):
    example = Example("Question: 2 + 3 =", " 5 apples", "mem:0")
    tok = tokenize_example(example, tokenizer, max_length=None)
    assert tok.input_ids[0] == tokenizer.bos_token_id
    prompt_ids = [i for i, c in zip(tok.input_ids, tok.is_completion, strict=True) if not c]
    completion_ids = [i for i, c in zip(tok.input_ids, tok.is_completion, strict=True) if c]
    assert tokenizer.decode(prompt_ids, skip_special_tokens=True) == example.prompt
    assert tokenizer.decode(completion_ids) == example.completion
    # Completion tokens follow the prompt: the mask is a single False run then a True run.
    assert tok.is_completion == [False] * len(prompt_ids) + [True] * len(completion_ids)
    assert count_mask(tok, "prompt") == [not c for c in tok.is_completion]
    assert count_mask(tok, "completion") == tok.is_completion
    assert count_mask(tok, "all") == [True] * len(tok)
    with pytest.raises(ValueError, match="--count-tokens"):
        count_mask(tok, "answer")

    plain = tokenize_example(Example("", "just text", "mem:1"), tokenizer, max_length=None)
    assert plain.input_ids[0] == tokenizer.bos_token_id and plain.is_completion[0] is False
    assert tokenizer.decode(plain.input_ids[1:]) == "just text" and all(plain.is_completion[1:])
    assert not plain.has_prompt


def test_truncation_keeps_the_beginning(tokenizer):
    example = Example("abc", "defgh", "mem:0")
    tok = tokenize_example(example, tokenizer, max_length=6)
    assert len(tok.input_ids) == 6
    assert tokenizer.decode(tok.input_ids, skip_special_tokens=True) == "abcde"
    assert tok.is_completion == [False, False, False, False, True, True]
    only_prompt = tokenize_example(example, tokenizer, max_length=2)
    assert only_prompt.is_completion == [False, False]
    with pytest.raises(ValueError, match="--max-length"):
        tokenize_example(example, tokenizer, max_length=0)


def test_empty_tokenization_names_source():
    def no_specials(text, add_special_tokens):
        return {"input_ids": list(text.encode())}

    with pytest.raises(ValueError, match="file.jsonl:4"):
        tokenize_example(Example("", "", "file.jsonl:4"), no_specials, max_length=8)


def test_make_batches_padding_and_order(tokenizer):
    texts = [("Q:", " a"), ("", "a much longer plain text"), ("Prompt", " mid"), ("", "x")]
    tokenized = [tokenize_example(Example(p, c, f"m:{i}"), tokenizer, None) for i, (p, c) in enumerate(texts)]
    pad = pad_token_id_for(tokenizer)
    assert pad == tokenizer.pad_token_id
    batches = make_batches(tokenized, batch_size=3, pad_token_id=pad, count_tokens="completion")
    assert [b.example_index.tolist() for b in batches] == [[1, 2, 0], [3]]
    seen = []
    for batch in batches:
        assert batch.input_ids.dtype == torch.long and batch.count_mask.dtype == torch.bool
        assert batch.num_tokens == int(batch.attention_mask.sum())
        for row, index in enumerate(batch.example_index.tolist()):
            ids = tokenized[index].input_ids
            n = len(ids)
            assert batch.input_ids[row, :n].tolist() == ids
            assert (batch.input_ids[row, n:] == pad).all()
            assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
            assert batch.count_mask[row, :n].tolist() == tokenized[index].is_completion
            assert not batch.count_mask[row, n:].any()
            seen.append(index)
    assert sorted(seen) == [0, 1, 2, 3]
    assert sum(b.num_tokens for b in batches) == sum(len(t) for t in tokenized)

    unsorted = make_batches(tokenized, batch_size=3, pad_token_id=pad, sort_by_length=False)
    assert [b.example_index.tolist() for b in unsorted] == [[0, 1, 2], [3]]
    assert all(b.count_mask.sum() == b.num_tokens for b in unsorted)
    with pytest.raises(ValueError, match="--batch-size"):
        make_batches(tokenized, batch_size=0, pad_token_id=pad)


def test_count_tokens_selecting_nothing(tokenizer):
    plain = [tokenize_example(Example("", t, f"m:{i}"), tokenizer, None) for i, t in enumerate(["one", "two"])]
    with pytest.raises(ValueError, match="--count-tokens prompt.*plain-text"):
        make_batches(plain, batch_size=2, pad_token_id=0, count_tokens="prompt")
    prompts_only = [TokenizedExample([1, 2], [False, False], "m:0")]
    with pytest.raises(ValueError, match="--count-tokens completion selects no tokens"):
        make_batches(prompts_only, batch_size=1, pad_token_id=0, count_tokens="completion")
    assert make_batches(plain, batch_size=2, pad_token_id=0, count_tokens="completion")[0].count_mask.any()


def test_pad_token_id_fallbacks():
    class Tok:
        def __init__(self, pad, eos):
            self.pad_token_id, self.eos_token_id = pad, eos

    assert pad_token_id_for(Tok(5, 7)) == 5
    assert pad_token_id_for(Tok(None, 7)) == 7
    assert pad_token_id_for(Tok(None, [9, 10])) == 9
    assert pad_token_id_for(Tok(None, None)) == 0
