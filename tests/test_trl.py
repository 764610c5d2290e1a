"""TRL's ``SFTTrainer(peft_config=moe_sieve.SieveConfig(...))`` on the embedded OLMoE: what trains, the router
load-balancing loss, the expert guard, and the docs page's example script (profile -> select -> SFT -> evaluate)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

pytest.importorskip("peft")
trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import moe_sieve  # noqa: E402
from moe_sieve.adapters import SieveLoraConfig, apply_sieve_lora, trainable_parameters  # noqa: E402
from moe_sieve.adapters.guard import UntrainedExpertError  # noqa: E402
from moe_sieve.adapters.sieve.experts import _set_experts_implementation, iter_fused_experts  # noqa: E402
from moe_sieve.arch import find_moe_layers  # noqa: E402
from moe_sieve.modeling import ModelSpec, load_model, load_tokenizer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parent.parent
SELECTION = {layer: [0, 3, 5, 9] for layer in range(4)}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelSpec("moe-sieve-default", device="cpu"))


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(4) for b in range(4)])


def _base():
    return load_model(ModelSpec("moe-sieve-default", device="cpu"))


def _trainer(tmp_path, tokenizer, dataset, config=None, callbacks=(), **args):
    values = dict(
        output_dir=str(tmp_path / "trl"),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    return SFTTrainer(
        model=_base(),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=config or moe_sieve.SieveConfig(selection=SELECTION, r=4, lora_alpha=8, lora_dropout=0.0, seed=0),
        args=SFTConfig(**{**values, **args}),
        callbacks=list(callbacks),
    )


class _Watch(TrainerCallback):
    """Before each optimizer step: which parameters have a non-zero gradient, and the tokens each selected expert
    received (counted by hooks on the experts' routing inputs, at positions whose next token carries a label)."""

    def __init__(self, model):
        self.layers = find_moe_layers(model)
        self.grads: list[set[str]] = []
        self.expert_grads: list[dict[tuple[int, int], bool]] = []
        self.tokens: dict[tuple[int, int], int] = {}
        self.params_after: list[dict[str, torch.Tensor]] = []
        self.labels = None
        model.register_forward_pre_hook(self._labels, with_kwargs=True)
        for layer in self.layers:
            layer.experts.register_forward_pre_hook(self._count(layer.layer_id), with_kwargs=True)

    def _labels(self, module, args, kwargs):
        if module.training:
            labels = kwargs["labels"]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = labels[:, 1:] != -100
            self.labels = keep.reshape(-1)

    def _count(self, layer_id):
        def hook(module, args, kwargs):
            if module.training and torch.is_grad_enabled():
                index = args[1] if len(args) > 1 else kwargs["top_k_index"]
                for t, row in enumerate(index.reshape(index.shape[0], -1).tolist()):
                    for e in row:
                        if self.labels[t]:
                            self.tokens[(layer_id, e)] = self.tokens.get((layer_id, e), 0) + 1

        return hook

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0})
        flags = {}
        for layer in self.layers:
            lora = layer.experts.sieve_lora.current()
            grad_n = torch.stack([p.grad.reshape(lora.num_selected, -1).abs().amax(1) for p in lora.parameters()])
            for slot, expert in enumerate(lora.selected_experts):
                flags[(layer.layer_id, expert)] = bool(grad_n[:, slot].max() > 0)
        self.expert_grads.append(flags)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.params_after.append({n: p.detach().clone() for n, p in model.named_parameters()})


def test_sft_trainer_trains_exactly_the_sieve_parameters(tmp_path, tokenizer, dataset):
    trainer = _trainer(tmp_path, tokenizer, dataset)
    watch = _Watch(trainer.model.get_base_model())
    trainer.add_callback(watch)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    native = _base()
    state = apply_sieve_lora(native, SELECTION, SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=0))
    strip = {
        n: n.removeprefix("base_model.model.").replace(".default", "").replace(".lora_experts", "") for n in trainable
    }
    assert set(strip.values()) == set(trainable_parameters(native))
    assert trainer.model.get_nb_trainable_parameters()[0] == state.trainable_params
    trainer.train()

    first = {n for n, p in watch.params_after[0].items() if not torch.equal(p, before[n])}
    assert first == watch.grads[0] and first <= trainable  # one step moves exactly what got a gradient
    assert {n for n in trainable if ".lora_B." in n or n.endswith("_B")} <= first  # every B factor (A waits on B)
    last = {n for n, p in watch.params_after[-1].items() if not torch.equal(p, before[n])}
    assert last == trainable  # two steps: every adapter factor and nothing else
    with_tokens = {key for key, count in watch.tokens.items() if key[1] in SELECTION[key[0]] and count > 0}
    assert with_tokens and all(watch.expert_grads[0][key] for key in with_tokens)


def _aux_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "router load-balancing loss" in line]


def test_router_aux_loss_follows_the_explicit_choice(tmp_path, tokenizer, dataset, capsys):
    off = _trainer(tmp_path, tokenizer, dataset)  # SieveConfig's default 0.0 with TRL's default (use the config's)
    assert not off.aux_loss_enabled and off.model.config.router_aux_loss_coef == 0.0
    config = moe_sieve.SieveConfig(selection=SELECTION, r=4, lora_alpha=8, router_aux_loss_coef=0.02)
    on = _trainer(tmp_path, tokenizer, dataset, config)
    assert on.aux_loss_enabled and on.router_aux_loss_coef == 0.02

    leave = moe_sieve.SieveConfig(selection=SELECTION, r=4, lora_alpha=8, router_aux_loss_coef=None)
    trl_default = _trainer(tmp_path, tokenizer, dataset, leave, max_steps=1)
    assert trl_default.aux_loss_enabled and trl_default.router_aux_loss_coef == 0.01  # the model config's value
    capsys.readouterr()
    trl_default.train()
    lines = _aux_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "turned on the router load-balancing loss (coefficient 0.01)" in lines[0]
    assert "SFTConfig(router_aux_loss_coef=0.0)" in lines[0]
    assert trl_default.model.unload().config.router_aux_loss_coef == 0.01  # unload gives the config back

    overridden = _trainer(tmp_path, tokenizer, dataset, config, max_steps=1, router_aux_loss_coef=0.0)
    overridden.train()
    lines = _aux_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "asks for the router load-balancing loss but the trainer turned it off" in lines[0]


class _BypassAdapters(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for _, experts in iter_fused_experts(model):
            _set_experts_implementation(experts.config, "eager")


def test_guard_stops_trl_training_when_the_experts_bypass_their_adapters(tmp_path, tokenizer, dataset):
    trainer = _trainer(tmp_path, tokenizer, dataset, callbacks=[_BypassAdapters()])
    with pytest.raises(UntrainedExpertError) as err:
        trainer.train()
    message = str(err.value)
    assert re.match(
        r"moe-sieve expert guard, optimizer step 1: layer \d+: selected experts \[[\d, ]+\] received", message
    )
    assert "'eager' implementation" in message and "\n" not in message


def test_docs_example_runs_profile_select_sft_evaluate(tmp_path, monkeypatch):
    from moe_sieve.minitasks.generate import generate_minitasks

    generate_minitasks(tmp_path / "mt", seed=0, sizes={"corpus_train_docs": 2, "arith_train": 48, "arith_test": 8})
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    sys.modules.pop("trl_olmoe", None)
    import trl_olmoe

    out = tmp_path / "run"
    summary = trl_olmoe.main(
        ["--model", "moe-sieve-default", "--data", f"gsm8k:{tmp_path / 'mt' / 'arith'}", "--out", str(out)]
        + ["--k", "4", "--profile-examples", "16", "--train-examples", "32", "--eval-examples", "4"]
        + ["--max-steps", "2", "--batch-size", "8", "--r", "4", "--device", "cpu"]
    )
    assert summary["steps"] == 2 and summary["n"] == 4
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MOE_SIEVE" and set(saved["selection"]) == {"0", "1", "2", "3"}
    card = (out / "adapter" / "README.md").read_text()
    assert "| gsm8k | accuracy |" in card and "- optimizer steps: 2" in card
    assert "- mean coverage of the profiled routing:" in card and "n/a" not in card.split("## Selection")[1][:400]


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "deepseek_v3"])
def test_sft_trainer_on_16_layer_families(family, tmp_path, byte_tokenizer, capsys):
    from .conftest import build_tiny

    model = build_tiny(family, layers=16)
    sel = {layer.layer_id: [1, 4, 6] for layer in find_moe_layers(model)}
    rows = [{"prompt": f"copy {a}:", "completion": f" {a}{a}{a}"} for a in range(8)]
    trainer = SFTTrainer(
        model=model,
        train_dataset=Dataset.from_list(rows),
        processing_class=byte_tokenizer,
        peft_config=moe_sieve.SieveConfig(selection=sel, r=4, lora_alpha=8, lora_dropout=0.0, seed=0),
        args=SFTConfig(
            output_dir=str(tmp_path / "trl"),
            max_steps=2,
            per_device_train_batch_size=8,
            learning_rate=1e-2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            gradient_checkpointing=False,
            disable_tqdm=True,
        ),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    native = build_tiny(family, layers=16)
    state = apply_sieve_lora(native, sel, SieveLoraConfig(r=4, alpha=8, dropout=0.0, seed=0))
    assert trainer.model.get_nb_trainable_parameters()[0] == state.trainable_params
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable  # nothing frozen moved
    # every factor moved but the A factors of experts whose B is still 0 (no tokens reached them in step 1)
    assert all(".sieve_lora." in n and n.endswith("_A") for n in trainable - changed)
    guard = trainer.model.base_model.guard
    assert guard.checked == 2 and guard.verified and not guard.active
    assert "expert guard checked 2 optimizer steps" in capsys.readouterr().err
