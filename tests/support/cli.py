"""A LightningCLI-friendly model and data module (plain typed init args), and the trainer arguments of a short run."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn

from support.models import loader


class CLIRegression(LightningModule):
    """A LightningCLI-friendly linear regression (plain typed init args)."""

    def __init__(self, dim: int = 4, lr: float = 0.0) -> None:
        super().__init__()
        self.lr = lr
        self.linear = nn.Linear(dim, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return (self.linear(x).squeeze(-1) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class CLIData(LightningDataModule):
    def __init__(self, dim: int = 4, examples: int = 128, batch_size: int = 8) -> None:
        super().__init__()
        self.dim, self.examples, self.batch_size = dim, examples, batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(self.examples, self.dim, generator=gen), torch.randn(self.examples, generator=gen)
        return loader(x, y, self.batch_size)


CLI_TRAINER_ARGS = [
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=1",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accumulate_grad_batches=2",
]
