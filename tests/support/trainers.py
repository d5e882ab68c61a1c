"""A quiet one-epoch CPU Trainer for the tests, and a logger that keeps what it is given."""

from __future__ import annotations

import warnings
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import nn


class MemoryLogger(Logger):
    """Keeps every ``(step, metrics)`` the Trainer logs."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((int(step or 0), dict(metrics)))


def make_trainer(callbacks: list[Any], **kwargs: Any) -> Trainer:
    """One epoch on one CPU process unless ``kwargs`` say otherwise; with ``max_steps`` the step count ends it."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=None if "max_steps" in kwargs else 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)


def fit64(callbacks: list[Any], model: LightningModule, data: Any, **kwargs: Any) -> list[str]:
    """Fit in float64 and return the messages of the GradientNoiseScale warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks, precision="64-true", **kwargs).fit(model, data)
    return [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)]


def param_names(model: nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the trainable parameters, less those starting with ``exclude``."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(exclude)]
