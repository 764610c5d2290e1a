"""Routing drift during fine-tuning: how far the router moves away from the step-0 routing the selection
was made on (paper §8 names re-profiling during training as future work).

Every ``every`` optimizer steps the :class:`DriftMonitor` profiles a fixed, seeded set of training batches
(chosen before training) with the sync-free profiler and compares the per-layer routing counts with those of
step 0. It writes ``routing_trace.safetensors`` (shape-suffixed tensors) atomically after each measurement,
logs a summary through ``Trainer.log`` (so ``--report-to`` trackers get it) and returns a summary for
``metrics.json``. Profiling runs in eval mode without gradients and draws no random numbers, so training
with and without the monitor is identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from .._io import atomic_path, atomic_write_safetensors

TRACE_FILE = "routing_trace.safetensors"
KL_SMOOTHING = 0.5  # add-half (Jeffreys) pseudo-count per expert, so an expert unseen at step 0 gives a finite KL


def topk_mask(counts_LE: np.ndarray, k_L: Sequence[int]) -> np.ndarray:
    """Boolean ``[L, E]`` mask of the ``k_L[l]`` most-routed experts of each layer (ties to the lower id)."""
    order_LE = np.argsort(-np.asarray(counts_LE), axis=1, kind="stable")
    mask_LE = np.zeros(np.shape(counts_LE), dtype=bool)
    for i, k in enumerate(k_L):
        mask_LE[i, order_LE[i, : int(k)]] = True
    return mask_LE


def routing_distribution(counts_LE: np.ndarray) -> np.ndarray:
    """Per-layer routing distribution with the add-half pseudo-count (see ``KL_SMOOTHING``)."""
    smoothed = np.asarray(counts_LE, dtype=np.float64) + KL_SMOOTHING
    return smoothed / smoothed.sum(1, keepdims=True)


def drift_figures(
    counts0_LE: np.ndarray, counts_LE: np.ndarray, selected_LE: np.ndarray, k_L: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-layer drift of ``counts_LE`` from the step-0 counts ``counts0_LE``.

    coverage: share of routed activations landing on the selected (adapted) experts; jaccard: |T & S| / |T | S|
    of the current top-k set T and the selection S; kl: KL(now || step 0) of the routing distributions;
    became_hot / went_cold: experts entering / leaving the top-k relative to the step-0 top-k.
    """
    counts_LE = np.asarray(counts_LE, dtype=np.int64)
    selected_LE = np.asarray(selected_LE, dtype=bool)
    total_L = counts_LE.sum(1)
    coverage_L = np.where(total_L > 0, (counts_LE * selected_LE).sum(1) / np.maximum(total_L, 1), 0.0)
    top_now_LE = topk_mask(counts_LE, k_L)
    top0_LE = topk_mask(counts0_LE, k_L)
    union_L = (top_now_LE | selected_LE).sum(1)
    jaccard_L = np.where(union_L > 0, (top_now_LE & selected_LE).sum(1) / np.maximum(union_L, 1), 1.0)
    p_LE, q_LE = routing_distribution(counts_LE), routing_distribution(counts0_LE)
    kl_L = (p_LE * np.log(p_LE / q_LE)).sum(1)
    return {
        "coverage_L": coverage_L.astype(np.float64),
        "jaccard_L": jaccard_L.astype(np.float64),
        "kl_L": kl_L,
        "became_hot_L": (top_now_LE & ~top0_LE).sum(1).astype(np.int64),
        "went_cold_L": (top0_LE & ~top_now_LE).sum(1).astype(np.int64),
        "top_LE": top_now_LE,
    }


class DriftMonitor(TrainerCallback):
    """Trainer callback measuring routing drift on fixed batches every ``every`` steps (and at step 0).

    ``profile_fn(model, batches) -> counts_LE`` profiles (the trainer passes one that shards over processes);
    ``selected_LE`` is the adapted-expert mask and ``k_L`` the per-layer top-k size used for Jaccard and
    hot/cold counts. ``on_measure(step, counts_LE, figures)`` lets re-selection act on each measurement.
    """

    def __init__(
        self,
        batches: Sequence[Any],
        *,
        every: int,
        selected_LE: np.ndarray,
        k_L: Sequence[int],
        layer_ids: Sequence[int],
        profile_fn: Callable[[Any, Sequence[Any]], np.ndarray],
        trace_path: str | Path | None = None,
        is_main_process: bool = True,
        on_measure: Callable[[int, np.ndarray, dict[str, np.ndarray]], None] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"--monitor-every must be >= 1 to monitor (0 turns it off), got {every}")
        self.batches = list(batches)
        self.every = every
        self.selected_LE = np.asarray(selected_LE, dtype=bool).copy()
        self.k_L = np.asarray(k_L, dtype=np.int64)
        self.layer_ids = list(layer_ids)
        self.profile_fn = profile_fn
        self.trace_path = None if trace_path is None else Path(trace_path)
        self.is_main_process = is_main_process
        self.on_measure = on_measure
        self.trainer: Any = None
        self.regrower: Any = None
        self.steps: list[int] = []
        self.counts: list[np.ndarray] = []
        self.selected: list[np.ndarray] = []
        self.figures: list[dict[str, np.ndarray]] = []
        self.seconds = 0.0

    def callbacks(self) -> list[TrainerCallback]:
        return [self] if self.regrower is None else [self, self.regrower]

    def adapter_record(self) -> dict[str, Any]:
        """What the final adapter's config records (the growth events under ``--reselect grow``)."""
        return {} if self.regrower is None else self.regrower.record()

    def bind(self, trainer: Any) -> DriftMonitor:
        """Log through ``trainer.log`` so the measurements reach the ``--report-to`` trackers."""
        self.trainer = trainer
        return self

    # -- trace persistence (resume keeps the step-0 baseline) --
    def restore(self, path: str | Path, up_to_step: int) -> None:
        """Reload an earlier run's trace up to the resumed step (later entries belong to the lost attempt)."""
        from safetensors.numpy import load_file

        trace = load_file(str(path))
        keep = trace["steps_S"] <= up_to_step
        self.steps = [int(s) for s in trace["steps_S"][keep]]
        self.counts = list(trace["counts_SLE"][keep])
        self.selected = list(trace["selected_SLE"][keep].astype(bool))
        if self.selected:
            self.selected_LE = self.selected[-1].copy()
        self.figures = [
            drift_figures(self.counts[0], c, s, self.k_L) for c, s in zip(self.counts, self.selected, strict=True)
        ]

    def trace_tensors(self) -> dict[str, np.ndarray]:
        fig = {name: np.stack([f[name] for f in self.figures]) for name in self.figures[0]}
        return {
            "steps_S": np.asarray(self.steps, dtype=np.int64),
            "counts_SLE": np.stack(self.counts).astype(np.int64),
            "selected_SLE": np.stack(self.selected).astype(np.uint8),
            "top_SLE": fig["top_LE"].astype(np.uint8),
            "coverage_SL": fig["coverage_L"],
            "jaccard_SL": fig["jaccard_L"],
            "kl_SL": fig["kl_L"],
            "became_hot_SL": fig["became_hot_L"],
            "went_cold_SL": fig["went_cold_L"],
            "k_L": self.k_L,
            "layer_ids_L": np.asarray(self.layer_ids, dtype=np.int64),
        }

    def _save(self) -> None:
        if self.trace_path is None or not self.is_main_process or not self.steps:
            return
        metadata = {"format": "moe-sieve-routing-trace", "kl_smoothing": str(KL_SMOOTHING), "every": str(self.every)}
        atomic_write_safetensors(self.trace_path, self.trace_tensors(), metadata)

    # -- measurement --
    def measure(self, model: Any, step: int) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        counts_LE = np.asarray(self.profile_fn(model, self.batches), dtype=np.int64)
        if self.steps and self.steps[-1] == step:
            return self.figures[-1]
        baseline = self.counts[0] if self.counts else counts_LE
        figures = drift_figures(baseline, counts_LE, self.selected_LE, self.k_L)
        self.steps.append(step)
        self.counts.append(counts_LE)
        self.selected.append(self.selected_LE.copy())
        self.figures.append(figures)
        if self.on_measure is not None and step > 0:
            self.on_measure(step, counts_LE, figures)
        self._save()
        self.seconds += time.perf_counter() - start
        if self.trainer is not None and step > 0:
            # Trainer.log -> CallbackHandler.on_log clears the shared control.should_log, which would drop the
            # loss log that DefaultFlowCallback scheduled for this same step.
            should_log = self.trainer.control.should_log
            self.trainer.log(self.log_entry(figures))
            self.trainer.control.should_log = should_log
        return figures

    def overhead_line(self, wall_seconds: float) -> str:
        return (
            f"routing drift monitor: {len(self.steps)} measurements, {self.seconds:.2f} s "
            f"({100 * self.seconds / max(wall_seconds, 1e-9):.1f}% of {wall_seconds:.1f} s training wall time)"
        )

    @staticmethod
    def log_entry(figures: dict[str, np.ndarray]) -> dict[str, float]:
        return {
            "drift/coverage": round(float(figures["coverage_L"].mean()), 6),
            "drift/coverage_min": round(float(figures["coverage_L"].min()), 6),
            "drift/jaccard": round(float(figures["jaccard_L"].mean()), 6),
            "drift/kl": round(float(figures["kl_L"].mean()), 8),
            "drift/kl_max": round(float(figures["kl_L"].max()), 8),
            "drift/became_hot": int(figures["became_hot_L"].sum()),
            "drift/went_cold": int(figures["went_cold_L"].sum()),
        }

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.steps:
            self.measure(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.measure(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.steps and self.steps[-1] != state.global_step:
            self.measure(model, state.global_step)

    def summary(self, train_seconds: float | None = None) -> dict[str, Any]:
        """The ``routing_drift`` entry of ``metrics.json``."""
        if not self.figures:
            return {"every": self.every, "measurements": 0}
        last = self.figures[-1]
        out: dict[str, Any] = {
            "every": self.every,
            "measurements": len(self.steps),
            "steps": self.steps,
            "monitor_tokens": int(sum(int(b.count_mask.sum()) for b in self.batches)),
            "initial": self.log_entry(self.figures[0]),
            "final": self.log_entry(last),
            "final_per_layer": {
                "coverage": [round(float(x), 6) for x in last["coverage_L"]],
                "jaccard": [round(float(x), 6) for x in last["jaccard_L"]],
                "kl": [round(float(x), 8) for x in last["kl_L"]],
            },
            "monitor_seconds": round(self.seconds, 3),
            "trace": TRACE_FILE,
        }
        if train_seconds:
            out["monitor_share_of_wall"] = round(self.seconds / train_seconds, 4)
        return out


def load_trace(path: str | Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = Path(path)
    if path.is_dir():
        path = path / TRACE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no routing trace (train with --monitor-every N > 0)")
    return load_file(str(path))


def plot_drift(traces: dict[str, str | Path], out: str | Path) -> Path:
    """Coverage and Jaccard against step (one line per run, layer mean with min-max band) and, per run, a
    layer x step heat map of KL drift from step 0. ``traces`` maps a label to a run directory or trace file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = {label: load_trace(path) for label, path in traces.items()}
    n = len(loaded)
    fig, axes = plt.subplots(1, 2 + n, figsize=(5 * (2 + n), 4), constrained_layout=True)
    for label, trace in loaded.items():
        steps = trace["steps_S"]
        for ax, name, title in ((axes[0], "coverage_SL", "selection coverage"), (axes[1], "jaccard_SL", "Jaccard")):
            values = trace[name]
            (line,) = ax.plot(steps, values.mean(1), marker="o", label=label)
            ax.fill_between(steps, values.min(1), values.max(1), alpha=0.15, color=line.get_color())
            ax.set_xlabel("optimizer step")
            ax.set_title(f"{title} (layer mean, min-max band)")
    axes[0].legend()
    vmax = max(float(t["kl_SL"].max()) for t in loaded.values()) or 1e-12
    for ax, (label, trace) in zip(axes[2:], loaded.items(), strict=True):
        steps = trace["steps_S"].astype(float)
        # one cell per measurement, spanning half-way to its neighbours
        mids = (steps[1:] + steps[:-1]) / 2
        gap = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) or 1.0
        edges = np.concatenate([[steps[0] - gap / 2], mids, [steps[-1] + gap / 2]])
        layer_edges = np.arange(trace["kl_SL"].shape[1] + 1) - 0.5
        image = ax.pcolormesh(edges, layer_edges, trace["kl_SL"].T, cmap="magma", vmin=0, vmax=vmax)
        ax.set_yticks(range(trace["kl_SL"].shape[1]), [str(i) for i in trace["layer_ids_L"]])
        ax.set_title(f"{label}: KL(now || step 0) per layer")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("MoE layer")
        fig.colorbar(image, ax=ax)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out


def monitor_batches(
    examples: Sequence[Any], tokenizer: Any, *, count: int, batch_size: int, max_length: int, seed: int
):
    """The fixed monitor set: ``count`` training examples drawn with ``seed`` before training starts.

    They stay in the training data (taking them out would change the run the monitor observes); the monitor
    measures how the routing of these fixed tokens changes, not generalisation.
    """
    from ..data.calibration import make_batches, pad_token_id_for, tokenize_example

    rng = np.random.default_rng([seed, 0x5EED])
    picked = sorted(rng.choice(len(examples), size=min(count, len(examples)), replace=False).tolist())
    tokenized = [tokenize_example(examples[i], tokenizer, max_length) for i in picked]
    return make_batches(tokenized, batch_size=batch_size, pad_token_id=pad_token_id_for(tokenizer))


def profile_counts(model: Any, batches: Sequence[Any]) -> np.ndarray:
    """``counts_LE`` of ``batches`` with the sync-free profiler. Every process profiles all batches (identical
    weights give identical counts), so sharded models run the same forwards on every rank."""
    from ..profiling import profile_model

    num_examples = 1 + max(int(b.example_index.max()) for b in batches)
    return profile_model(model, batches, num_examples, progress=False).counts_LE


def build_monitor(
    config: Any, model: Any, tokenizer: Any, examples: Sequence[Any], sieve: Any, run_dir: Path, state: Any
) -> DriftMonitor | None:
    """The monitor of a ``train`` run (None with ``--monitor-every 0``)."""
    if config.monitor_every <= 0:
        return None
    from ..arch import MoEShape, find_moe_layers
    from ..routing_stats import resolve_k

    layers = find_moe_layers(model)
    shape = MoEShape.of(layers)
    selected_LE = np.zeros((len(layers), shape.num_experts), dtype=bool)
    if "experts" in config.targets:
        for i, layer in enumerate(layers):
            selected_LE[i, sieve.experts.get(layer.layer_id, [])] = True
    per_layer = selected_LE.sum(1)
    if config.experts_mode == "selected" and per_layer.min() > 0:
        k_L = per_layer
    else:
        k_L = np.full(len(layers), resolve_k(config.k, shape.num_experts), dtype=np.int64)
    batches = monitor_batches(
        examples,
        tokenizer,
        count=config.monitor_examples,
        batch_size=config.micro_batch_size,
        max_length=config.max_length,
        seed=config.seed,
    )
    return DriftMonitor(
        batches,
        every=config.monitor_every,
        selected_LE=selected_LE,
        k_L=k_L,
        layer_ids=list(shape.layer_ids),
        profile_fn=profile_counts,
        trace_path=run_dir / TRACE_FILE,
        is_main_process=state.is_main_process,
    )


def routing_monitor(
    config: Any,
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    sieve: Any,
    run_dir: Path,
    state: Any,
    resume_from: str | None,
) -> DriftMonitor | None:
    """Everything ``train`` needs about routing while training, in one call: the router aux loss, the drift
    monitor (reloading the trace up to the resumed step) and, with ``--reselect grow``, re-selection."""
    if config.router_aux_loss > 0:
        from ..adapters.sieve.model import enable_router_aux_loss

        enable_router_aux_loss(model, config.router_aux_loss)
    monitor = build_monitor(config, model, tokenizer, examples, sieve, run_dir, state)
    if monitor is None:
        return None
    if config.reselect == "grow":
        from .reselect import Regrower

        monitor.regrower = Regrower(model, monitor, run_dir, state, seed=config.seed).attach()
    if resume_from is not None:
        step = int(Path(resume_from).name.rpartition("-")[2])
        trace = run_dir / TRACE_FILE
        if trace.exists():
            monitor.restore(trace, step)
        if monitor.regrower is not None:
            monitor.regrower.replay(step)
    return monitor
