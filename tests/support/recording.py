"""A test-only callback that records what the GradientNoiseScale callback saw and reported."""

from __future__ import annotations

import math
from typing import Any

import pytest
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_gns import GradientNoiseScale
from support.reference import MicroBatch, reference_run


class Recorder(Callback):
    """Keeps every micro-batch (with the weights it was evaluated at) and the callback's values per step.

    Reads the metric with host syncs on every step, which is fine in tests and why it is not in the package.
    """

    def __init__(self, gns: GradientNoiseScale) -> None:
        self.gns = gns
        self.micro_batches: list[MicroBatch] = []
        self.history: list[dict[str, float]] = []
        self.loss_scales: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        x, y = batch
        weight = pl_module.linear.weight.detach()  # type: ignore[union-attr]
        if hasattr(weight, "full_tensor"):  # FSDP2 shards it (a collective: every rank records every batch)
            weight = weight.full_tensor()
        weight = weight.reshape(-1).clone()
        self.micro_batches.append(
            MicroBatch(trainer.global_step, x.clone(), y.clone(), weight, trainer.accumulate_grad_batches)
        )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Runs after GradientNoiseScale's hook (callbacks run in list order; the recorder comes last).
        metric = self.gns.metric
        self.history.append(
            {
                "step": trainer.global_step,
                "grad_sq_norm": float(metric.grad_sq_norm),
                "trace_cov": float(metric.trace_cov),
                "b_simple": float(metric.b_simple),
                "b_big": float(metric.last_b_big),
                "skipped": int(metric.skipped_steps),
            }
        )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.loss_scales.append(float(scaler.get_scale()))


def assert_matches_reference(
    recorder: Recorder, world_size: int, beta: float, rel: float = 1e-4, per_example: bool = False
) -> None:
    expected = reference_run(recorder.micro_batches, world_size=world_size, beta=beta, per_example=per_example)
    measured = [h for h in recorder.history if not math.isnan(h["grad_sq_norm"])]
    assert len(measured) == len(expected) > 0
    for got, want in zip(measured, expected, strict=True):
        assert got["step"] == want["step"]
        assert got["b_big"] == want["b_big"]
        for key in ("grad_sq_norm", "trace_cov", "b_simple"):
            assert got[key] == pytest.approx(want[key], rel=rel), (key, got["step"])
