"""A callback of one Lightning package in the other package's Trainer is refused with the import to use."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Trainer as LightningTrainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from support.models import LinearProblem, LinearRegression, loader

pl = pytest.importorskip("pytorch_lightning")
from lightning_gns.pytorch_lightning import AdaptiveBatchSize as PLAdaptiveBatchSize  # noqa: E402
from lightning_gns.pytorch_lightning import GradientNoiseScale as PLGradientNoiseScale  # noqa: E402

PROBLEM = LinearProblem(dim=4, seed=1)
X, Y = PROBLEM.sample(32, seed=2)
SETTINGS: dict[str, Any] = {
    "accelerator": "cpu",
    "max_epochs": 1,
    "accumulate_grad_batches": 2,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


class PLRegression(pl.LightningModule):  # type: ignore[misc]
    """support.models.LinearRegression for the pytorch_lightning package."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(PROBLEM.dim, 1, bias=False)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return 0.5 * (self.linear(x).squeeze(-1) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def fit_pytorch_lightning(callbacks: list[Any]) -> None:
    pl.Trainer(callbacks=callbacks, **SETTINGS).fit(PLRegression(), loader(X, Y, 4))


def fit_lightning(callbacks: list[Any]) -> None:
    LightningTrainer(callbacks=callbacks, **SETTINGS).fit(LinearRegression(PROBLEM, lr=0.05), loader(X, Y, 4))


def test_lightning_callback_in_a_pytorch_lightning_trainer() -> None:
    with pytest.raises(
        pl.utilities.exceptions.MisconfigurationException,
        match=r"GradientNoiseScale was imported for lightning\.pytorch .* the Trainer is a pytorch_lightning\.Trainer"
        r".* use `from lightning_gns\.pytorch_lightning import GradientNoiseScale`",
    ):
        fit_pytorch_lightning([GradientNoiseScale()])


def test_pytorch_lightning_callback_in_a_lightning_trainer() -> None:
    with pytest.raises(
        MisconfigurationException,
        match=r"GradientNoiseScale was imported for pytorch_lightning .* the Trainer is a lightning\.pytorch\.Trainer"
        r".* use `from lightning_gns import GradientNoiseScale`",
    ):
        fit_lightning([PLGradientNoiseScale()])


def test_adaptive_batch_size_of_the_other_package() -> None:
    # The GradientNoiseScale matches the Trainer; only AdaptiveBatchSize is of the wrong package.
    with pytest.raises(
        pl.utilities.exceptions.MisconfigurationException,
        match=r"AdaptiveBatchSize was imported for lightning\.pytorch .* use"
        r" `from lightning_gns\.pytorch_lightning import AdaptiveBatchSize`",
    ):
        fit_pytorch_lightning([PLGradientNoiseScale(), AdaptiveBatchSize()])
    with pytest.raises(
        MisconfigurationException,
        match=r"AdaptiveBatchSize was imported for pytorch_lightning .* use"
        r" `from lightning_gns import AdaptiveBatchSize`",
    ):
        fit_lightning([GradientNoiseScale(), PLAdaptiveBatchSize()])


def test_matching_packages_train() -> None:
    gns = PLGradientNoiseScale(beta=0.9)
    fit_pytorch_lightning([gns, PLAdaptiveBatchSize(max_accumulation=4)])
    assert int(gns.metric.measured_steps) > 0
