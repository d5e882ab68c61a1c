"""One float64 fit in per_example mode, checked against the float64 per-example recomputation."""

from __future__ import annotations

from typing import Any

import torch

from lightning_gns import GradientNoiseScale
from support.reference_func import BatchRecorder, assert_histories_match, reference_history
from support.trainers import fit64, param_names


def fit_and_check(model: Any, batch_size: int, left_out: tuple[str, ...]) -> GradientNoiseScale:
    """Fit ``model`` (a zoo module with ``data`` and ``example_loss``) on 5 micro-batches of ``batch_size`` and check
    that exactly the parameters under ``left_out`` are left out, no step is skipped, and the rest matches the
    float64 recomputation. A ``checkpointed`` attribute is switched off for the reference: torch.func refuses
    activation checkpoints, and the arithmetic is the same."""
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    recorder = BatchRecorder(gns)
    fit64([gns, recorder], model, type(model).data(batch_size * 5, batch_size=batch_size))
    assert gns.skipped_steps == 0
    assert set(gns.left_out) == set(param_names(model)) - set(param_names(model, left_out)), gns.left_out
    if hasattr(model, "checkpointed"):
        model.checkpointed = None
    kept = param_names(model, left_out)
    want = reference_history(
        model, recorder.micro_batches, type(model).example_loss, lambda step: kept,
        lambda batch: torch.ones(len(batch[0])), beta=0.8,
    )  # fmt: skip
    assert_histories_match(recorder.history, want)
    return gns
