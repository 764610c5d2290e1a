"""The untrained-token guard: detection, the --train-tokens rows, and their save/load, merge and exports."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_sieve.adapters import (
    SieveLoraConfig,
    apply_sieve_lora,
    export_peft_adapter,
    export_serving_adapter,
    load_sieve_adapter,
    merge_sieve_lora,
    save_sieve_adapter,
)
from moe_sieve.adapters.tokens import (
    TokenRowsEmbedding,
    TokenRowsHead,
    completion_token_counts,
    find_untrained_tokens,
    parse_train_tokens,
    train_token_rows,
)
from moe_sieve.modeling import default_model_path
from moe_sieve.training import TrainConfig

from .conftest import VOCAB, build_tiny, tiny_config

HASH = 5  # '#' in the embedded model's tokenizer
TOKENS = (3, 7, 200)
LORA = SieveLoraConfig(r=4, alpha=8, dropout=0.0, experts="all", tokens=TOKENS)


@pytest.fixture(scope="module")
def embedded():
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _tied_tiny(layers=None):
    config = tiny_config("olmoe")
    config.tie_word_embeddings = True
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _fresh(tied: bool, layers=None):
    return _tied_tiny(layers) if tied else build_tiny("olmoe", layers=layers)


def _ids():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[0, 3], ids[1, 5] = 7, 200  # the trained tokens occur as inputs too
    return ids


def _randomize(model, seed=1):
    """Non-zero values for every trainable tensor (a fresh adapter is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- detection ----------------------------------------------------------------------------------------------------


def test_detection_flags_hash_but_not_frequent_tokens_on_the_embedded_model(embedded):
    model, tokenizer = embedded
    assert model.config.tie_word_embeddings is False
    completions = [
        " 3 + 4 = 7. She has 7 apples.\n#### 7",
        "SELECT count(*) FROM singer WHERE age > 3",
        " pushes the push mower in neat rows across the grass.",
    ]
    labels = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    counts = completion_token_counts(labels)
    found = find_untrained_tokens(model, counts, tokenizer)
    assert [t.token_id for t in found] == [HASH]
    assert found[0].text == "#" and found[0].count == 4
    # Independent reference: numpy norms of the two matrices and their medians.
    emb = model.get_input_embeddings().weight.detach().numpy()
    head = model.get_output_embeddings().weight.detach().numpy()
    emb_n, head_n = np.linalg.norm(emb, axis=1), np.linalg.norm(head, axis=1)
    assert found[0].input_ratio == pytest.approx(emb_n[HASH] / np.median(emb_n), rel=1e-5)
    assert found[0].output_ratio == pytest.approx(head_n[HASH] / np.median(head_n), rel=1e-5)
    assert found[0].input_ratio < 0.5 < found[0].output_ratio  # '#': 0.36 and 0.53 (issue 17: 0.24/0.65, 0.64/1.21)
    for token in set(counts) - {HASH}:  # frequent ordinary tokens: both rows well above the threshold
        assert emb_n[token] / np.median(emb_n) > 0.6 and head_n[token] / np.median(head_n) > 0.6, token
    # every token with a row below half the median is flagged when it is a completion token
    vocab = emb.shape[0]
    everything = find_untrained_tokens(model, range(vocab))
    expected = np.flatnonzero((emb_n < 0.5 * np.median(emb_n)) | (head_n < 0.5 * np.median(head_n)))
    assert sorted(t.token_id for t in everything) == expected.tolist()


def test_detection_finds_zeroed_rows_and_handles_tied_embeddings():
    model = build_tiny("olmoe")  # random init: no row stands out but the pad row (nn.Embedding zeroes padding_idx)
    pad = model.config.pad_token_id
    assert [t.token_id for t in find_untrained_tokens(model, range(VOCAB))] == [pad]
    with torch.no_grad():
        model.model.embed_tokens.weight[17] = 0.0  # Unsloth's case: an all-zero (never trained) row
        model.lm_head.weight[40] *= 0.1
    found = find_untrained_tokens(model, {17: 3, 40: 1, 50: 9})
    assert [(t.token_id, t.count) for t in found] == [(17, 3), (40, 1)]
    assert found[0].input_ratio == 0.0 and found[1].output_ratio == pytest.approx(0.1, rel=0.3)
    tied = _tied_tiny()
    with torch.no_grad():
        tied.model.embed_tokens.weight[17] = 0.0
    (token,) = find_untrained_tokens(tied, [17, 50])
    assert token.token_id == 17 and token.output_ratio is None  # one matrix, checked once


def test_parse_train_tokens(embedded):
    _, tokenizer = embedded
    vocab = 2048
    assert parse_train_tokens("none", tokenizer, [HASH], vocab) == []
    assert parse_train_tokens("auto", tokenizer, [HASH, 9], vocab) == [HASH, 9]
    plus = tokenizer(" 42", add_special_tokens=False)["input_ids"]
    assert parse_train_tokens("auto, 42 ,<|endoftext|>,#,Ġ42", tokenizer, [HASH], vocab) == sorted(
        {HASH, 42, tokenizer.eos_token_id, *plus}
    )
    with pytest.raises(ValueError, match="'SELECT name' is 2 tokens"):
        parse_train_tokens("SELECT name", tokenizer, [], vocab)
    with pytest.raises(ValueError, match=r"outside the vocabulary \(0..2047\)"):
        parse_train_tokens("5000", tokenizer, [], vocab)
    with pytest.raises(ValueError, match="empty item"):
        parse_train_tokens("#,,", tokenizer, [], vocab)
    with pytest.raises(ValueError, match="needs --method sieve"):
        TrainConfig(model="m", data="d", out="o", train_tokens="auto", method="routed", variant="S")
    assert TrainConfig(model="m", data="d", out="o", train_tokens=[5, "#"]).train_tokens == "5,#"


def test_hook_warns_once_and_attaches_only_with_the_option(embedded, capsys):
    _, tokenizer = embedded
    labels = [tokenizer(" 7.\n#### 7", add_special_tokens=False)["input_ids"]] * 3
    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    apply_sieve_lora(model, None, SieveLoraConfig(r=2, alpha=4, experts="none", targets=("attention",)))
    capsys.readouterr()
    assert train_token_rows(model, tokenizer, labels, "none") == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moe-sieve: warning: 1 completion token")
    assert "'#' (id 5) x12" in err[0] and "--train-tokens auto" in err[0]
    assert not any(isinstance(m, TokenRowsEmbedding) for m in model.modules())
    assert train_token_rows(model, tokenizer, labels, "auto") == [HASH]
    err = capsys.readouterr().err
    assert "warning" not in err and "training the embedding and output rows of 1 tokens: '#' (id 5)" in err
    assert model.moe_sieve.config.tokens == (HASH,)
    assert model.moe_sieve.params_by_group()["tokens"] == 2 * 128  # an input and an output row of width 128


# --- the trainable rows -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_rows_start_as_identity_and_get_gradient_only_for_their_tokens(tied):
    model = _fresh(tied)
    ids = _ids()
    base = _logits(model, ids)
    state = apply_sieve_lora(model, None, LORA)
    assert torch.equal(_logits(model, ids), base)  # zero deltas: the model is unchanged
    deltas = {n: p for n, p in model.named_parameters() if n.endswith("token_delta")}
    assert sorted(deltas) == (
        ["model.embed_tokens.token_delta"] if tied else ["lm_head.token_delta", "model.embed_tokens.token_delta"]
    )
    assert state.params_by_group()["tokens"] == sum(p.numel() for p in deltas.values()) == (1 if tied else 2) * 3 * 32
    model.train()
    out = model(ids, labels=ids)
    out.loss.backward()
    present = torch.tensor([bool((ids == t).any()) for t in TOKENS])
    assert present.tolist() == [False, True, True]
    embed_rows = model.model.embed_tokens.token_delta.grad.abs().sum(1) > 0
    if tied:  # the one delta is also the output row, which learns at every position (the softmax pushes every logit)
        assert embed_rows.all()
    else:  # an input row learns only where its token occurs; an output row everywhere
        assert torch.equal(embed_rows, present)
        assert (model.lm_head.token_delta.grad.abs().sum(1) > 0).all()
    # the effective matrices differ from the base ones in the listed rows only
    _randomize(model)
    for module in (model.model.embed_tokens, model.lm_head):
        changed = (module.weight - module.base_layer.weight).abs().sum(1).nonzero().flatten().tolist()
        assert changed == list(TOKENS)


def test_train_cli_warns_then_trains_exactly_the_flagged_rows(monkeypatch, capsys, tmp_path):
    from .test_cli import run_cli

    rng = random.Random(0)
    rows = []
    for _ in range(16):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"prompt": f"What is {a} + {b}?", "completion": f" {a} + {b} = {a + b}.\n#### {a + b}"})
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--data", data, "--max-steps", 2, "--batch-size", 8, "--micro-batch-size", 8, "--r", 2, "--alpha", 4]
    common += ["--device", "cpu", "--strategy", "none", "--monitor-every", 0, "--learning-rate", 1e-2, "--warmup", 0]
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", tmp_path / "plain", *common)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "'#' (id 5)" in warnings[0] and "--train-tokens auto" in warnings[0]
    assert json.loads((tmp_path / "plain" / "adapter" / "adapter_config.json").read_text())["lora"]["tokens"] == []

    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", tmp_path / "fix", "--train-tokens", "auto", *common)
    assert code == 0, err
    assert "warning" not in err
    adapter = tmp_path / "fix" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora"]["tokens"] == [HASH] and config["params_by_group"]["tokens"] == 2 * 128
    metrics = json.loads((tmp_path / "fix" / "metrics.json").read_text())
    assert metrics["trainable_params_by_group"]["tokens"] == 2 * 128
    assert set(load_file(adapter / "adapter.safetensors")) >= {"model.embed_tokens.token_delta", "lm_head.token_delta"}

    base = AutoModelForCausalLM.from_pretrained(default_model_path())
    merged = AutoModelForCausalLM.from_pretrained(default_model_path())
    load_sieve_adapter(merged, adapter)
    merge_sieve_lora(merged)
    for attr in ("get_input_embeddings", "get_output_embeddings"):
        before, after = getattr(base, attr)().weight, getattr(merged, attr)().weight
        changed = (after - before).abs().sum(1).nonzero().flatten().tolist()
        assert changed == [HASH], attr  # the '#' row moved, every other row is the base row


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = build_tiny("olmoe")
    apply_sieve_lora(model, None, LORA)
    _randomize(model)
    ids = _ids()
    want = _logits(model, ids)
    save_sieve_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora"]["tokens"] == list(TOKENS)
    fresh = build_tiny("olmoe")
    state = load_sieve_adapter(fresh, tmp_path / "adapter")
    assert state.config.tokens == TOKENS
    assert torch.equal(_logits(fresh, ids), want)
    generated = fresh.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(
        generated, merge_sieve_lora(model).generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    )


@pytest.mark.parametrize("tied", [False, True])
def test_peft_export_matches_peft_forward_and_merge_matches(tied, tmp_path):
    from peft import PeftModel

    model = _fresh(tied)
    apply_sieve_lora(model, None, LORA)
    _randomize(model)
    ids = _ids()
    want = _logits(model, ids)
    export_peft_adapter(model, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    expected = list(TOKENS) if tied else {"model.embed_tokens": list(TOKENS), "lm_head": list(TOKENS)}
    assert saved["trainable_token_indices"] == expected
    keys = [k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors") if "token_adapter" in k]
    assert len(keys) == (1 if tied else 2) and all(k.endswith("token_adapter.trainable_tokens_delta") for k in keys)
    peft_model = PeftModel.from_pretrained(_fresh(tied), tmp_path / "peft")
    torch.testing.assert_close(_logits(peft_model, ids), want, atol=1e-5, rtol=1e-5)

    merge_sieve_lora(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # added once, still tied
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)


def test_serving_export_refuses_token_rows(tmp_path):
    model = build_tiny("olmoe")
    apply_sieve_lora(model, None, LORA)
    for engine in ("vllm", "sglang"):
        with pytest.raises(ValueError, match=f"^{engine} cannot load trained token rows .*export --format merged"):
            export_serving_adapter(model, tmp_path / engine, engine=engine)
        assert not (tmp_path / engine).exists()


def test_fused_loss_reads_the_effective_head_weight():
    from moe_sieve.training.fused_loss import FusedLinearCrossEntropy, reference_kernel

    model = build_tiny("olmoe")
    apply_sieve_lora(model, None, LORA)
    _randomize(model)
    ids = _ids()
    labels = ids.clone()
    fused = FusedLinearCrossEntropy(reference_kernel).install(model)
    assert isinstance(fused.head, TokenRowsHead)
    model.train()
    out = model(ids, labels=labels)
    torch.testing.assert_close(fused(out, labels), out.loss, atol=1e-5, rtol=1e-5)
    fused.remove()


def test_sixteen_layers_train_save_merge(tmp_path):
    """Depth changes nothing for the rows (they sit outside the layer stack), checked on a 16-layer fixture."""
    model = build_tiny("olmoe", layers=16)
    apply_sieve_lora(model, None, LORA)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    for _ in range(2):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    assert model.model.embed_tokens.token_delta.abs().sum() > 0 and model.lm_head.token_delta.abs().sum() > 0
    want = _logits(model, ids)
    save_sieve_adapter(model, tmp_path / "a")
    fresh = build_tiny("olmoe", layers=16)
    load_sieve_adapter(fresh, tmp_path / "a")
    assert torch.equal(_logits(fresh, ids), want)
    torch.testing.assert_close(_logits(merge_sieve_lora(fresh), ids), want, atol=1e-5, rtol=1e-5)


def test_docs_example_runs(tmp_path, monkeypatch):
    """The Python block of docs/training.md runs as written."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/training.md", "exec"), {})


def test_resume_of_a_run_recorded_before_the_option_existed(tmp_path):
    """A run directory whose config.json predates --train-tokens ran with its default, so it resumes."""
    from moe_sieve.training.rundir import check_run_dir, run_record

    config = TrainConfig(model="m", data="d", out=str(tmp_path / "run"))
    record = run_record(config)
    del record["train"]["train_tokens"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    assert check_run_dir(config, overwrite=False, resume=True) == tmp_path / "run"
    changed = TrainConfig(model="m", data="d", out=str(tmp_path / "run"), train_tokens="auto")
    with pytest.raises(ValueError, match="train_tokens: 'none' -> 'auto'"):
        check_run_dir(changed, overwrite=False, resume=True)
