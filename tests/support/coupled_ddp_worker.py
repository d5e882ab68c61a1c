"""2-process DDP worker for tests/test_coupled_losses.py: a classifier head beside an in-batch contrastive term.

Each rank's loss compares its own examples with each other (InfoNCE over the (B, B) similarity of two views), so
the shared trunk and the projection are left out on both ranks; the classifier head, trained on one cross entropy
per example, stays measured. Saves each rank's ``left_out``, covered fraction, ``B_simple`` and measured steps to
``--out/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseScale
from support.multiprocess import end_process, launched_children
from support.trainers import make_trainer


class ContrastBesideClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)
        self.project = nn.Linear(16, 8)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        h, other = self.trunk(x), self.trunk(x.flip(-1))
        first, second = F.normalize(self.project(h), dim=-1), F.normalize(self.project(other), dim=-1)
        contrast = F.cross_entropy(first @ second.T / 0.5, torch.arange(len(x)))
        return F.cross_entropy(self.head(h), y) + contrast

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(5))
    data = DataLoader(TensorDataset(x, x[:, :3].argmax(dim=1)), batch_size=4)  # classes the head can learn
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    trainer = make_trainer([gns], devices=2, strategy="ddp", max_steps=6)
    trainer.fit(ContrastBesideClassifier(), data)
    state = {
        "left_out": gns.left_out,
        "covered_fraction": gns.covered_fraction,
        "b_simple": gns.b_simple,
        "measured_steps": int(gns.metric.measured_steps),
    }
    torch.save(state, args.out / f"rank{trainer.global_rank}.pt")
    end_process(launched_children(trainer))


if __name__ == "__main__":
    main()
