"""Padding-free packed batches and the fused linear + cross-entropy path equal the padded, plain computation.

The reference is the same examples right-padded (SFTCollator) and the plain full-logits loss, recomputed in
float64 from the model's logits; packed and fused paths must match it to float64 precision.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora
from moe_sieve.data.sft import IGNORE_INDEX, SFTCollator
from moe_sieve.training import fused_loss
from moe_sieve.training.fused_loss import FusedLinearCrossEntropy, choose_fused_ce, reference_kernel
from moe_sieve.training.packing import check_packing, packing_collator, padding_fraction

from .conftest import build_tiny

EXACT_FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v3"]
LENGTHS = (7, 19, 3, 12, 1, 9)


def _features(vocab: int, seed: int = 0, lengths=LENGTHS):
    """SFT rows: a prompt (labels -100) then a completion; one row has a label on its very first token."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab - 3, (n,), generator=gen).tolist()
        prompt = 0 if i == 1 else n // 2
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _adapted(family: str, layers: int | None = None, seed: int = 0):
    """A float64 tiny model with LoRA on attention, router and the experts {0, 3, 5} of every layer, all
    adapter factors random so every gradient is non-zero."""
    if layers is None:
        model = build_tiny(family, seed=seed, experts_implementation="eager")
    else:
        from transformers import AutoModelForCausalLM

        from .conftest import tiny_config

        torch.manual_seed(seed)
        config = tiny_config(family)
        config.num_hidden_layers = layers
        config._experts_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config).eval()
    model = model.double()
    from moe_sieve.arch import find_moe_layers

    selection = {layer.layer_id: [0, 3, 5] for layer in find_moe_layers(model)}
    apply_sieve_lora(model, selection, SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.1)
    return model.train()


def _ce64(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Float64 causal-LM loss summed over label tokens (position t predicts label t + 1), and their count."""
    shift = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).double(), shift, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, int((shift != IGNORE_INDEX).sum())


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False, **kwargs)
    total, count = _ce64(out.logits, batch["labels"])
    (total / count).backward()
    return out, total / count, count, _grads(model)


def test_flattening_layout_restarts_positions_and_cuts_labels(byte_tokenizer):
    rows = _features(259)
    batch = packing_collator(build_tiny("olmoe"))(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: the packed mask is built
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    expected_pos = [p for n in LENGTHS for p in range(n)]
    assert batch["position_ids"][0].tolist() == expected_pos
    labels = batch["labels"][0].tolist()
    assert all(labels[s] == IGNORE_INDEX for s in starts)  # no example predicts the next one's first token
    flat = [lab for row in rows for lab in [IGNORE_INDEX, *row["labels"][1:]]]
    assert labels == flat


@pytest.mark.parametrize("family", EXACT_FAMILIES)
def test_packed_loss_and_adapter_gradients_equal_padded(family):
    model = _adapted(family)
    rows = _features(259, seed=1)
    padded = SFTCollator(pad_token_id=258)(rows)
    packed = packing_collator(model)(rows)
    out_pad, loss_pad, n_pad, grads_pad = _run(
        model, {k: v for k, v in padded.items() if k != "labels"} | {"labels": padded["labels"]}
    )
    out_pack, loss_pack, n_pack, grads_pack = _run(model, dict(packed))
    assert n_pad == n_pack == sum(sum(t != IGNORE_INDEX for t in r["labels"][1:]) for r in rows)
    # the logits of every real token agree
    offset = 0
    for b, n in enumerate(LENGTHS):
        torch.testing.assert_close(out_pack.logits[0, offset : offset + n], out_pad.logits[b, :n], rtol=0, atol=1e-10)
        offset += n
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-12, atol=0)
    assert grads_pad.keys() == grads_pack.keys() and len(grads_pad) > 0
    for name in grads_pad:
        assert grads_pad[name].abs().max() > 0, name
        torch.testing.assert_close(grads_pack[name], grads_pad[name], rtol=1e-9, atol=1e-12, msg=name)
    # the model's own loss (transformers upcasts logits to float32) with Trainer's item count agrees too
    with torch.no_grad():
        own_pad = model(**padded, use_cache=False, num_items_in_batch=torch.tensor(n_pad)).loss
        own_pack = model(**packed, use_cache=False, num_items_in_batch=torch.tensor(n_pack)).loss
    torch.testing.assert_close(own_pack, own_pad, rtol=1e-6, atol=0)
    torch.testing.assert_close(own_pad.double(), loss_pad.detach(), rtol=1e-6, atol=0)


def test_routed_r_adapters_with_their_aux_loss_equal_padded():
    """Routed-PEFT R masks padding out of its adapter-router load-balancing loss; packed rows have none."""
    from moe_sieve.adapters.routed import RoutedAdapterConfig, apply_routed_adapters

    model = build_tiny("qwen2_moe", experts_implementation="eager").double()
    cfg = RoutedAdapterConfig(variant="R", r=2, dropout=0.0, num_adapters=4, top_k=2, aux_loss_coef=0.5)
    apply_routed_adapters(model, None, cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.1)
    model.train()
    rows = _features(259, seed=6)
    results = []
    for batch in (SFTCollator(pad_token_id=258)(rows), packing_collator(model)(rows)):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, use_cache=False).loss  # cross-entropy + 0.5 x R's aux loss (added by a hook)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (loss_pad, grads_pad), (loss_pack, grads_pack) = results
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-6, atol=0)
    for name in grads_pad:
        torch.testing.assert_close(grads_pack[name], grads_pad[name], rtol=1e-5, atol=1e-9, msg=name)


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_packed_load_balancing_loss_equals_padded_one(family):
    """transformers masks padding out of the router aux loss; packed rows have none, so the values agree."""
    model = _adapted(family)
    rows = _features(259, seed=2)
    padded, packed = SFTCollator(pad_token_id=258)(rows), packing_collator(model)(rows)
    with torch.no_grad():
        aux_pad = model(**padded, use_cache=False, output_router_logits=True).aux_loss
        aux_pack = model(**packed, use_cache=False, output_router_logits=True).aux_loss
    torch.testing.assert_close(aux_pack.double(), aux_pad.double(), rtol=1e-6, atol=0)


def test_packed_equals_padded_at_depth_16():
    model = _adapted("olmoe", layers=16)
    rows = _features(259, seed=3, lengths=(31, 5, 17, 24))
    padded = SFTCollator(pad_token_id=258)(rows)
    _, loss_pad, _, grads_pad = _run(model, dict(padded))
    _, loss_pack, _, grads_pack = _run(model, dict(packing_collator(model)(rows)))
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-12, atol=0)
    assert len(grads_pad) > 16 * 3
    for name in grads_pad:
        torch.testing.assert_close(grads_pack[name], grads_pad[name], rtol=1e-9, atol=1e-12, msg=name)


def test_packed_equals_padded_with_eager_attention():
    """Eager attention takes its softmax in float32 even for a float64 model, so both layouts agree to that."""
    model = _adapted("qwen3_moe")
    model.set_attn_implementation("eager")
    rows = _features(259, seed=8)
    _, loss_pad, _, grads_pad = _run(model, dict(SFTCollator(pad_token_id=258)(rows)))
    _, loss_pack, _, grads_pack = _run(model, dict(packing_collator(model)(rows)))
    torch.testing.assert_close(loss_pack, loss_pad, rtol=1e-6, atol=0)
    for name in grads_pad:
        torch.testing.assert_close(grads_pack[name], grads_pad[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("family, why", [("gpt_oss", "without position_ids"), ("modulelist", "remote code")])
def test_families_whose_packed_forward_leaks_are_refused(family, why):
    model = build_tiny(family) if family == "modulelist" else build_tiny(family, experts_implementation="eager")
    rows = _features(259, seed=4, lengths=(6, 8))
    with torch.no_grad():
        packed = model(**packing_collator(model)(rows), use_cache=False).logits[0, 6:]
        alone = model(input_ids=torch.tensor([rows[1]["input_ids"]]), use_cache=False).logits[0]
    assert (packed - alone).abs().max() > 1e-3  # the second example sees the first: packing would be wrong
    with pytest.raises(ValueError, match=why) as err:
        check_packing(model)
    assert "\n" not in str(err.value) and "--packing" in str(err.value)


def test_supported_families_pass_the_packing_check():
    for family in EXACT_FAMILIES:
        check_packing(build_tiny(family))


def test_padding_fraction_counts_padded_positions():
    assert padding_fraction([4, 4, 4], 3) == 0.0
    assert padding_fraction([2, 4, 3, 1], 2) == pytest.approx(1 - 10 / 14)  # widths 4 and 3
    assert padding_fraction([3, 5], 2, pad_to_multiple_of=8) == pytest.approx(1 - 8 / 16)


# --- fused linear + cross-entropy ------------------------------------------------------------------------


def test_fused_ce_falls_back_on_cpu_with_a_reason_and_refuses_explicit_kernels():
    model = build_tiny("olmoe")
    cpu = torch.device("cpu")
    auto = choose_fused_ce("auto", model, cpu)
    assert auto.backend is None and "plain" in auto.line and "cpu" in auto.line
    assert choose_fused_ce("off", model, cpu).backend is None
    for name in ("liger", "cce"):
        with pytest.raises(ValueError, match=f"--fused-ce {name}: cannot be used because .* on cpu"):
            choose_fused_ce(name, model, cpu)
    with pytest.raises(ValueError, match="--fused-ce must be one of"):
        choose_fused_ce("fast", model, cpu)


def test_fused_ce_selection_on_cuda_follows_what_is_installed():
    model, cuda = build_tiny("olmoe"), torch.device("cuda")  # only the device type is read
    assert choose_fused_ce("auto", model, cuda, available=lambda n: True).backend == "liger"
    assert choose_fused_ce("auto", model, cuda, available=lambda n: n == "cce").backend == "cce"
    none = choose_fused_ce("auto", model, cuda, available=lambda n: False)
    assert none.backend is None and "pip install liger-kernel" in none.line and "cut-cross-entropy" in none.line
    with pytest.raises(ValueError, match="liger_kernel is not installed"):
        choose_fused_ce("liger", model, cuda, available=lambda n: False)
    for kwargs, reason in [
        ({"fsdp": True}, "FSDP"),
        ({"method": "routed"}, "--method routed"),
        ({"router_aux_loss": 0.01}, "--router-aux-loss"),
    ]:
        fallback = choose_fused_ce("auto", model, cuda, available=lambda n: True, **kwargs)
        assert fallback.backend is None and reason in fallback.line
        with pytest.raises(ValueError, match=reason):
            choose_fused_ce("cce", model, cuda, available=lambda n: True, **kwargs)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    with pytest.raises(ValueError, match="bias"):
        choose_fused_ce("cce", model, cuda, available=lambda n: True)
    assert choose_fused_ce("auto", model, cuda, available=lambda n: n == "cce").backend is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in choose_fused_ce("auto", model, cuda, available=lambda n: True).line


def test_config_validates_fused_ce():
    from moe_sieve.training import TrainConfig

    with pytest.raises(ValueError, match="--fused-ce must be one of auto, off, liger, cce"):
        TrainConfig(model="m", data="d", out="o", fused_ce="triton")
    assert TrainConfig(model="m", data="d", out="o").packing is False


@pytest.mark.parametrize("packed", [False, True])
def test_fused_path_equals_full_logits_loss(packed):
    """The integration (hidden-state capture, shift, -100 filter, num_items_in_batch) with the plain kernel
    swapped in gives the full-logits loss and gradients; only one position of logits is computed."""
    model = _adapted("qwen3_moe")
    rows = _features(259, seed=5)
    batch = dict(packing_collator(model)(rows) if packed else SFTCollator(pad_token_id=258)(rows))
    _, loss_ref, count, grads_ref = _run(model, batch)
    fused = FusedLinearCrossEntropy(reference_kernel, "reference").install(model)
    try:
        model.zero_grad(set_to_none=True)
        labels = batch.pop("labels")
        out = model(**batch, use_cache=False, logits_to_keep=1)
        assert out.logits.shape[1] == 1
        loss = fused(out, labels, torch.tensor(count))
        loss.backward()
    finally:
        fused.remove()
    torch.testing.assert_close(loss.detach(), loss_ref.detach(), rtol=1e-12, atol=0)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_liger_import_is_guarded():
    if fused_loss.backend_available("liger"):
        pytest.skip("liger-kernel is installed here")
    with pytest.raises(ImportError):
        FusedLinearCrossEntropy.for_backend("liger")


# --- end to end: `train` --------------------------------------------------------------------------------


def _train(tmp_path, tiny_model_dir, data, name, **overrides):
    from moe_sieve.training import TrainConfig, train

    config = TrainConfig(
        model=str(tiny_model_dir),
        data=str(data),
        out=str(tmp_path / name),
        strategy="topk",
        k="2",
        profile_subsample=0.25,
        dropout=0.0,  # LoRA dropout draws masks of the batch's shape, which differs between layouts
        max_steps=3,
        batch_size=8,
        micro_batch_size=4,
        learning_rate=1e-2,
        warmup=0,
        logging_steps=1,
        save_steps=100,
        monitor_every=0,
        seed=3,
        **overrides,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(config)
    return result, load_file(str(tmp_path / name / "adapter" / "adapter.safetensors"))


def _assert_same_adapter(a, b, atol):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_train_with_packing_gives_the_same_adapter(tmp_path, tiny_model_dir, copy_digits_jsonl):
    plain, adapter_plain = _train(tmp_path, tiny_model_dir, copy_digits_jsonl, "plain")
    packed, adapter_packed = _train(tmp_path, tiny_model_dir, copy_digits_jsonl, "packed", packing=True)
    assert packed.metrics["packing"] is True and plain.metrics["packing"] is False
    assert packed.metrics["tokens_seen"] == plain.metrics["tokens_seen"]  # same real tokens, no padding counted
    losses = [m["train_loss"] for m in (plain.metrics, packed.metrics)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    moved = max((adapter_plain[n].abs().max() for n in adapter_plain if "lora_B" in n or "_B" in n), default=None)
    assert moved is None or moved > 0  # training moved the adapter, so equality is not vacuous
    _assert_same_adapter(adapter_plain, adapter_packed, atol=2e-5)


def test_train_fused_ce_integration_gives_the_same_adapter(tmp_path, tiny_model_dir, copy_digits_jsonl, monkeypatch):
    """``--fused-ce liger`` through Trainer (compute_loss_func, logits_to_keep, gradient accumulation) with the
    plain kernel swapped in for Liger's GPU kernel and the CPU check lifted: same adapter as the plain loss."""
    plain, adapter_plain = _train(tmp_path, tiny_model_dir, copy_digits_jsonl, "plain", fused_ce="off")
    monkeypatch.setitem(fused_loss.KERNELS, "liger", lambda: reference_kernel)
    monkeypatch.setattr(fused_loss, "_obstacle", lambda *a: None)
    monkeypatch.setattr(fused_loss, "backend_available", lambda name: True)
    fused, adapter_fused = _train(tmp_path, tiny_model_dir, copy_digits_jsonl, "fused", fused_ce="liger", packing=True)
    assert fused.metrics["loss_kernel"] == "liger" and plain.metrics["loss_kernel"] == "plain"
    assert fused.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=1e-5)
    _assert_same_adapter(adapter_plain, adapter_fused, atol=2e-5)


# --- command line: refusals are one `Error:` line, before any work -------------------------------------


@pytest.mark.parametrize(
    "family, extra, expected",
    [
        ("gpt_oss", ["--packing"], "--packing: model family 'gpt_oss' (model_type 'gpt_oss') cannot pack exactly"),
        ("olmoe", ["--fused-ce", "liger"], "--fused-ce liger: cannot be used because its kernels are Triton GPU"),
    ],
)
def test_cli_refusals_are_one_error_line(
    family, extra, expected, monkeypatch, capsys, tmp_path, byte_tokenizer, copy_digits_jsonl
):
    import re

    from .test_cli import run_cli

    model_dir = tmp_path / family
    build_tiny(family).save_pretrained(model_dir)
    byte_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    args = ["train", "--model", model_dir, "--data", copy_digits_jsonl, "--out", out, "--max-steps", "1", *extra]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    errors = [line[line.index("Error:") :] for line in re.split(r"[\r\n]+", err) if "Error:" in line]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert not (out / "config.json").exists() and not (out / "profile").exists()  # refused before any work


def test_cli_plain_loss_fallback_is_logged(monkeypatch, capsys, tmp_path, tiny_model_dir, copy_digits_jsonl):
    import json

    from .test_cli import run_cli

    out = tmp_path / "run"
    args = ["train", "--model", tiny_model_dir, "--data", copy_digits_jsonl, "--out", out, "--max-steps", "1"]
    code, _, err = run_cli(monkeypatch, capsys, *args, "--batch-size", "4", "--micro-batch-size", "4", "--packing")
    assert code == 0, err[-2000:]
    assert "moe-sieve: loss: plain cross-entropy on full logits (--fused-ce auto: no fused kernel, its" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["packing"] is True and metrics["loss_kernel"] == "plain"
