"""Records host synchronisations made from lightning_gns code (see tests/test_hot_path.py for what counts)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

PACKAGE_DIR = str(Path(__file__).resolve().parents[2] / "lightning_gns")
SYNCING_METHODS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy")


@contextmanager
def record_package_syncs() -> Iterator[Counter[str]]:
    calls: Counter[str] = Counter()

    def wrap(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE_DIR):
                calls[f"{name} from {Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
            return original(*args, **kwargs)

        return wrapper

    originals = {name: getattr(torch.Tensor, name) for name in SYNCING_METHODS}
    original_tensor = torch.tensor
    original_setitem = torch.Tensor.__setitem__

    def setitem(self: torch.Tensor, key: Any, value: Any) -> None:
        caller = sys._getframe(1).f_code.co_filename
        if not isinstance(value, torch.Tensor) and caller.startswith(PACKAGE_DIR):
            calls[f"__setitem__ of a host value from {Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
        original_setitem(self, key, value)

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, wrap(name, original))
        torch.tensor = wrap("torch.tensor", original_tensor)  # type: ignore[assignment]
        torch.Tensor.__setitem__ = setitem  # type: ignore[method-assign,assignment]
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        torch.tensor = original_tensor  # type: ignore[assignment]
        torch.Tensor.__setitem__ = original_setitem  # type: ignore[method-assign]


class SyncWatcher(Callback):
    """Starts recording after the first optimizer step (setup and one-off caches are allowed to sync)."""

    def __init__(self) -> None:
        self.context: Any = None
        self.calls: Counter[str] = Counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step == 1 and self.context is None:
            self.context = record_package_syncs()
            self.calls = self.context.__enter__()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.context is not None:
            self.context.__exit__(None, None, None)
