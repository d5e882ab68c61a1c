"""Paired step-level timing shared by the benchmark scripts (overhead.py, per_example.py, gpu_check.py).

A busy machine drifts by tens of percent within seconds, so the time of a whole fit against another fit
says little about a cost of a few percent. These helpers compare steps that are close in time instead:

* measured against idle: with ``measure_every_n_steps=2`` measured and idle steps alternate, and each
  measured step's time is divided by the mean of its two idle neighbours (:func:`measured_vs_idle`);
* idle against no callback: short fits with and without the callback alternate, and the median idle step
  of each fit with the callback is divided by the mean of the medians of the fits just before and after it
  without (:func:`idle_vs_without`).

Each ratio is a sample; reported are its median and quartiles (:func:`summary`), the quartiles being the
noise of the run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor


class StepTimer:
    """Wall time of each optimizer step, from its first micro-batch's start to its last micro-batch's end.

    Lightning calls callbacks in list order, so the span covers every other callback's hooks only if its
    start is the first callback and its end the last: pass ``[timer.first, ..., timer.last]``. ``sync``
    (CUDA) waits for the device at both ends, so that a step's kernels are counted in that step.
    """

    def __init__(self, sync: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.sync = sync
        self.clock = clock  # time.process_time: this process's CPU time, less disturbed by a busy machine
        self.times: list[float] = []  # seconds, one per optimizer step
        self.steps: list[int] = []  # trainer.global_step when the step started (0-based step index)
        self._start = 0.0
        self._micro = 0
        timer = self

        class _First(Callback):
            def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, idx: int) -> None:
                if timer._micro == 0:
                    if timer.sync:
                        torch.cuda.synchronize()
                    timer._start = timer.clock()
                    timer.steps.append(trainer.global_step)

        class _Last(Callback):
            def on_train_batch_end(
                self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
            ) -> None:
                timer._micro += 1
                if timer._micro == trainer.accumulate_grad_batches:
                    if timer.sync:
                        torch.cuda.synchronize()
                    timer.times.append(timer.clock() - timer._start)
                    timer._micro = 0

        self.first: Callback = _First()
        self.last: Callback = _Last()

    def by_step(self, skip: int) -> dict[int, float]:
        """Step index -> time, without the first ``skip`` steps (warm-up)."""
        return {s: t for s, t in zip(self.steps, self.times, strict=False) if s >= skip}


def measured_vs_idle(by_step: dict[int, float], every: int = 2) -> list[float]:
    """Each measured step (index % every == 0) over the mean of its two idle neighbours, where both were timed."""
    ratios = []
    for step, t in by_step.items():
        if step % every == 0 and step - 1 in by_step and step + 1 in by_step:
            ratios.append(t / statistics.fmean((by_step[step - 1], by_step[step + 1])))
    return ratios


def idle_steps(by_step: dict[int, float], every: int = 2) -> list[float]:
    return [t for s, t in by_step.items() if s % every != 0]


def idle_vs_without(with_idle: Sequence[float], without: Sequence[float]) -> list[float]:
    """Fits alternate W0 G0 W1 G1 ... Wn: ratio i is G_i / mean(W_i, W_{i+1}) (medians of each fit's steps)."""
    if len(without) != len(with_idle) + 1:
        raise ValueError(f"need one more fit without than with, got {len(without)} and {len(with_idle)}")
    return [g / statistics.fmean((without[i], without[i + 1])) for i, g in enumerate(with_idle)]


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def summary(values: Sequence[float], digits: int = 3) -> str:
    """``median [q1, q3] (n)``, or ``n/a`` when there are no samples."""
    if not values:
        return "n/a"
    q1, q3 = quartiles(values)
    return f"{statistics.median(values):.{digits}f} [{q1:.{digits}f}, {q3:.{digits}f}] ({len(values)})"


def norm_pass(grads: list[Tensor]) -> Tensor:
    """One fused pass over the gradients: the squared norm a measured step needs per gradient it norms."""
    return torch.stack(torch._foreach_norm(grads, 2)).square().sum()


def floor_ratios(step: Callable[[], list[Tensor]], iters: int, sync: bool = False) -> list[float]:
    """Time of one fused norm pass over the gradients relative to the plain step just before it, per iteration.

    ``step`` runs one plain training step (zero_grad, forward, backward, optimizer step) and returns the
    gradients. Two warm-up iterations are dropped.
    """

    def now() -> float:
        if sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    ratios = []
    for i in range(iters + 2):
        start = now()
        grads = step()
        mid = now()
        norm_pass(grads)
        end = now()
        if i >= 2:
            ratios.append((end - mid) / (mid - start))
    return ratios
