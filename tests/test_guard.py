"""The expert guard: every selected expert that received tokens gets a gradient, no unselected expert trains.

Checked in ``moe-sieve train`` (SieveTrainer), in a hand-written loop over a moe-sieve PEFT model (16-layer OLMoE,
Qwen3-MoE, DeepSeek-V3 fixtures), and against an independent count of routed tokens and of gradients.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import TrainerCallback

from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora
from moe_sieve.adapters.guard import UntrainedExpertError, _contributing_mask, install_expert_guard
from moe_sieve.adapters.sieve.experts import _set_experts_implementation, iter_fused_experts
from moe_sieve.arch import find_moe_layers, get_arch
from moe_sieve.profiling.recorder import RoutingRecorder

from .conftest import build_tiny, small_train_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
SUMMARY = re.compile(r"expert guard checked (\d+) optimizer steps: (\d+) of (\d+) selected experts")


def test_contributing_mask_keeps_positions_whose_prediction_is_supervised():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100], [-100] * 5])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    keep = _contributing_mask({"labels": labels, "attention_mask": mask}).view(3, 5)
    # logits at p predict labels[p + 1] (unshifted causal-LM labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, False, False, False, False], [False] * 5]
    without_labels = _contributing_mask({"attention_mask": mask}).view(3, 5)  # all attended but each row's last
    assert without_labels.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert _contributing_mask({}) is None


def _batch(model, seed=0, batch=4, seq=24):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size - 3, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[:, : seq // 3] = -100  # prompt tokens: no label, but they still feed later predictions
    labels[0, -4:] = -100
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    labels[1, -5:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lm_loss(model, batch):
    """The causal-LM loss computed outside the model (the ModuleList fixture returns logits only)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    labels = batch["labels"][:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(labels.numel(), -1), labels, ignore_index=-100)


def _tokens_per_expert(model, batch):
    """Independent count: moe-sieve's profiler recorder over the batch, at positions with a supervised next token."""
    layers = find_moe_layers(model)
    labels = batch["labels"]
    count_mask = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(labels.shape[0]):
        for p in range(labels.shape[1] - 1):
            count_mask[b, p] = bool(labels[b, p + 1] != -100 and batch["attention_mask"][b, p])
    with RoutingRecorder(layers, get_arch(model)) as recorder, torch.no_grad():
        recorder.begin_batch(count_mask)
        model(**{k: v for k, v in batch.items() if k != "labels"})
        counts_LBE, _ = recorder.end_batch()
    return {layer.layer_id: counts_LBE[i].sum(0) for i, layer in enumerate(layers)}


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_guard_verifies_a_peft_model_in_a_plain_loop_and_catches_an_excluded_expert(family, capsys):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from moe_sieve.adapters.peft_method import SieveConfig

    model = build_tiny(family, layers=16)
    layers = find_moe_layers(model)
    sel = {layer.layer_id: [0, 2, 5] for layer in layers}
    peft_model = get_peft_model(model, SieveConfig(selection=sel, r=4, lora_alpha=8, lora_dropout=0.0, seed=0))
    guard = peft_model.base_model.guard
    batch = _batch(model)
    tokens = _tokens_per_expert(model, batch)
    expected = {(layer, e) for layer, ids in sel.items() for e in ids if tokens[layer][e] > 0}
    assert expected  # the fixture routes real tokens to the selection
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert guard.verified == expected and not guard.active
    match = SUMMARY.search(capsys.readouterr().err)
    assert match and match.groups() == ("2", str(len(expected)), str(len(sel) * 3))

    # an optimizer that leaves one layer's expert adapter out: those experts would silently never train
    model = build_tiny(family, layers=16)
    peft_model = get_peft_model(model, SieveConfig(selection=sel, r=4, lora_alpha=8, lora_dropout=0.0, seed=0))
    victim = layers[3].layer_id
    left_out = f"layers.{victim}.mlp.experts.sieve_lora"
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad and left_out not in n]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    peft_model.train()
    peft_model(**batch).loss.backward()
    for n, p in peft_model.named_parameters():  # what an optimizer that never saw them leaves: no gradient
        if left_out in n:
            p.grad = None
    with pytest.raises(UntrainedExpertError) as err:
        optimizer.step()
    missing = [e for e in sel[victim] if tokens[victim][e] > 0]
    assert str(err.value).startswith(
        f"moe-sieve expert guard, optimizer step 1: layer {victim}: selected experts {missing}"
    )
    assert "not in the optimizer" in str(err.value) and "\n" not in str(err.value)
    peft_model.base_model.guard.remove()


def test_guard_on_modulelist_experts_counts_router_output_and_names_unselected_trainable_experts():
    model = build_tiny("modulelist", layers=4)
    layers = find_moe_layers(model)
    sel = {layer.layer_id: [0, 2, 5] for layer in layers}
    apply_sieve_lora(model, sel, SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=0))
    batch = _batch(model)
    tokens = _tokens_per_expert(model, batch)
    guard = install_expert_guard(model, steps=1)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _lm_loss(model, batch).backward()
    optimizer.step()
    assert guard.verified == {(layer, e) for layer, ids in sel.items() for e in ids if tokens[layer][e] > 0}
    assert guard.verified and not guard.active

    guard = install_expert_guard(model, steps=1)
    victim = layers[-1]
    victim.experts[7].up_proj.weight.requires_grad_(True)  # an unselected expert left trainable
    _lm_loss(model, batch).backward()
    with pytest.raises(
        UntrainedExpertError, match=rf"layer {victim.layer_id}: unselected experts \[7\] have trainable"
    ):
        optimizer.step()
    guard.remove()


def test_guard_names_a_frozen_adapter_and_a_trainable_unselected_expert():
    model = build_tiny("olmoe", layers=16)
    sel = {layer.layer_id: [1, 4] for layer in find_moe_layers(model)}
    apply_sieve_lora(model, sel, SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=0))
    batch = _batch(model)
    guard = install_expert_guard(model, steps=1)
    for p in model.model.layers[5].mlp.experts.sieve_lora.parameters():
        p.requires_grad_(False)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    with pytest.raises(UntrainedExpertError, match=r"layer 5: selected experts \[1, 4\] .* frozen"):
        optimizer.step()
    guard.remove()

    model = build_tiny("olmoe", layers=16)
    apply_sieve_lora(model, sel, SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=0))
    model.model.layers[7].mlp.experts.gate_up_proj.requires_grad_(True)
    guard = install_expert_guard(model, steps=1)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    with pytest.raises(UntrainedExpertError, match=r"layer 7: model.layers.7.mlp.experts.gate_up_proj is trainable"):
        optimizer.step()
    guard.remove()


def test_guard_ignores_other_optimizers_and_eval_forwards():
    model = build_tiny("olmoe")
    apply_sieve_lora(model, {layer.layer_id: [0, 1] for layer in find_moe_layers(model)}, SieveLoraConfig(r=2))
    guard = install_expert_guard(model, steps=1)
    other = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 2)).sum().backward()
    opt.step()  # not this model's optimizer: nothing checked
    assert guard.checked == 0 and guard.active
    with torch.no_grad():
        model.eval()(**_batch(model))
    assert not guard._counts  # evaluation forwards are not training tokens
    guard.remove()


class _BypassAdapters(TrainerCallback):
    """Switch the fused experts back to transformers' own kernel once training starts (adapters bypassed)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for _, experts in iter_fused_experts(model):
            _set_experts_implementation(experts.config, "eager")


def test_train_runs_the_guard_and_stops_when_experts_are_bypassed(tiny_model_dir, copy_digits_jsonl, tmp_path, capsys):
    from moe_sieve.training import train

    config = small_train_config(tiny_model_dir, copy_digits_jsonl, tmp_path / "run", max_steps=2, k=3)
    train(config)
    err = capsys.readouterr().err
    match = SUMMARY.search(err)
    assert match and match.group(1) == "2" and int(match.group(2)) > 0
    assert (tmp_path / "run" / "adapter" / "README.md").is_file()

    bad = small_train_config(tiny_model_dir, copy_digits_jsonl, tmp_path / "bad", max_steps=2, k=3)
    with pytest.raises(UntrainedExpertError, match=r"^moe-sieve expert guard, optimizer step 1: layer 0: .*'eager'"):
        train(bad, callbacks=[_BypassAdapters()])


def test_overhead_benchmark_runs_and_reports_the_ratio(monkeypatch):
    """The benchmark driver end to end at a tiny shape (its numbers here mean nothing; see docs/trl.md)."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import guard_overhead

    result = guard_overhead.main(["--preset", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    assert 0 < result["guard_s"] < result["guarded_step_s"]
    assert result["guard_share_of_step"] == pytest.approx(result["guard_s"] / result["guarded_step_s"])
