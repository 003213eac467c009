"""Old module paths (``peft_ntk.kernels``, ``peft_ntk.layer``, ...) from before the ops / tuner / hub / tools layout.

Importing one gives a module that finds each name in its new home and warns once (FutureWarning) where it moved.
Setting an attribute on it sets it in the new home, so a monkeypatch through an old path still takes effect.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any, Optional

MOVED_MODULES: dict[str, tuple[str, ...]] = {
    "peft_ntk.attention": ("peft_ntk.tuner.attention_hook",),
    "peft_ntk.config": ("peft_ntk.tuner.config",),
    "peft_ntk.convert": ("peft_ntk.tools.convert",),
    "peft_ntk.diagnostics": ("peft_ntk.tools.diagnostics",),
    "peft_ntk.feature_maps": ("peft_ntk.ops.feature_maps",),
    "peft_ntk.fused_combine": ("peft_ntk.ops.torch_combine", "peft_ntk.ops.feature_maps"),
    "peft_ntk.init_from_text": ("peft_ntk.tools.init_from_text",),
    "peft_ntk.kernels": ("peft_ntk.ops.kernels", "peft_ntk.ops.fused_attention", "peft_ntk.ops.dispatch"),
    "peft_ntk.layer": ("peft_ntk.tuner.layer",),
    "peft_ntk.model": ("peft_ntk.tuner.model",),
    "peft_ntk.model_card": ("peft_ntk.hub.model_card",),
    "peft_ntk.registration": ("peft_ntk.tuner.registration", "peft_ntk.tuner.peft_type"),
    "peft_ntk.saving": ("peft_ntk.hub.saving",),
    "peft_ntk.triton_combine": ("peft_ntk.ops.triton_combine",),
}


class _MovedModule(types.ModuleType):
    def _homes(self) -> list[types.ModuleType]:
        return [importlib.import_module(name) for name in MOVED_MODULES[self.__name__]]

    def _home_of(self, name: str) -> Optional[types.ModuleType]:
        return next((home for home in self._homes() if hasattr(home, name)), None)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        home = self._home_of(name)
        if home is None:
            raise AttributeError(f"module {self.__name__!r} (moved to {MOVED_MODULES[self.__name__]}) has no {name!r}")
        warnings.warn(
            f"{self.__name__}.{name} moved to {home.__name__}.{name}; the old path will be removed in a future release.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(home, name)

    def __setattr__(self, name: str, value: Any) -> None:
        home = None if name.startswith("__") else self._home_of(name)
        if home is None:
            super().__setattr__(name, value)
        else:
            setattr(home, name, value)

    def __delattr__(self, name: str) -> None:
        home = self._home_of(name)
        if home is None:
            super().__delattr__(name)
        else:
            delattr(home, name)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, f"Moved: see {', '.join(MOVED_MODULES[spec.name])}.")

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install_moved_module_finder() -> None:
    """Let the old module paths resolve (idempotent)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # before editable-install finders that map the old files
