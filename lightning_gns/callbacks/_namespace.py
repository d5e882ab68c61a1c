"""Access to the Lightning namespace a callback class was built for, without importing the other one."""

from __future__ import annotations

import importlib
from types import ModuleType


class LightningNamespace:
    """Mixin of the callbacks' logic classes: ``lightning.pytorch`` or ``pytorch_lightning`` submodules on demand.

    The public subclasses set ``_lightning_namespace``; isinstance checks and exceptions then use that
    namespace's classes, which is what the Trainer of the same namespace expects.
    """

    _lightning_namespace = "lightning.pytorch"

    def _lightning(self, submodule: str) -> ModuleType:
        return importlib.import_module(f"{self._lightning_namespace}.{submodule}")

    def _misconfiguration(self, message: str) -> Exception:
        return self._lightning("utilities.exceptions").MisconfigurationException(message)  # type: ignore[no-any-return]
