"""moe-sieve: routing-guided LoRA fine-tuning for Mixture-of-Experts language models.

The recipe, one stage per module, each writing an artifact the next one reads::

    from moe_sieve import ProfileConfig, run_profile, routing_stats, make_selection

    profile = run_profile(ProfileConfig(model="moe-sieve-default", data="gsm8k:runs/demo/minitasks/arith"))
    profile.save("runs/profile")
    print(routing_stats(profile.counts_LE, profile.mass_LE, layer_ids=profile.layer_ids).to_json())
    selection = make_selection(profile.counts_LE, profile.mass_LE, k="25%", layer_ids=profile.layer_ids)
    selection.save("runs/selection.json")

Fine-tuning then goes through PEFT (``get_peft_model(model, moe_sieve.SieveConfig(selection="runs/selection.json"))``,
``PeftModel.from_pretrained``) or TRL (``SFTTrainer(..., peft_config=moe_sieve.SieveConfig(...))``); see docs/trl.md.
A trained adapter goes where it will be used with ``export_adapter(adapter_dir, "peft" | "vllm" | "sglang" | "merged",
out)`` (``merge_adapter`` for a merged checkpoint in another dtype).
"""

from ._version import __version__
from .arch import ArchSpec, MoELayer, UnsupportedModelError, find_moe_layers, register_arch
from .data.tasks import Example, load_examples
from .modeling import default_model_path
from .profiling import Profile, ProfileConfig, ProfileMismatchError, profile_model, run_profile
from .routing_stats import RoutingStats, routing_stats, subsample_stability
from .selection import Selection, make_selection, register_strategy

__all__ = [
    "ArchSpec",
    "Example",
    "MoELayer",
    "Profile",
    "ProfileConfig",
    "ProfileMismatchError",
    "RoutedConfig",
    "RoutingStats",
    "Selection",
    "SieveConfig",
    "UnsupportedModelError",
    "__version__",
    "default_model_path",
    "export_adapter",
    "find_moe_layers",
    "load_examples",
    "make_selection",
    "merge_adapter",
    "profile_model",
    "register_arch",
    "register_strategy",
    "routing_stats",
    "run_profile",
    "subsample_stability",
]

_PEFT_CONFIGS = ("SieveConfig", "RoutedConfig")
_EXPORT = ("export_adapter", "merge_adapter")


def __getattr__(name: str):
    """``SieveConfig``/``RoutedConfig`` import PEFT on first use and the export functions the adapters package, so
    ``import moe_sieve`` itself stays light."""
    if name in _PEFT_CONFIGS:
        from .adapters import peft_method

        return getattr(peft_method, name)
    if name in _EXPORT:
        from .adapters import export

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from ._peft_hook import install_hook as _install_peft_hook  # noqa: E402

_install_peft_hook()  # PEFT learns the moe-sieve methods as soon as it is imported
