"""A quiet one-epoch CPU Trainer (no logger, checkpoints, progress bar or summary) for the tests."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer


def make_trainer(callbacks: list[Any], **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kwargs)
    return Trainer(callbacks=callbacks, **defaults)
