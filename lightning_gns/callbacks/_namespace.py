"""Access to the Lightning namespace a callback class was built for, without importing the other one."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

# The import that gives a callback class of each namespace.
_IMPORT_FOR = {"lightning.pytorch": "lightning_gns", "pytorch_lightning": "lightning_gns.pytorch_lightning"}


def namespace_of(obj: Any) -> str | None:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``: the Lightning package ``obj``'s class comes from."""
    for cls in type(obj).__mro__:
        module = cls.__module__ or ""
        for namespace in _IMPORT_FOR:
            if module == namespace or module.startswith(namespace + "."):
                return namespace
    return None


class LightningNamespace:
    """Mixin of the callbacks' base classes: ``lightning.pytorch`` or ``pytorch_lightning`` submodules on demand.

    The public subclasses set ``_lightning_namespace``; isinstance checks and exceptions then use that
    namespace's classes, which is what the Trainer of the same namespace expects.
    """

    _lightning_namespace = "lightning.pytorch"

    def _lightning(self, submodule: str) -> ModuleType:
        return importlib.import_module(f"{self._lightning_namespace}.{submodule}")

    def _misconfiguration(self, message: str) -> Exception:
        return self._lightning("utilities.exceptions").MisconfigurationException(message)

    def _check_trainer_namespace(self, trainer: Any, name: str) -> None:
        """Refuse a Trainer of the other Lightning package: its strategies and callbacks fail our isinstance checks.

        ``lightning.pytorch`` and ``pytorch_lightning`` are two copies of the same code with distinct classes,
        so a mismatch would otherwise surface as a misleading error (e.g. "single-device training is not
        supported") or as silently skipped checks.
        """
        own = self._lightning_namespace
        if isinstance(trainer, importlib.import_module(own).Trainer):
            return
        other = namespace_of(trainer)
        if other is None or other == own:
            return  # not a Lightning Trainer subclass we can name: nothing to compare
        message = (
            f"{name} was imported for {own} (`from {_IMPORT_FOR[own]} import {name}`), but the Trainer is a"
            f" {other}.Trainer, and the two Lightning packages' classes do not mix. With {other}, use"
            f" `from {_IMPORT_FOR[other]} import {name}` (for every lightning_gns callback), or build the"
            f" Trainer from {own}."
        )
        # The exception of the Trainer's own package, which the user's code expects; it is already imported.
        exceptions = sys.modules.get(f"{other}.utilities.exceptions")
        if exceptions is not None:
            raise exceptions.MisconfigurationException(message)
        raise self._misconfiguration(message)

    def _check_fit(self, trainer: Any, pl_module: Any, name: str, manual_optimization: str) -> None:
        """The checks both callbacks make at fit setup: the Trainer's namespace and automatic optimization.

        ``manual_optimization`` says why ``name`` needs automatic optimization and what to do instead.
        """
        self._check_trainer_namespace(trainer, name)
        if not pl_module.automatic_optimization:
            raise self._misconfiguration(
                f"{name} {manual_optimization} (LightningModule.automatic_optimization = True, with"
                " Trainer(accumulate_grad_batches=...) for accumulation). In a manual-optimization loop, use"
                " lightning_gns.GradientNoiseScaleTracker (see the README) instead: call start_micro_batch,"
                " end_micro_batch and measure_step around your own backward and optimizer step."
            )
