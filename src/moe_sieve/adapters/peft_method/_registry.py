"""Registration of the moe-sieve PEFT methods, and the hook that performs it whenever ``peft`` is imported.

PEFT resolves a saved adapter through ``PEFT_TYPE_TO_CONFIG_MAPPING[adapter_config["peft_type"]]`` and builds it
through ``PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]``. ``peft.utils.register_peft_method`` fills exactly these
mappings but refuses any name outside the closed ``PeftType`` enum, so moe-sieve writes the same entries itself,
under a ``str`` key that answers ``.value``/``.name`` like an enum member. Everything else (``get_peft_model``,
``PeftModel.from_pretrained``, ``save_pretrained``, ``push_to_hub``, ``load_adapter``) is PEFT's own code.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_registered = False


class PeftMethodType(str):
    """A PEFT method name usable wherever PEFT expects a ``PeftType`` member (a ``str`` enum)."""

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"PeftMethodType({str.__str__(self)!r})"


SIEVE = PeftMethodType("MOE_SIEVE")
SIEVE_ROUTED = PeftMethodType("MOE_SIEVE_ROUTED")


def register() -> None:
    """Make ``SieveConfig``/``RoutedConfig`` known to PEFT (idempotent; needs ``peft`` importable)."""
    global _registered
    with _lock:
        if _registered:
            return
        from peft import mapping

        from .config import RoutedConfig, SieveConfig
        from .routed import RoutedModel
        from .tuner import SieveModel

        for peft_type, config_cls, tuner_cls in (
            (SIEVE, SieveConfig, SieveModel),
            (SIEVE_ROUTED, RoutedConfig, RoutedModel),
        ):
            known = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
            if known is not None and known.__qualname__ != config_cls.__qualname__:
                raise KeyError(f"PEFT already has a method called {peft_type!s} ({known.__module__}.{known.__name__})")
            mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
            mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner_cls
            mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = tuner_cls.prefix
        _registered = True
