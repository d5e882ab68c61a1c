"""The arithmetic of an adaptive batch: target batch sizes, the accumulation to reach them, learning-rate factors.

Pure functions of Python numbers, used by :class:`~lightning_gns.AdaptiveBatchSize` and tested on their own.
Batch sizes are in the units the noise scale is measured in (examples, or tokens with a ``batch_size_fn``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

LrScaling = Literal["none", "linear", "sqrt", "adascale"]
LR_SCALINGS: tuple[str, ...] = ("none", "linear", "sqrt", "adascale")
TARGETS: tuple[str, ...] = ("b_simple", "sqrt")


@dataclass(frozen=True)
class NoiseScaleStatistics:
    """What a target function sees at a decision step (Python floats, identical on every rank).

    Attributes:
        b_simple: the measured ``B_simple`` (NaN before the first estimate, ``inf`` while the ``|G|^2``
            average is not positive).
        grad_sq_norm: averaged ``|G|^2`` estimate.
        trace_cov: averaged ``tr(Sigma)`` estimate (per unit: per example or per token).
        effective_batch_size: units per optimizer step now (micro-batch x accumulation x ranks).
        accumulation: current ``accumulate_grad_batches``.
        micro_batch_size: units in one micro-batch of one rank.
        world_size: number of ranks.
        step: optimizer steps taken so far (``trainer.global_step``).
    """

    b_simple: float
    grad_sq_norm: float
    trace_cov: float
    effective_batch_size: float
    accumulation: int
    micro_batch_size: int
    world_size: int
    step: int


TargetFn = Callable[[NoiseScaleStatistics], float]


def sqrt_schedule(b_simple: float, r: float) -> float:
    """McCandlish et al. 2018, eq. D.3: the batch ``sqrt(r * B_noise)``, with ``B_simple`` standing in for ``B_noise``.

    Example:
        >>> sqrt_schedule(400.0, 25.0)
        100.0
    """
    return math.sqrt(r * b_simple)


def accumulation_for(
    target_batch: float,
    accumulation: int,
    units_per_accumulation: float,
    min_accumulation: int,
    max_accumulation: int,
    tolerance: float,
    monotonic: bool,
) -> int:
    """The accumulation that brings the effective batch nearest to ``target_batch``, or ``accumulation`` to stay.

    ``units_per_accumulation`` is what one unit of accumulation adds to the effective batch (micro-batch size
    x ranks). A target within a factor ``1 + tolerance`` of the current effective batch, a non-finite or
    non-positive target, and (``monotonic``) a smaller target all keep the current accumulation.

    Example:
        >>> accumulation_for(300.0, 2, 32.0, 1, 64, tolerance=0.25, monotonic=True)
        9
        >>> accumulation_for(70.0, 2, 32.0, 1, 64, tolerance=0.25, monotonic=True)  # within 25% of 64
        2
    """
    if not math.isfinite(target_batch) or target_batch <= 0 or units_per_accumulation <= 0:
        return accumulation
    current = accumulation * units_per_accumulation
    ratio = target_batch / current
    if 1 / (1 + tolerance) <= ratio <= 1 + tolerance:
        return accumulation
    if monotonic and ratio < 1:
        return accumulation
    wanted = max(1, round(target_batch / units_per_accumulation))
    wanted = min(max(wanted, min_accumulation), max_accumulation)
    if monotonic:
        wanted = max(wanted, accumulation)
    return wanted


def is_safe_boundary(batches_done: int, new_accumulation: int, epoch_ended: bool) -> bool:
    """Whether an accumulation can change right after the optimizer step that closed ``batches_done`` micro-batches.

    Lightning zeroes the gradients at ``batch_idx % k == 0`` and steps at ``(batch_idx + 1) % k == 0``
    (counted within the epoch), so a new ``k`` starts a clean window only where the micro-batches done so
    far in the epoch are a multiple of it; every ``k`` is clean when the next micro-batch opens an epoch.

    Example:
        >>> is_safe_boundary(12, 4, epoch_ended=False), is_safe_boundary(12, 5, epoch_ended=False)
        (True, False)
    """
    return epoch_ended or batches_done % new_accumulation == 0


def adascale_gain(trace_cov: float, grad_sq_norm: float, scale: float, reference_batch: float = 1.0) -> float:
    """AdaScale's gain ``(s^2 + |G|^2) / (s^2 / S + |G|^2)``, with ``s^2 = tr(Sigma) / reference_batch``.

    ``s^2`` is the gradient variance of the reference batch (the batch the learning rate was tuned for),
    ``tr(Sigma)`` the per-unit one the noise scale measures, and ``S`` the batch ratio. It is also the ratio
    of McCandlish et al.'s optimal learning rates (eq. 2.6) at the two batches,
    ``(1 + B_simple / B_ref) / (1 + B_simple / B_new)``. It lies between 1 (no noise) and ``S`` (only noise);
    a non-positive ``|G|^2`` average reads as only noise, a non-positive ``tr(Sigma)`` as none.

    Example:
        >>> adascale_gain(trace_cov=30.0, grad_sq_norm=1.0, scale=3.0, reference_batch=10.0)
        2.0
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite batch ratio, got {scale!r}.")
    low, high = min(1.0, scale), max(1.0, scale)
    if not (math.isfinite(trace_cov) and math.isfinite(grad_sq_norm)):
        return 1.0
    if trace_cov <= 0:
        return 1.0
    if grad_sq_norm <= 0:
        return scale
    noise = trace_cov / reference_batch
    gain = (noise + grad_sq_norm) / (noise / scale + grad_sq_norm)
    return min(max(gain, low), high)


def lr_factor(
    rule: LrScaling,
    scale: float,
    trace_cov: float = math.nan,
    grad_sq_norm: float = math.nan,
    reference_batch: float = 1.0,
) -> float:
    """The learning-rate multiplier for an effective batch ``scale`` times the reference one.

    ``"none"``: 1. ``"linear"``: ``S`` (SGD, Goyal et al. 2017). ``"sqrt"``: ``sqrt(S)`` (Adam-type
    optimizers). ``"adascale"``: :func:`adascale_gain` from the measured statistics.

    Example:
        >>> [lr_factor(rule, 4.0) for rule in ("none", "linear", "sqrt")]
        [1.0, 4.0, 2.0]
    """
    if rule == "none":
        return 1.0
    if rule == "linear":
        return float(scale)
    if rule == "sqrt":
        return math.sqrt(scale)
    if rule == "adascale":
        return adascale_gain(trace_cov, grad_sq_norm, scale, reference_batch)
    raise ValueError(f"Unknown lr_scaling {rule!r}. Choose one of {', '.join(repr(r) for r in LR_SCALINGS)}.")


__all__ = [
    "LR_SCALINGS",
    "TARGETS",
    "LrScaling",
    "NoiseScaleStatistics",
    "TargetFn",
    "accumulation_for",
    "adascale_gain",
    "is_safe_boundary",
    "lr_factor",
    "sqrt_schedule",
]
