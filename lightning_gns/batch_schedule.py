"""The arithmetic of an adaptive batch: target batch sizes, the accumulation to reach them, learning-rate factors.

Pure functions of Python numbers, used by :class:`~lightning_gns.AdaptiveBatchSize` and tested on their own.
Batch sizes are in the units the noise scale is measured in (examples, or tokens with a ``batch_size_fn``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from lightning_gns._deprecation import renamed_argument

# The learning-rate rules, spelled here only. The fixed ones are a function of the batch ratio alone;
# "adascale" also needs the measured gradient statistics.
FixedLrScaling = Literal["none", "linear", "sqrt"]
LrScaling = Literal[FixedLrScaling, "adascale"]
FIXED_LR_SCALINGS: tuple[str, ...] = get_args(FixedLrScaling)
LR_SCALINGS: tuple[str, ...] = get_args(LrScaling)
Target = Literal["b_simple", "sqrt"]
TARGETS: tuple[str, ...] = get_args(Target)


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
        micro_batch_size: units in one micro-batch of one rank: the mean over the epoch's micro-batches so far
            (a float: token counts vary, and an epoch's last micro-batch may be short).
        world_size: number of ranks.
        step: optimizer steps taken so far (``trainer.global_step``).
        calibration: the ``B_crit / B_simple`` ratio the callback was given (:attr:`b_crit` applies it).
        b_simple_low: lower confidence bound of ``B_simple`` at the callback's ``z``.
        b_simple_high: upper confidence bound (``inf`` while ``|G|^2`` is within its noise).

    ``AdaptiveBatchSize`` calls a target function three times per decision: with ``b_simple`` set to the
    lower bound, to the upper bound, and to the estimate itself (for the record); a target should grow
    with ``b_simple``.
    """

    b_simple: float
    grad_sq_norm: float
    trace_cov: float
    effective_batch_size: float
    accumulation: int
    micro_batch_size: float
    world_size: int
    step: int
    calibration: float = 1.0
    b_simple_low: float = math.nan
    b_simple_high: float = math.nan

    @property
    def b_crit(self) -> float:
        """The critical-batch estimate ``calibration x B_simple`` (``B_simple`` itself without calibration)."""
        return self.calibration * self.b_simple


TargetFn = Callable[[NoiseScaleStatistics], float]


def sqrt_schedule(b_simple: float, r: float) -> float:
    """McCandlish et al. 2018, eq. D.3: the batch ``sqrt(r * B_noise)``, with ``B_simple`` standing in for ``B_noise``.

    Example:
        >>> sqrt_schedule(400.0, 25.0)
        100.0
    """
    return math.sqrt(r * b_simple)


def ema_effective_samples(beta: float, steps: int) -> float:
    """Effective sample count of a bias-corrected EMA with decay ``beta`` after ``steps`` updates.

    The EMA's weights are ``w_i = (1 - beta) beta^(n-i) / (1 - beta^n)``; the count is ``1 / sum(w_i^2)``
    (Kish's effective sample size), ``(1 - beta^n)(1 + beta) / ((1 - beta)(1 + beta^n))``: ``n`` for a
    short run, ``(1 + beta) / (1 - beta)`` for a long one.

    Example:
        >>> ema_effective_samples(0.9, 1), round(ema_effective_samples(0.9, 10**6), 6)
        (1.0, 19.0)
    """
    if steps <= 0:
        return 0.0
    decay = beta**steps
    return (1 - decay) * (1 + beta) / ((1 - beta) * (1 + decay))


def limit_growth(target_batch: float, current_batch: float, max_growth: float) -> float:
    """``target_batch`` clamped into ``[current / max_growth, current * max_growth]`` (batch-size warm-up steps).

    Example:
        >>> limit_growth(1000.0, 64.0, 2.0), limit_growth(10.0, 64.0, 2.0), limit_growth(100.0, 64.0, 2.0)
        (128.0, 32.0, 100.0)
    """
    if not math.isfinite(target_batch) or not math.isfinite(max_growth):
        return target_batch
    return min(max(target_batch, current_batch / max_growth), current_batch * max_growth)


def calibration_from_branch(b_crit: float, b_simple: float) -> float:
    """The ``B_crit / B_simple`` ratio from a branched critical-batch measurement and ``B_simple`` at its checkpoint.

    ``b_crit`` is the local critical batch that ``lightning-gns branch`` reports (multiplier x the base
    batch, in the noise scale's units), ``b_simple`` the noise scale the run had at the branch checkpoint.

    Example:
        >>> calibration_from_branch(b_crit=35.0, b_simple=92.0)  # the digits study of docs/critical_batch.md
        0.3804347826086957
    """
    for name, value in (("b_crit", b_crit), ("b_simple", b_simple)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite batch size, got {value!r}.")
    return float(b_crit) / float(b_simple)


def critical_batch_bound(multipliers: Iterable[float], local_multiplier: float) -> str:
    """``"at most"`` when a branched comparison's local critical batch stopped at the smallest multiplier tried (the
    next one already lost), ``"at least"`` when it reached the largest (none lost), else ``""`` (a value between
    two tried).

    Example:
        >>> [critical_batch_bound([1, 2, 4], k) for k in (1.0, 4.0, 2.0)]
        ['at most', 'at least', '']
    """
    tried = [float(k) for k in multipliers]
    if not math.isfinite(local_multiplier) or len(tried) < 2:
        return ""
    if local_multiplier <= min(tried):
        return "at most"
    if local_multiplier >= max(tried):
        return "at least"
    return ""


def calibration_from_branch_points(points: Iterable[Any], min_step: int = 0) -> float:
    """Geometric mean of ``local_critical_batch / b_simple`` over branch points at ``min_step`` or later.

    ``points`` are the :class:`~lightning_gns.tools.sweep.BranchPoint` objects of
    :func:`~lightning_gns.tools.sweep.branched_critical_batch` or the dictionaries of the ``branch.json`` that
    ``lightning-gns branch`` writes. Skip early points with ``min_step``: at initialisation ``B_simple`` has
    a transient. A point whose local critical batch is at the smallest or largest multiplier tried is only a bound
    (``bound``; inferred from the multipliers in a ``branch.json`` of an earlier version) and is left out, with a
    warning.

    Example:
        >>> points = [{"step": 100, "local_critical_batch": 16.0, "b_simple": 23.4},
        ...           {"step": 250, "local_critical_batch": 64.0, "b_simple": 47.1}]
        >>> round(calibration_from_branch_points(points), 3), round(calibration_from_branch_points(points, 200), 3)
        (0.964, 1.359)
    """

    def field(point: Any, name: str) -> Any:
        value = point[name] if isinstance(point, Mapping) else getattr(point, name)
        return math.nan if value is None else value  # branch.json writes a non-finite number as null

    def bound(point: Any) -> str:
        saved = point.get("bound") if isinstance(point, Mapping) else getattr(point, "bound", None)
        if saved is not None:
            return str(saved)
        # A branch.json of an earlier version: the base batch is examples / step.
        try:
            base = float(field(point, "examples")) / float(field(point, "step"))
            multiplier = float(field(point, "local_critical_batch")) / base
            multipliers = [float(k) for k in field(point, "multipliers")]
        except (KeyError, AttributeError, TypeError, ValueError, ZeroDivisionError):
            return ""
        return critical_batch_bound(multipliers, multiplier)

    late = [(p, bound(p)) for p in points if int(field(p, "step")) >= min_step]
    bounds = [int(field(p, "step")) for p, is_bound in late if is_bound]
    if bounds:
        warnings.warn(
            f"calibration_from_branch_points: the branch points at steps {bounds} hold a local critical batch at"
            " the smallest or largest multiplier tried, which is only a bound: they are left out. Branch with more"
            " multipliers to measure them.",
            stacklevel=2,
        )
    ratios = [
        calibration_from_branch(float(field(p, "local_critical_batch")), float(field(p, "b_simple")))
        for p, is_bound in late
        if not is_bound
    ]
    if not ratios:
        raise ValueError(
            f"No branch point at step >= {min_step} with a local critical batch between the multipliers tried: lower"
            " min_step, branch later in the run, or branch with more multipliers."
        )
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def interval_accumulation(
    target_low: float,
    target_high: float,
    accumulation: int,
    units_per_accumulation: float,
    min_accumulation: int,
    max_accumulation: int,
    tolerance: float,
    monotonic: bool,
    max_growth: float,
) -> tuple[int, str]:
    """The accumulation a confidence interval ``[target_low, target_high]`` of the target asks for, and why.

    Grow only when the lower bound is above the current effective batch ``B`` by more than the tolerance
    (``target_low > B (1 + tolerance)``), to the whole accumulation nearest the lower bound (at least one
    micro-batch more); shrink (``monotonic=False``) only when the upper bound is below ``B / (1 + tolerance)``,
    to the one nearest the upper bound (at least one fewer). One change moves the batch by at most a factor
    ``max_growth`` (rounding never steps past it) and stays within the accumulation bounds. An infinite lower
    bound grows by ``max_growth`` (to ``max_accumulation`` without a limit).

    Example:
        >>> interval_accumulation(700.0, 2000.0, 2, 32.0, 1, 64, tolerance=0.25, monotonic=True, max_growth=2.0)
        (4, 'target >= 700 > 64 x 1.25: grow to 128 (max_growth 2)')
        >>> interval_accumulation(50.0, 2000.0, 2, 32.0, 1, 64, tolerance=0.25, monotonic=False, max_growth=2.0)[1]
        'target in [50, 2000]: 64 within it (tolerance 0.25), keep'
    """
    current = accumulation * units_per_accumulation
    low, high = float(target_low), float(target_high)
    if math.isnan(low) or math.isnan(high) or units_per_accumulation <= 0:
        return accumulation, f"no usable target ({low:.4g} .. {high:.4g})"
    band = 1 + tolerance
    if low > current * band:
        head = f"target >= {low:.4g} > {current:.4g} x {band:g}"
        if accumulation >= max_accumulation:
            return accumulation, f"{head}: at max_accumulation {max_accumulation}"
        wanted = low if math.isinf(max_growth) else min(low, current * max_growth)
        new = max_accumulation if math.isinf(wanted) else max(round(wanted / units_per_accumulation), accumulation + 1)
        limit = f" (max_growth {max_growth:g})" if math.isfinite(max_growth) and wanted < low else ""
        if math.isfinite(max_growth):
            new = min(new, math.floor(accumulation * max_growth))
        new = min(new, max_accumulation)
        if new <= accumulation:
            return accumulation, f"{head}: max_growth {max_growth:g} allows no whole micro-batch more"
        return new, f"{head}: grow to {new * units_per_accumulation:.4g}{limit}"
    if high < current / band:
        head = f"target <= {high:.4g} < {current:.4g} / {band:g}"
        if monotonic:
            return accumulation, f"{head}: monotonic, keep"
        if accumulation <= min_accumulation:
            return accumulation, f"{head}: at min_accumulation {min_accumulation}"
        wanted = high if math.isinf(max_growth) else max(high, current / max_growth)
        new = min(round(wanted / units_per_accumulation), accumulation - 1)
        limit = f" (max_growth {max_growth:g})" if math.isfinite(max_growth) and wanted > high else ""
        if math.isfinite(max_growth):
            new = max(new, math.ceil(accumulation / max_growth))
        new = max(new, min_accumulation)
        if new >= accumulation:
            return accumulation, f"{head}: max_growth {max_growth:g} allows no whole micro-batch less"
        return new, f"{head}: shrink to {new * units_per_accumulation:.4g}{limit}"
    return accumulation, f"target in [{low:.4g}, {high:.4g}]: {current:.4g} within it (tolerance {tolerance:g}), keep"


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


def adascale_gain(
    trace_cov: float, grad_sq_norm: float, scale: float, base_batch: float = 1.0, **renamed: float
) -> float:
    """AdaScale's gain ``(s^2 + |G|^2) / (s^2 / S + |G|^2)``, with ``s^2 = tr(Sigma) / base_batch``.

    ``s^2`` is the gradient variance of the base batch ``B_0`` (the batch the learning rate was tuned for),
    ``tr(Sigma)`` the per-unit one the noise scale measures, and ``S`` the batch ratio. It is also the ratio
    of McCandlish et al.'s optimal learning rates (eq. 2.6) at the two batches,
    ``(1 + B_simple / B_0) / (1 + B_simple / B_new)``. It lies between 1 (no noise) and ``S`` (only noise);
    a non-positive ``|G|^2`` average reads as only noise, a non-positive ``tr(Sigma)`` as none.
    ``reference_batch=`` is the deprecated name of ``base_batch``.

    Example:
        >>> adascale_gain(trace_cov=30.0, grad_sq_norm=1.0, scale=3.0, base_batch=10.0)
        2.0
    """
    old = renamed_argument("adascale_gain", renamed, "reference_batch", "base_batch")
    base_batch = base_batch if old is None else old
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite batch ratio, got {scale!r}.")
    if not (math.isfinite(base_batch) and base_batch > 0):
        raise ValueError(f"base_batch must be a positive finite batch size, got {base_batch!r}.")
    low, high = min(1.0, scale), max(1.0, scale)
    if trace_cov == math.inf and math.isfinite(grad_sq_norm):
        return scale  # only noise
    if not (math.isfinite(trace_cov) and math.isfinite(grad_sq_norm)):
        return 1.0  # not known: no gain
    if trace_cov <= 0:
        return 1.0
    if grad_sq_norm <= 0:
        return scale
    noise = trace_cov / base_batch
    gain = (noise + grad_sq_norm) / (noise / scale + grad_sq_norm)
    return min(max(gain, low), high)


def lr_factor(
    rule: LrScaling,
    scale: float,
    trace_cov: float = math.nan,
    grad_sq_norm: float = math.nan,
    base_batch: float = 1.0,
    **renamed: float,
) -> float:
    """The learning-rate multiplier for an effective batch ``scale`` times the base one (``base_batch``).

    ``"none"``: 1. ``"linear"``: ``S`` (SGD, Goyal et al. 2017). ``"sqrt"``: ``sqrt(S)`` (Adam-type
    optimizers). ``"adascale"``: :func:`adascale_gain` from the measured statistics. ``reference_batch=`` is
    the deprecated name of ``base_batch``.

    Example:
        >>> [lr_factor(rule, 4.0) for rule in ("none", "linear", "sqrt")]
        [1.0, 4.0, 2.0]
    """
    old = renamed_argument("lr_factor", renamed, "reference_batch", "base_batch")
    base_batch = base_batch if old is None else old
    if rule == "none":
        return 1.0
    if rule == "linear":
        return float(scale)
    if rule == "sqrt":
        return math.sqrt(scale)
    if rule == "adascale":
        return adascale_gain(trace_cov, grad_sq_norm, scale, base_batch)
    raise ValueError(f"Unknown lr_scaling {rule!r}. Choose one of {', '.join(repr(r) for r in LR_SCALINGS)}.")


__all__ = [
    "FIXED_LR_SCALINGS",
    "LR_SCALINGS",
    "TARGETS",
    "FixedLrScaling",
    "LrScaling",
    "NoiseScaleStatistics",
    "Target",
    "TargetFn",
    "adascale_gain",
    "calibration_from_branch",
    "calibration_from_branch_points",
    "ema_effective_samples",
    "interval_accumulation",
    "is_safe_boundary",
    "limit_growth",
    "lr_factor",
    "sqrt_schedule",
]
