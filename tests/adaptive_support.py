"""A linear model that records every optimizer step, and a float64 check of each step's update.

Shared by tests/test_adaptive.py and tests/adaptive_ddp_worker.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule
from torch import Tensor, nn

from lightning_gns.batch_schedule import NoiseScaleStatistics
from lightning_gns.estimators import unbiased_estimates

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


class EstimateRecorder(Callback):
    """Records, at every fold of the GradientNoiseScale metric, the step's own estimates and the interval after it.

    ``estimates`` holds ``(|G|^2, tr(Sigma))`` of each folded step (computed from the fold's arguments with
    the same estimator, float64), ``intervals`` ``(low, high, relative error)`` read from the metric right after.
    """

    def __init__(self, gns: Any, z: float = 1.0) -> None:
        self.gns = gns
        self.z = z
        self.estimates: list[tuple[float, float]] = []
        self.intervals: list[tuple[float, float, float]] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        metric = self.gns.metric
        fold = metric.fold

        def recording_fold(summary: Any, big_sq_norm: Tensor) -> None:
            g, t = unbiased_estimates(summary, big_sq_norm)
            fold(summary, big_sq_norm)
            self.estimates.append((float(g), float(t)))
            low, high = metric.confidence_interval(self.z)
            self.intervals.append((float(low), float(high), float(metric.relative_error())))

        metric.fold = recording_fold


def reference_interval(
    grad_sq_norms: list[float], trace_covs: list[float], beta: float, z: float
) -> tuple[float, float, float, float]:
    """``(low, high, relative error, effective samples)`` of the EMA of these per-step estimates, in float64 numpy.

    Written independently of lightning_gns.estimators: explicit weights, numpy's polynomial roots and the
    definitions of the bounds (the smallest ratio not rejected as too small, the largest not rejected as too
    large) rather than the closed forms.
    """
    g_all, t_all = np.array(grad_sq_norms, dtype=np.float64), np.array(trace_covs, dtype=np.float64)
    m = len(g_all)
    w = beta ** np.arange(m - 1, -1, -1, dtype=np.float64)
    w /= w.sum()
    n_eff = 1 / np.sum(w**2)
    t, g = w @ t_all, w @ g_all
    if n_eff <= 1 + 1e-12:
        error = math.inf
        return (0.0, math.inf, error, n_eff) if z > 0 else (t / g, t / g, error, n_eff)
    vt = w @ (t_all - t) ** 2 / (n_eff - 1)
    vg = w @ (g_all - g) ** 2 / (n_eff - 1)
    c = w @ ((t_all - t) * (g_all - g)) / (n_eff - 1)
    relative = vt / t**2 + vg / g**2 - 2 * c / (t * g)
    error = math.sqrt(max(relative, 0.0)) if t > 0 and g > 0 else math.inf
    coefficients = [g * g - z * z * vg, -2 * (t * g - z * z * c), t * t - z * z * vt]
    roots = sorted(r.real for r in np.roots(coefficients) if abs(r.imag) <= 1e-12 * max(1.0, abs(r.real)))
    if t - z * math.sqrt(vt) <= 0:
        low = 0.0
    else:
        positive = [r for r in roots if r > 0]
        low = positive[0] if positive else math.inf
    high = roots[-1] if g - z * math.sqrt(vg) > 0 else math.inf
    return low, high, error, n_eff
