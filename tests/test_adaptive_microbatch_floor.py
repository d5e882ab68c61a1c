"""AdaptiveBatchSize may not lower the accumulation below 2 while GradientNoiseScale measures micro-batches."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from support.adaptive_support import scheduled_target
from support.models import LinearProblem, LinearRegression, loader
from support.trainers import make_trainer

PROBLEM = LinearProblem(dim=5, seed=3)
X, Y = PROBLEM.sample(4 * 24, seed=4)


def fit(callbacks: list[Callback], ckpt_path: str | None = None, **kwargs: Any) -> Trainer:
    trainer = make_trainer(callbacks, **{"accumulate_grad_batches": 4, **kwargs})
    trainer.fit(LinearRegression(PROBLEM, lr=0.05), loader(X, Y, 4), ckpt_path=ckpt_path)
    return trainer


def shrinking(**kwargs: Any) -> AdaptiveBatchSize:
    """Asks for one micro-batch per step from step 2 on (at once: no readiness wait, no growth limit)."""
    settings: dict[str, Any] = {
        "min_samples": 0,
        "z": 0.0,
        "max_growth": math.inf,
        "target": scheduled_target({2: 1}),
        "warmup_steps": 1,
        "min_steps_between_changes": 1,
        "check_every_n_steps": 1,
        "tolerance": 0.0,
        "monotonic": False,
        "max_accumulation": 8,
    }
    return AdaptiveBatchSize(**{**settings, **kwargs})


@pytest.mark.parametrize("gns_first", [True, False])
@pytest.mark.parametrize("mode", ["auto", "microbatch"])
def test_non_monotonic_schedule_that_can_reach_one_is_refused(gns_first: bool, mode: str) -> None:
    gns, adaptive = GradientNoiseScale(beta=0.9, mode=mode), shrinking()  # type: ignore[arg-type]
    callbacks: list[Callback] = [gns, adaptive] if gns_first else [adaptive, gns]  # type: ignore[list-item]
    with pytest.raises(
        MisconfigurationException,
        match=r"can lower the accumulation to 1 \(monotonic=False with min_accumulation=1\), but GradientNoiseScale"
        r" measures in mode='microbatch'.* AdaptiveBatchSize\(min_accumulation=2\) or more, or"
        r" AdaptiveBatchSize\(monotonic=True\) .* or GradientNoiseScale\(mode='per_example'\)",
    ):
        fit(callbacks)


@pytest.mark.parametrize(
    ("gns_kwargs", "adaptive_kwargs", "accumulation"),
    [
        ({}, {"min_accumulation": 2}, 2),
        ({}, {"monotonic": True}, 4),
        ({"mode": "per_example"}, {}, 1),
    ],
)
def test_fixes_named_in_the_message_measure_every_step(
    gns_kwargs: dict[str, Any], adaptive_kwargs: dict[str, Any], accumulation: int
) -> None:
    gns, adaptive = GradientNoiseScale(beta=0.9, **gns_kwargs), shrinking(**adaptive_kwargs)
    trainer = fit([gns, adaptive])  # type: ignore[list-item]
    assert adaptive.accumulation == accumulation
    assert int(gns.metric.skipped_steps) == 0
    assert int(gns.metric.measured_steps) == trainer.global_step > 0


def test_resumed_accumulation_of_one_is_refused(tmp_path: Path) -> None:
    # Started at accumulation 1 (measured per example), resumed with microbatch measurement: monotonic=True
    # keeps the checkpoint's accumulation 1, with which micro-batches measure nothing.
    first = AdaptiveBatchSize(monotonic=True, warmup_steps=1000)
    trainer = fit([GradientNoiseScale(beta=0.9), first], accumulate_grad_batches=1)  # type: ignore[list-item]
    assert first.accumulation == 1
    ckpt = tmp_path / "k1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = AdaptiveBatchSize(monotonic=True, warmup_steps=1000)
    with pytest.raises(MisconfigurationException, match=r"lower the accumulation to 1 \(the checkpoint's accumulation"):
        fit(
            [GradientNoiseScale(beta=0.9), resumed],  # type: ignore[list-item]
            ckpt_path=str(ckpt),
            accumulate_grad_batches=4,
            max_epochs=2,
        )
    assert torch.load(ckpt, weights_only=False)["callbacks"]["AdaptiveBatchSize"]["accumulation"] == 1
