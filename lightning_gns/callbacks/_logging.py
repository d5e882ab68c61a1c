"""Logging shared by the callbacks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule


def log_scalars(
    pl_module: LightningModule, values: Mapping[str, torch.Tensor | float], prog_bar: str | None = None
) -> None:
    """``LightningModule.log`` each value on this step, the one named ``prog_bar`` in the progress bar too.

    Values are already reduced across processes (or the same on every rank), so no ``sync_dist``.
    """
    for name, value in values.items():
        if isinstance(value, torch.Tensor):
            value = value.to(torch.float32)
        pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name == prog_bar, batch_size=1)
