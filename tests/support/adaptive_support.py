"""A linear model that records every optimizer step, a float64 check of each step's update, and the schedule
the AdaptiveBatchSize tests train (its data, ``adaptive()`` settings and ``fit()``).

Shared by tests/test_adaptive.py, test_schedule.py, test_checkpoint_validation.py and support/adaptive_ddp_worker.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.batch_schedule import NoiseScaleStatistics
from lightning_gns.estimators import unbiased_estimates
from support.models import LinearProblem, loader
from support.trainers import make_trainer

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


# The schedule the AdaptiveBatchSize tests train.
MICRO = 4
MICRO_BATCHES = 25  # per epoch
DIM = 5
LR = 0.05
PROBLEM = LinearProblem(dim=DIM, seed=3)
X, Y = PROBLEM.sample(MICRO * MICRO_BATCHES, seed=4)
# Accumulation wanted from each step on. Traced by hand for 25 micro-batches per epoch: 1 -> 3 waits one
# step (2 micro-batches done, not a multiple of 3), 3 -> 2 waits one, 2 -> 5 waits two, 5 -> 4 switches at
# the end of epoch 0, 4 -> 1, 1 -> 3 waits one, and epoch 1 ends with a one-micro-batch window of k = 3.
WANTED = {2: 3, 5: 2, 8: 5, 11: 4, 14: 1, 16: 3}
EXPECTED_HISTORY = [(0, 1), (3, 3), (6, 2), (10, 5), (11, 4), (14, 1), (17, 3)]


def adaptive(target: Any = None, **kwargs: Any) -> AdaptiveBatchSize:
    settings: dict[str, Any] = {
        "target": scheduled_target(WANTED) if target is None else target,
        "warmup_steps": 2,
        "min_steps_between_changes": 1,
        "check_every_n_steps": 1,
        "tolerance": 0.0,
        "monotonic": False,
        "lr_scaling": "linear",
        "max_accumulation": 8,
        # The scheduled targets jump by up to 3x and need no estimate: the growth limit and the readiness
        # checks have tests of their own.
        "max_growth": math.inf,
        "min_samples": 0,
        "z": 0.0,
    }
    return AdaptiveBatchSize(**{**settings, **kwargs})


def fit(
    callback: AdaptiveBatchSize,
    model: LightningModule | None = None,
    *,
    with_gns: bool = True,
    extra_callbacks: tuple[Callback, ...] = (),
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, LightningModule]:
    gns = [GradientNoiseScale(beta=0.9)] if with_gns else []
    trainer = make_trainer([*gns, callback, *extra_callbacks], **{"max_epochs": 2, **trainer_kwargs})
    model = model if model is not None else RecordingRegression(DIM, LR, PROBLEM.w)
    trainer.fit(model, loader(X, Y, MICRO), ckpt_path=ckpt_path)
    return trainer, model


def micro_batch(j: int) -> tuple[Tensor, Tensor]:
    return X[j * MICRO : (j + 1) * MICRO], Y[j * MICRO : (j + 1) * MICRO]


def check_windows(steps: list[dict[str, Any]], scheduler_lr: Callable[[int], float], first_step: int = 0) -> None:
    """Each update is -lr x factor x (1/k) x the summed micro-batch gradients of exactly its window.

    The windows are rebuilt from the data order (no shuffling) and the accumulation of each step: they
    tile every epoch in order, each micro-batch once; the recorded ``training_step`` inputs must agree.
    """
    start: dict[int, int] = {}
    for i, step in enumerate(steps):
        k = step["accumulation"]
        begin = start.get(step["epoch"], 0)
        end = min(begin + k, MICRO_BATCHES)
        assert step["batch_idx"] == end - 1, (i, step["batch_idx"], begin, k)
        start[step["epoch"]] = end
        window = [micro_batch(j) for j in range(begin, end)]
        assert len(step["window"]) == len(window)
        for (x, y), (x_ref, y_ref) in zip(step["window"], window, strict=True):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        lr = scheduler_lr(first_step + i)
        assert step["scheduler_lr"] == pytest.approx(lr, rel=1e-12)
        assert step["lr_after"] == step["scheduler_lr"]  # the factor lives only inside optimizer.step()
        factor = float(k)  # "linear", starting accumulation 1
        expected = step["before"].double() - lr * factor / k * window_mean_grad(step["before"], window)
        torch.testing.assert_close(step["after"].double(), expected, rtol=1e-5, atol=1e-6)
    assert all(end == MICRO_BATCHES for end in start.values())


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

        def recording_fold(summary: Any, big_sq_norm: Tensor) -> Tensor:
            g, t = unbiased_estimates(summary, big_sq_norm)
            nearly_singular = fold(summary, big_sq_norm)
            self.estimates.append((float(g), float(t)))
            low, high = metric.confidence_interval(self.z)
            self.intervals.append((float(low), float(high), float(metric.relative_error())))
            return nearly_singular

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
