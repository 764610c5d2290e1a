"""Post-import hook: registers moe-sieve's PEFT methods right after ``peft`` is imported.

``import moe_sieve`` stays cheap (no PEFT import), and ``PeftModel.from_pretrained`` still finds the methods
whichever of the two is imported first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``module`` finishes importing (a post-import hook): ``import moe_sieve``
    then stays cheap, and ``PeftModel.from_pretrained`` still finds the method whichever is imported first."""

    def __init__(self, module: str, callback: Any) -> None:
        self.module = module
        self.callback = callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.module:
            return None
        uninstall(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        callback = self.callback

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_and_register
        return spec


def uninstall(hook: _RegisterAfterImport) -> None:
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)


def install_hook(module: str = "peft", callback: Any = None) -> _RegisterAfterImport | None:
    """Register now when ``module`` is already imported, else once it is; returns the pending hook, if any."""
    callback = callback or _register_quietly
    if module in sys.modules:
        callback()
        return None
    if importlib.util.find_spec(module) is None:
        return None
    hook = _RegisterAfterImport(module, callback)
    sys.meta_path.insert(0, hook)
    return hook


def _register_quietly() -> None:
    """Registration from the import hook must never break ``import peft`` itself (e.g. an unsupported PEFT)."""
    try:
        import moe_sieve.adapters.peft_method  # noqa: F401  (registers on import)
    except Exception as err:  # noqa: BLE001 - reported, and retried when SieveConfig is used
        print(f"moe-sieve: could not register its PEFT methods ({type(err).__name__}: {err})", file=sys.stderr)
