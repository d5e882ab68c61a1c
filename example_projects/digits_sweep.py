"""Factories for ``lightning-gns sweep`` / ``branch`` on the digits example (``digits_classifier.py``).

    lightning-gns sweep --model example_projects/digits_sweep.py:model \\
        --data example_projects/digits_sweep.py:datamodule --batch-sizes 8 16 32 64 128 256 \\
        --target-loss 0.2 --seeds 0 1 2 --lr 0.05 --base-batch-size 32 --lr-rule sqrt -o sweep_digits

The model is the demo's conv net with plain SGD and momentum 0.9 (a constant learning rate, so the
"temperature" lr / B is fixed within a run). Training batches are exactly ``batch_size`` examples
(``drop_last``), shuffled by ``seed``; the train/validation split is fixed (seed 0) so every run of a sweep
aims at the same validation loss on the same 359 images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_classifier import DigitsClassifier, digits_datasets

SPLIT_SEED = 0


class DigitsDataModule(LightningDataModule):
    """The bundled 8x8 digits: 1438 training and 359 validation images."""

    def __init__(self, batch_size: int, seed: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed
        self.train_set, self.val_set = digits_datasets(SPLIT_SEED)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)


def model(lr: float) -> DigitsClassifier:
    """The demo's conv net (SGD, momentum 0.9) at learning rate ``lr``."""
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest and leaves the other core free
    return DigitsClassifier(lr=lr, momentum=0.9)


def datamodule(batch_size: int, seed: int) -> DigitsDataModule:
    return DigitsDataModule(batch_size=batch_size, seed=seed)
