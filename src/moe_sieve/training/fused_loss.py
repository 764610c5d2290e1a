"""Fused linear + cross-entropy for ``moe-sieve train --fused-ce`` (optional dependency, plain fallback).

The causal-LM head computes ``[tokens, vocab]`` logits (50k-150k columns) that are materialised, upcast to
float32 and kept for backward. Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` and Apple's
cut-cross-entropy compute the loss (and its gradient) from the last hidden states and the head weight in
chunks, so those logits never exist. Both are Triton GPU kernels: on CPU, or when neither package is
installed, the plain loss is used and a log line says so (``auto``); asking for one explicitly fails instead.

How it plugs into ``Trainer``: the model runs with ``logits_to_keep=1`` (its head computes one position), a
forward hook on the decoder keeps the final hidden states, and Trainer's ``compute_loss_func`` hook gets the
loss from the kernel. The reduction is the model's own: summed token losses over Trainer's
``num_items_in_batch`` (label tokens of the whole accumulated batch), labels shifted by one, -100 ignored.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.methods import get_adapter_method

FUSED_CE_CHOICES = ("auto", "off", "liger", "cce")
IGNORE_INDEX = -100
# Packages and the pip names that provide the kernels, in the order ``auto`` tries them.
BACKENDS = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}
# Config attributes that change logits after the head; the kernels here compute plain ``h @ W.T (+ b)``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

# ``kernel(weight [V, D], hidden [N, D], labels [N], bias [V] | None) -> summed loss``.
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _liger_kernel() -> Kernel:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return lambda weight, hidden, labels, bias: loss(weight, hidden, labels, bias)


def _cce_kernel() -> Kernel:
    from cut_cross_entropy import linear_cross_entropy

    def kernel(weight, hidden, labels, bias):
        if bias is not None:
            raise ValueError("cut-cross-entropy takes no output-head bias")
        return linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum")

    return kernel


KERNELS: dict[str, Callable[[], Kernel]] = {"liger": _liger_kernel, "cce": _cce_kernel}


def backend_available(name: str) -> bool:
    return importlib.util.find_spec(BACKENDS[name][0]) is not None


@dataclass(frozen=True)
class FusedCEChoice:
    """The loss ``train`` uses: ``backend`` None is the plain head + cross-entropy; ``line`` says why."""

    backend: str | None
    line: str


def _obstacle(model: Any, device: torch.device, fsdp: bool, method: str, router_aux_loss: float) -> str | None:
    """Why no fused kernel can run here (None: one can)."""
    if device.type != "cuda":
        return f"its kernels are Triton GPU kernels and this run is on {device.type}"
    if fsdp:
        return "under FSDP the head weight is sharded outside the forward"
    if get_adapter_method(method).adds_loss:
        return f"--method {method} adds its adapter loss to the model's own loss"
    if router_aux_loss > 0:
        return "--router-aux-loss adds the load-balancing loss to the model's own loss"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or not hasattr(model, "get_decoder"):
        return f"{type(model).__name__} has no plain linear output head after a decoder"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no logits_to_keep, so its head would build the logits anyway"
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        for name in _LOGIT_TRANSFORMS:
            if cfg is not None and getattr(cfg, name, None) not in (None, 1, 1.0):
                return f"the model transforms its logits ({name}={getattr(cfg, name)})"
    return None


def choose_fused_ce(
    choice: str,
    model: Any,
    device: torch.device,
    *,
    fsdp: bool = False,
    method: str = "sieve",
    router_aux_loss: float = 0.0,
    available: Callable[[str], bool] | None = None,
) -> FusedCEChoice:
    """Resolve ``--fused-ce``: ``auto`` falls back to the plain loss with a reason, ``liger``/``cce`` that
    cannot run raise a one-line ValueError."""
    if choice not in FUSED_CE_CHOICES:
        raise ValueError(f"--fused-ce must be one of {', '.join(FUSED_CE_CHOICES)}, got {choice!r}")
    plain = "plain cross-entropy on full logits"
    if choice == "off":
        return FusedCEChoice(None, f"moe-sieve: loss: {plain} (--fused-ce off)")
    available = available or backend_available
    obstacle = _obstacle(model, device, fsdp, method, router_aux_loss)
    wanted = list(BACKENDS) if choice == "auto" else [choice]
    if obstacle is not None:
        if choice != "auto":
            raise ValueError(f"--fused-ce {choice}: cannot be used because {obstacle}; use --fused-ce auto or off")
        return FusedCEChoice(None, f"moe-sieve: loss: {plain} (--fused-ce auto: no fused kernel, {obstacle})")
    head_bias = getattr(model.get_output_embeddings(), "bias", None) is not None
    for name in wanted:
        if name == "cce" and head_bias:  # cut-cross-entropy's linear_cross_entropy takes no bias
            if choice == "cce":
                raise ValueError("--fused-ce cce: the output head has a bias, which cut-cross-entropy cannot add")
            continue
        if available(name):
            return FusedCEChoice(name, f"moe-sieve: loss: fused linear + cross-entropy ({name}); logits never built")
    installs = " or ".join(f"pip install {BACKENDS[name][1]}" for name in wanted)
    if choice != "auto":
        raise ValueError(f"--fused-ce {choice}: {BACKENDS[choice][0]} is not installed ({installs})")
    return FusedCEChoice(None, f"moe-sieve: loss: {plain} (--fused-ce auto: no kernel installed; {installs})")


class FusedLinearCrossEntropy:
    """Trainer ``compute_loss_func`` computing the causal-LM loss from the decoder's last hidden states.

    ``install(model)`` hooks the decoder; the model must then run with ``logits_to_keep=1`` (SieveTrainer
    adds it) so its head computes a single position instead of the whole vocabulary projection.
    """

    def __init__(self, kernel: Kernel, name: str = "custom"):
        self.kernel = kernel
        self.name = name
        self.head: torch.nn.Linear | None = None
        self._hidden: torch.Tensor | None = None
        self._handle: Any = None

    @classmethod
    def for_backend(cls, backend: str) -> FusedLinearCrossEntropy:
        return cls(KERNELS[backend](), backend)

    def install(self, model: Any) -> FusedLinearCrossEntropy:
        self.head = model.get_output_embeddings()
        decoder = model.get_decoder()

        def keep_hidden(module, args, output):
            if module.training:
                hidden = getattr(output, "last_hidden_state", None)
                self._hidden = hidden if hidden is not None else output[0]

        self._handle = decoder.register_forward_hook(keep_hidden)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        if hidden is None or self.head is None:
            raise RuntimeError("fused cross-entropy: the decoder's hidden states were not captured in this forward")
        labels = labels.to(hidden.device)
        # Position t predicts label t + 1 (as transformers' ForCausalLMLoss); the last position predicts nothing.
        hidden_ND = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
        labels_N = labels[:, 1:].reshape(-1)
        keep_N = labels_N != IGNORE_INDEX
        hidden_ND, labels_N = hidden_ND[keep_N], labels_N[keep_N]
        total = self.kernel(self.head.weight, hidden_ND, labels_N, self.head.bias)
        if num_items_in_batch is None:
            return total / max(int(labels_N.numel()), 1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


def reference_kernel(weight, hidden, labels, bias):
    """The plain computation the fused kernels replace (logits materialised): tests swap it in on CPU."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
