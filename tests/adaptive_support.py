"""A linear model that records every optimizer step, and a float64 check of each step's update.

Shared by tests/test_adaptive.py and tests/adaptive_ddp_worker.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from lightning_gns.batch_schedule import NoiseScaleStatistics

Scheduler = Callable[[torch.optim.Optimizer], Any]


class RecordingRegression(LightningModule):
    """Bias-free linear regression under plain SGD; keeps, per optimizer step, the weights around it.

    The records hold what a check needs to recompute the update without trusting the callback: the weights
    before and after, the micro-batches the step's window fed to ``training_step`` (in order, per rank),
    the accumulation Lightning used, and the learning rate the scheduler had set (read outside the step).
    """

    def __init__(self, dim: int, lr: float, w0: Tensor, scheduler: Scheduler | None = None) -> None:
        super().__init__()
        self.lr = lr
        self.scheduler_fn = scheduler
        self.linear = nn.Linear(dim, 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(w0.float().unsqueeze(0))
        self.window: list[tuple[Tensor, Tensor]] = []
        self.steps: list[dict[str, Any]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.window.append((x.detach().clone(), y.detach().clone()))
        return 0.5 * (self.linear(x).squeeze(-1) - y).square().mean()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        before = self.linear.weight.detach().reshape(-1).clone()
        lr = optimizer.param_groups[0]["lr"]
        accumulation = self.trainer.accumulate_grad_batches
        optimizer.step(closure=optimizer_closure)  # runs training_step and backward of the last micro-batch
        self.steps.append(
            {
                "epoch": epoch,
                "batch_idx": batch_idx,
                "accumulation": accumulation,
                "scheduler_lr": lr,
                "lr_after": optimizer.param_groups[0]["lr"],
                "before": before,
                "after": self.linear.weight.detach().reshape(-1).clone(),
                "window": self.window,
            }
        )
        self.window = []

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.scheduler_fn is None:
            return optimizer
        scheduler = self.scheduler_fn(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def window_mean_grad(weight: Tensor, micro_batches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """float64 sum over micro-batches of each one's mean-loss gradient at ``weight``."""
    w = weight.double()
    total = torch.zeros_like(w)
    for x, y in micro_batches:
        x64, y64 = x.double(), y.double()
        total += x64.T @ (x64 @ w - y64) / x64.shape[0]
    return total


def scheduled_target(wanted: dict[int, int]) -> Callable[[NoiseScaleStatistics], float]:
    """A target that asks for accumulation ``wanted[s]`` from step ``s`` on (the last key at or below the step)."""

    def target(stats: NoiseScaleStatistics) -> float:
        keys = [s for s in sorted(wanted) if s <= stats.step]
        accumulation = wanted[keys[-1]] if keys else stats.accumulation
        return float(accumulation * stats.micro_batch_size * stats.world_size)

    return target
