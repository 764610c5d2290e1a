"""SFT data: completion-only labels, the over-long rules and their report, chat JSONL, task files, collation."""

from __future__ import annotations

import json

import pytest
import torch

from moe_sieve.data.sft import (
    IGNORE_INDEX,
    SFTCollator,
    SFTReport,
    build_sft_dataset,
    load_sft_examples,
    tokenize_for_sft,
)
from moe_sieve.data.tasks import Example
from moe_sieve.tiny import byte_level_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def tok():
    return byte_level_tokenizer()


@pytest.fixture
def chat_tok():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def labelled_text(tokenizer, item):
    return tokenizer.decode([t for t in item.labels if t != IGNORE_INDEX])


def chat(*turns):
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# --- tokenize_for_sft -------------------------------------------------------------------------------------


def test_labels_are_masked_exactly_on_prompt_tokens(tok):
    example = Example("Question: 2+2?\nAnswer:", " 4", "mem:0")
    item = tokenize_for_sft(example, tok, 512)
    n_prompt = len(tok(example.prompt)["input_ids"])  # with BOS
    assert item.input_ids[0] == tok.bos_token_id
    assert item.input_ids[-1] == tok.eos_token_id
    assert item.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert item.labels[n_prompt:] == item.input_ids[n_prompt:]
    assert IGNORE_INDEX not in item.labels[n_prompt:]
    assert labelled_text(tok, item) == " 4" + tok.eos_token
    assert item.completion_tokens == len(" 4") + 1 and not item.truncated and item.source == "mem:0"


def test_add_eos_false_and_plain_text(tok):
    item = tokenize_for_sft(Example("", "hello", "mem:0"), tok, 64, add_eos=False)
    assert item.labels == [IGNORE_INDEX] + item.input_ids[1:]  # only BOS is unlabelled
    assert labelled_text(tok, item) == "hello"
    assert tokenize_for_sft(Example("prompt", "", "mem:1"), tok, 64, add_eos=False) is None  # nothing to learn


def test_truncate_and_drop_rules(tok):
    example = Example("abcd", "efghij", "mem:0")  # 1 BOS + 4 + 6 + 1 EOS = 12 tokens
    kept = tokenize_for_sft(example, tok, 8, overflow="truncate")
    assert kept.truncated and len(kept.input_ids) == len(kept.labels) == 8
    assert labelled_text(tok, kept) == "efg"
    assert tokenize_for_sft(example, tok, 8, overflow="drop") is None
    exact = tokenize_for_sft(example, tok, 12, overflow="drop")
    assert exact is not None and not exact.truncated and len(exact.input_ids) == 12


def test_truncation_that_removes_the_whole_completion_drops(tok):
    example = Example("a long prompt", "x", "mem:0")  # BOS + 13 prompt tokens + "x" + EOS = 16
    assert tokenize_for_sft(example, tok, 5, overflow="truncate") is None
    assert tokenize_for_sft(example, tok, 14, overflow="truncate") is None  # exactly the prompt: no loss left
    cut = tokenize_for_sft(example, tok, 15, overflow="truncate")
    assert cut.truncated and labelled_text(tok, cut) == "x"
    assert tokenize_for_sft(example, tok, 16, overflow="truncate").labels[-1] == tok.eos_token_id


def test_bad_rule_arguments(tok):
    example = Example("a", "b", "mem:0")
    with pytest.raises(ValueError, match="overflow must be one of"):
        tokenize_for_sft(example, tok, 8, overflow="wrap")
    with pytest.raises(ValueError, match="max-length"):
        tokenize_for_sft(example, tok, 0)


# --- build_sft_dataset ------------------------------------------------------------------------------------


EXAMPLES = [
    Example("ab", "cd", "data.jsonl:1"),  # 6 tokens with BOS and EOS
    Example("abcdef", "ghij", "data.jsonl:2"),  # 12 tokens
    Example("abcdefghij", "k", "data.jsonl:3"),  # 13 tokens, completion starts at position 11
]


def test_build_report_truncate(tok):
    dataset, report = build_sft_dataset(EXAMPLES, tok, 10, overflow="truncate")
    assert isinstance(report, SFTReport)
    assert (report.total, report.kept, report.truncated, report.dropped) == (3, 2, 1, 1)
    assert report.dropped_sources == ["data.jsonl:3"]
    assert dataset.column_names == ["input_ids", "labels"] and len(dataset) == 2
    assert report.tokens == 6 + 10 and report.completion_tokens == 3 + 3
    assert all(len(row["input_ids"]) == len(row["labels"]) <= 10 for row in dataset)
    assert report.summary().startswith("3 examples: 2 kept, 1 truncated, 1 dropped")
    assert "rule truncate" in report.summary() and "\n" not in report.summary()
    assert json.loads(json.dumps(report.to_json()))["overflow"] == "truncate"


def test_build_report_drop(tok):
    dataset, report = build_sft_dataset(EXAMPLES, tok, 12, overflow="drop")
    assert (report.total, report.kept, report.truncated, report.dropped) == (3, 2, 0, 1)
    assert report.dropped_sources == ["data.jsonl:3"]
    assert report.summary().startswith("3 examples: 2 kept, 0 truncated, 1 dropped (> 12 tokens, rule drop)")
    assert dataset[1]["labels"][-1] == tok.eos_token_id


def test_dropped_sources_are_capped(tok):
    many = [Example("x" * 20, "y", f"big.jsonl:{i}") for i in range(1, 31)] + [Example("", "ok", "big.jsonl:31")]
    _, report = build_sft_dataset(many, tok, 10, overflow="drop")
    assert report.dropped == 30 and len(report.dropped_sources) == 20 and report.dropped_sources[0] == "big.jsonl:1"


def test_empty_after_filter_names_source_and_rule(tok):
    with pytest.raises(ValueError, match=r"data\.jsonl: all 3 examples were dropped .*'drop' at max_length 4"):
        build_sft_dataset(EXAMPLES, tok, 4, overflow="drop")
    with pytest.raises(ValueError, match=r"data\.jsonl: .*'truncate'"):
        build_sft_dataset(EXAMPLES, tok, 2, overflow="truncate")


# --- load_sft_examples ------------------------------------------------------------------------------------


def test_chat_rows_split_prompt_and_completion(tmp_path, chat_tok):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            chat(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")),
            "",
            chat(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "see you")),
        ],
    )
    examples = load_sft_examples(str(path), tokenizer=chat_tok)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]
    assert examples[0].prompt == "<|system|>Be brief.\n<|user|>2+2?\n<|assistant|>"
    assert examples[0].completion == "4\n"
    assert examples[1].prompt.endswith("<|user|>bye\n<|assistant|>") and examples[1].completion == "see you\n"
    item = tokenize_for_sft(examples[1], chat_tok, 256)
    assert labelled_text(chat_tok, item) == "see you\n" + chat_tok.eos_token  # earlier assistant turns: context
    assert len(load_sft_examples(str(path), tokenizer=chat_tok, max_examples=1)) == 1


def test_chat_template_with_bos_and_eos_is_not_doubled(tmp_path):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE.replace("\n{% endfor %}", "{{ eos_token }}{% endfor %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(("user", "q"), ("assistant", "a"))])
    (example,) = load_sft_examples(str(path), tokenizer=tokenizer)
    assert example.completion == "a" + tokenizer.eos_token
    item = tokenize_for_sft(example, tokenizer, 256)
    assert item.input_ids.count(tokenizer.bos_token_id) == 1 and item.input_ids[0] == tokenizer.bos_token_id
    assert item.input_ids[-2:] != [tokenizer.eos_token_id] * 2
    assert labelled_text(tokenizer, item) == "a" + tokenizer.eos_token


def test_chat_last_message_not_assistant(tmp_path, chat_tok):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [chat(("user", "q"), ("assistant", "a")), chat(("user", "q"), ("assistant", "a"), ("user", "again"))],
    )
    with pytest.raises(ValueError, match=rf"{path}:2: the last message must have role 'assistant'"):
        load_sft_examples(str(path), tokenizer=chat_tok)


def test_chat_needs_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(("user", "q"), ("assistant", "a"))])
    with pytest.raises(ValueError, match=rf"{path}: chat 'messages' rows need a chat template"):
        load_sft_examples(str(path), tokenizer=tok)
    with pytest.raises(ValueError, match="need a tokenizer"):
        load_sft_examples(str(path))


def test_chat_template_that_breaks_the_prefix(tmp_path):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "{% if add_generation_prompt %}<|assistant|>", "{% if add_generation_prompt %}<|bot|>"
    )
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(("user", "q"), ("assistant", "a"))])
    with pytest.raises(ValueError, match=rf"{path}:1: the chat template's rendering .* does not start with"):
        load_sft_examples(str(path), tokenizer=tokenizer)


def test_mixed_formats_name_the_line(tmp_path, chat_tok):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [chat(("user", "q"), ("assistant", "a")), {"prompt": "p", "completion": "c"}],
    )
    with pytest.raises(ValueError, match=rf"{path}:2: mixes formats"):
        load_sft_examples(str(path), tokenizer=chat_tok)
    path = write_jsonl(tmp_path / "mixed2.jsonl", [{"text": "t"}, chat(("user", "q"), ("assistant", "a"))])
    with pytest.raises(ValueError, match=rf"{path}:2: mixes formats"):
        load_sft_examples(str(path), tokenizer=chat_tok)
    path = write_jsonl(tmp_path / "both.jsonl", [{**chat(("user", "q"), ("assistant", "a")), "text": "t"}])
    with pytest.raises(ValueError, match=rf"{path}:1: has both 'messages' and 'text'"):
        load_sft_examples(str(path), tokenizer=chat_tok)


def test_plain_jsonl_is_delegated(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "say messages", "completion": ' "messages"'}])
    (example,) = load_sft_examples(str(path), tokenizer=tok)
    assert example == Example("say messages", ' "messages"', f"{path}:1")


def test_gsm8k_local_file(tmp_path, tok):
    rows = [
        {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = 5\n#### 5"},
        {"question": "What is 4 times 6?", "answer": "4 * 6 = 24\n#### 24"},
    ]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    examples = load_sft_examples(f"gsm8k:{path}", tokenizer=tok)
    assert [e.prompt for e in examples] == [f"Question: {r['question']}\nAnswer:" for r in rows]
    assert examples[1].completion == " 4 * 6 = 24\n#### 24"
    dataset, report = build_sft_dataset(examples, tok, 256)
    assert report.kept == 2 and report.dropped == 0
    item = tokenize_for_sft(examples[0], tok, 256)
    assert dataset[0]["labels"] == item.labels
    assert labelled_text(tok, item) == " 3 + 2 = 5\n#### 5" + tok.eos_token


# --- collator ---------------------------------------------------------------------------------------------


def test_collator_pads_right_and_masks(tok):
    dataset, _ = build_sft_dataset(EXAMPLES[:2], tok, 64)
    features = [dataset[0], dataset[1]]
    batch = SFTCollator(tok)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape == (2, 12)
    n = len(features[0]["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == features[0]["input_ids"]
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert batch["labels"][0, n:].eq(IGNORE_INDEX).all() and batch["labels"][0, :n].tolist() == features[0]["labels"]
    assert batch["attention_mask"].tolist() == [[1] * n + [0] * (12 - n), [1] * 12]

    padded = SFTCollator(tok, pad_to_multiple_of=8)(features)
    assert padded["input_ids"].shape == (2, 16) and padded["attention_mask"][1, 12:].eq(0).all()


def test_collator_pad_id_fallbacks(tok):
    features = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    assert SFTCollator(tok).pad_token_id == tok.pad_token_id
    tok.pad_token = None
    assert SFTCollator(tok).pad_token_id == tok.eos_token_id
    batch = SFTCollator()(features)
    assert batch["input_ids"][1].tolist() == [4, 0, 0] and batch["labels"][1].tolist() == [4, -100, -100]
    with pytest.raises(ValueError, match="batch row 0"):
        SFTCollator()([{"input_ids": [1, 2], "labels": [1]}])
