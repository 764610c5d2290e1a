"""Forward hooks that count, per layer and example, the tokens each routed expert receives.

Fused experts are hooked on their inputs ``(hidden_states, top_k_index, top_k_weights)``, which every
transformers experts backend (eager, batched_mm, grouped_mm, custom ones) receives, so the counts do
not depend on the backend. Experts that never see the routing (ModuleList experts, Llama4's all-token experts)
are counted from their router's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..arch import ArchSpec, MoELayer, read_routing, topk_weights_of

_INDEX_KWARGS = ("top_k_index", "router_indices", "selected_experts", "topk_indices", "topk_idx")
_WEIGHT_KWARGS = ("top_k_weights", "routing_weights", "router_scores", "topk_weights", "topk_weight")


def fused_routing(args: tuple, kwargs: dict, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    index = args[1] if len(args) > 1 else next((kwargs[k] for k in _INDEX_KWARGS if k in kwargs), None)
    weights = args[2] if len(args) > 2 else next((kwargs[k] for k in _WEIGHT_KWARGS if k in kwargs), None)
    if index is None or weights is None:
        raise RuntimeError(
            f"{type(module).__name__} was called without (top_k_index, top_k_weights) (positional args: {len(args)}, "
            f"keywords: {sorted(kwargs)}); its routing must be read from the router output instead"
        )
    return index, weights


class RoutingRecorder:
    """Context manager that records routing for one batch at a time.

    Call :meth:`begin_batch` with the batch's count mask before the forward and :meth:`end_batch` after
    it; the result is ``counts_LBE`` (int64) and ``mass_LBE`` (float32) on the CPU. All counting runs on
    the layer's own device without host syncs, so a profiled forward costs about what a plain one does.
    """

    def __init__(self, layers: Sequence[MoELayer], spec: ArchSpec):
        self.layers = list(layers)
        self.spec = spec
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mask_by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._count_mask_BT: torch.Tensor | None = None
        self._counts: list[torch.Tensor | None] = []
        self._mass: list[torch.Tensor | None] = []

    def __enter__(self) -> RoutingRecorder:
        for position, layer in enumerate(self.layers):
            if layer.routing_source == "experts":
                handle = layer.experts.register_forward_pre_hook(self._fused_hook(position), with_kwargs=True)
            else:
                handle = layer.router.register_forward_hook(self._router_hook(position))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def begin_batch(self, count_mask_BT: torch.Tensor) -> None:
        self._count_mask_BT = count_mask_BT.bool()
        self._mask_by_device.clear()
        self._counts = [None] * len(self.layers)
        self._mass = [None] * len(self.layers)

    def end_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [self.layers[i].layer_id for i, c in enumerate(self._counts) if c is None]
        if missing:
            raise RuntimeError(
                f"MoE layers {missing} saw no routing in this forward pass; the model's forward skipped them "
                "or routes through modules the architecture registry does not know"
            )
        batch = self._count_mask_BT.shape[0]
        counts_LBE = torch.stack([c.cpu().view(batch, -1) for c in self._counts])
        mass_LBE = torch.stack([m.cpu().view(batch, -1) for m in self._mass])
        self._count_mask_BT = None
        return counts_LBE, mass_LBE

    def _flat_mask(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._mask_by_device:
            mask_BT = self._count_mask_BT.to(device, non_blocking=True)
            batch, seq = mask_BT.shape
            slot_T = torch.arange(batch, device=device).repeat_interleave(seq)
            self._mask_by_device[device] = (mask_BT.reshape(-1), slot_T)
        return self._mask_by_device[device]

    def _record(self, position: int, index_TK: torch.Tensor, weights: torch.Tensor) -> None:
        if self._count_mask_BT is None:
            return
        layer = self.layers[position]
        num_experts = layer.num_experts
        mask_T, slot_T = self._flat_mask(index_TK.device)
        if index_TK.shape[0] != mask_T.shape[0]:
            raise RuntimeError(
                f"layer {layer.layer_id}: the experts received {index_TK.shape[0]} tokens for a batch of "
                f"{mask_T.shape[0]} positions; moe-sieve expects every token of the batch to be routed once"
            )
        if self._counts[position] is not None:
            raise RuntimeError(f"layer {layer.layer_id} was routed twice in one forward pass")
        weights_TK = topk_weights_of(index_TK, weights, num_experts)
        index_TK = index_TK.long()
        # Expert-parallel sentinels (ids outside [0, E)) and uncounted tokens drop out here.
        valid_TK = (index_TK >= 0) & (index_TK < num_experts) & mask_T[:, None]
        bucket = (slot_T[:, None] * num_experts + index_TK.clamp(0, num_experts - 1)).reshape(-1)
        size = self._count_mask_BT.shape[0] * num_experts
        counts = torch.zeros(size, dtype=torch.long, device=index_TK.device)
        counts.scatter_add_(0, bucket, valid_TK.reshape(-1).long())
        mass = torch.zeros(size, dtype=torch.float32, device=index_TK.device)
        mass.scatter_add_(0, bucket, (weights_TK.detach().float() * valid_TK).reshape(-1))
        self._counts[position] = counts
        self._mass[position] = mass

    def _fused_hook(self, position: int):
        def hook(module, args, kwargs):
            index, weights = fused_routing(args, kwargs, module)
            self._record(position, index, weights)

        return hook

    def _router_hook(self, position: int):
        num_experts, top_k = self.layers[position].num_experts, self.layers[position].top_k

        def hook(module, args, output):
            index, weights = read_routing(self.spec, output, num_experts, top_k)
            self._record(position, index, weights)

        return hook
