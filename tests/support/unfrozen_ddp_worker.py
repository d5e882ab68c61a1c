"""2-process DDP worker for tests/test_ddp.py: a backbone frozen when DDP wraps the model, unfrozen at epoch 1.

BackboneFinetuning freezes in ``setup``, before the strategy wraps the model, so DDP never buckets the backbone:
after the unfreeze it trains on each rank's own gradient (in torch itself). Saves each rank's readouts and the
GradientNoiseScale warnings to ``--out/rank{r}.pt``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseScale
from support.multiprocess import end_process, launched_children
from support.trainers import make_trainer


class BackboneAndHead(LightningModule):
    def __init__(self, own_hook: bool) -> None:
        super().__init__()
        self.own_hook = own_hook
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.head(self.backbone(x)).squeeze(-1), y)

    def on_fit_start(self) -> None:
        if self.own_hook:  # the user's own comm hook: the callback's per-rank norms come from parameter hooks
            ddp = self.trainer.strategy.model
            assert isinstance(ddp, nn.parallel.DistributedDataParallel)
            ddp.register_comm_hook(dist.group.WORLD, default_hooks.allreduce_hook)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--mode", default="ddp")
    parser.add_argument("--own-hook", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(320, 8, generator=generator)
    y = x.sum(1) + torch.randn(320, generator=generator)
    gns = GradientNoiseScale(beta=0.5, mode=args.mode)
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0, should_align=False)
    trainer = make_trainer(
        [gns, unfreeze], devices=2, strategy="ddp", max_epochs=3, accumulate_grad_batches=args.accumulation
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(BackboneAndHead(args.own_hook), DataLoader(TensorDataset(x, y), batch_size=8))
    state = {
        "measured_steps": int(gns.metric.measured_steps),
        "skipped_steps": gns.skipped_steps,
        "said": [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)],
    }
    torch.save(state, args.out / f"rank{trainer.global_rank}.pt")
    end_process(launched_children(trainer))


if __name__ == "__main__":
    main()
