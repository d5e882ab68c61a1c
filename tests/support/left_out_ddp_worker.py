"""2-process DDP worker for tests/test_left_out.py: a layer only rank 1 cannot split per example.

Rank 1 calls ``late`` on tokens flattened by position to (T*B, d), so its source excludes the layer with the
reason; rank 0 never calls it (its gradient reaches rank 0 through the all-reduce). Saves each rank's
``left_out`` and covered fraction to ``--out/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor, nn

from lightning_gns import GradientNoiseScale
from support.multiprocess import end_process, launched_children
from support.trainers import make_trainer
from support.zoo import SequenceRegression


class RankBranch(SequenceRegression):
    def __init__(self) -> None:
        super().__init__(lr=0.05)
        torch.manual_seed(8)
        self.proj = nn.Linear(4, 4)
        self.late = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        if self.global_rank == 1:
            b, t, d = h.shape
            h = h + self.late(h.transpose(0, 1).reshape(t * b, d)).reshape(t, b, d).transpose(0, 1)
        return self.head(h).mean(dim=(1, 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    trainer = make_trainer([gns], devices=2, strategy="ddp_find_unused_parameters_true")
    trainer.fit(RankBranch(), RankBranch.data(2 * 4 * 6))
    state = {"left_out": gns.left_out, "covered_fraction": gns.covered_fraction, "b_simple": gns.b_simple}
    torch.save(state, args.out / f"rank{trainer.global_rank}.pt")
    end_process(launched_children(trainer))


if __name__ == "__main__":
    main()
