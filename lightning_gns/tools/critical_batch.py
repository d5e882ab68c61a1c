"""Fit the steps/examples trade-off of McCandlish et al. (2018) and derive the critical batch size.

Pure numpy: nothing here imports torch or Lightning, so the fit can run on a table of results anywhere.

**The relation.** Runs that train to the same target loss with different constant batch sizes ``B`` need
``S`` optimizer steps and ``E = B * S`` examples, and the paper's eq. 2.11 says they lie on the hyperbola

    (S / S_min - 1) (E / E_min - 1) = 1,        B_crit = E_min / S_min   (eq. 2.12).

Substituting ``E = B S`` and expanding: ``(S - S_min)(B S - E_min) = S_min E_min`` becomes
``B S^2 - S (E_min + B S_min) = 0``, whose non-zero root is

    S(B) = S_min + E_min / B = S_min (1 + B_crit / B),      E(B) = B S_min + E_min = E_min (1 + B / B_crit).

Run-to-run scatter of ``S`` is roughly proportional to ``S`` (a run that needs twice the steps also wanders
twice as long), so the fit is least squares in ``log S``: ``log S = log S_min + log(1 + B_crit / B)``. For a
given ``B_crit`` the best ``log S_min`` is the mean of ``log S_obs - log(1 + B_crit / B)``, which leaves one
unknown, searched over ``log B_crit`` (a grid, then golden section), with the two limits ``B_crit = 0``
(``S`` constant) and ``B_crit = inf`` (``S = E_min / B``, no step floor) as candidates. With multiplicative
scatter this estimates the median run. Least squares in the relative residuals ``(S_obs - S(B)) / S_obs``,
linear in ``(S_min, E_min)``, was used before: it weights a run that happened to be fast more than a slow
one, and with lognormal scatter of 0.35 put ``S_min`` and ``E_min`` ~14% low.

**Uncertainty.** ``bootstrap_fit`` resamples the runs *within each batch size* (so every batch size keeps its
number of runs, i.e. it resamples seeds) and refits; the percentile interval of ``B_crit`` over the
resamples is reported. With three seeds per batch size this is a rough interval, not a precise one.

Example::

    >>> import numpy as np
    >>> b = np.array([8, 16, 32, 64, 128, 256])
    >>> s = 100.0 * (1 + 64 / b)  # S_min = 100 steps, B_crit = 64, E_min = 6400 examples
    >>> fit = fit_tradeoff(b, s)
    >>> round(fit.s_min, 6), round(fit.e_min, 3), round(fit.b_crit, 6)
    (100.0, 6400.0, 64.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
ArrayLike = Sequence[float] | npt.NDArray[np.floating] | npt.NDArray[np.integer]


class CriticalBatchError(ValueError):
    """Input the trade-off fit cannot use: too few batch sizes, a run that never reached its target, ..."""


@dataclass(frozen=True)
class TradeoffFit:
    """The fitted trade-off ``S(B) = S_min + E_min / B`` and its critical batch size ``E_min / S_min``."""

    s_min: float
    e_min: float
    num_runs: int
    num_batch_sizes: int
    # Root mean square of the relative residuals (S_obs - S_fit) / S_obs: how well one hyperbola explains
    # the runs; far above the seed-to-seed scatter means the trade-off model does not describe them.
    rel_rms: float

    @property
    def b_crit(self) -> float:
        """``E_min / S_min`` (eq. 2.12); ``inf`` when the fit puts ``S_min`` at 0 (no step floor seen)."""
        return self.e_min / self.s_min if self.s_min > 0 else math.inf

    def steps(self, batch_size: ArrayLike | float) -> FloatArray:
        """Fitted optimizer steps to the target at ``batch_size``: ``S_min (1 + B_crit / B)``."""
        b = np.asarray(batch_size, dtype=np.float64)
        return np.asarray(self.s_min + self.e_min / b, dtype=np.float64)

    def examples(self, batch_size: ArrayLike | float) -> FloatArray:
        """Fitted examples to the target at ``batch_size``: ``E_min (1 + B / B_crit)``."""
        b = np.asarray(batch_size, dtype=np.float64)
        return np.asarray(b * self.s_min + self.e_min, dtype=np.float64)


@dataclass(frozen=True)
class BootstrapResult:
    """A fit with percentile intervals from resampling the runs (seeds) within each batch size."""

    fit: TradeoffFit
    s_min_interval: tuple[float, float]
    e_min_interval: tuple[float, float]
    b_crit_interval: tuple[float, float]
    b_crit_samples: FloatArray
    confidence: float


def _validate(batch_sizes: ArrayLike, steps: ArrayLike) -> tuple[FloatArray, FloatArray]:
    b = np.asarray(batch_sizes, dtype=np.float64).reshape(-1)
    s = np.asarray(steps, dtype=np.float64).reshape(-1)
    if b.shape != s.shape:
        raise CriticalBatchError(f"batch_sizes and steps differ in length: {b.size} and {s.size}.")
    if not np.all(np.isfinite(b)) or np.any(b <= 0):
        raise CriticalBatchError(f"Batch sizes must be positive and finite, got {b.tolist()}.")
    missing = sorted(
        {int(x) if float(x).is_integer() else float(x) for x, y in zip(b, s, strict=True) if not np.isfinite(y)}
    )
    if missing:
        raise CriticalBatchError(
            f"Runs at batch sizes {missing} never reached the target loss (steps is not finite): raise the"
            " step budget, choose a higher target, or leave those runs out."
        )
    if np.any(s <= 0):
        raise CriticalBatchError(f"Steps to the target must be positive, got {s.tolist()}.")
    if np.unique(b).size < 2:
        raise CriticalBatchError(
            f"The trade-off has two unknowns (S_min, E_min): runs at two or more different batch sizes are needed,"
            f" got batch sizes {np.unique(b).tolist()}."
        )
    return b, s


# Golden-section refinement between the neighbours of the best grid point.
_GRID_POINTS = 241
_GRID_MARGIN = 12.0  # natural-log units of B_crit beyond the batch sizes: e^12 ~ 1.6e5 times
_GOLDEN = (math.sqrt(5) - 1) / 2


def _log_fit(b: FloatArray, log_s: FloatArray) -> tuple[float, float]:
    """``(S_min, E_min)`` minimising the squared residuals of ``log S`` (see the module docstring)."""

    def profile(log_b_crit: FloatArray) -> tuple[FloatArray, FloatArray]:
        # (candidates, runs): residuals after the best log S_min of each candidate B_crit.
        shape = np.log1p(np.exp(log_b_crit)[:, None] / b[None, :])
        residual = log_s[None, :] - shape
        log_s_min = residual.mean(axis=1)
        return np.sum((residual - log_s_min[:, None]) ** 2, axis=1), log_s_min

    log_b = np.log(b)
    grid = np.linspace(log_b.min() - _GRID_MARGIN, log_b.max() + _GRID_MARGIN, _GRID_POINTS)
    losses, _ = profile(grid)
    best = int(np.argmin(losses))
    # The limits, exactly: S constant (B_crit = 0) and S = E_min / B (S_min = 0).
    flat = log_s - log_s.mean()
    floorless = log_s + log_b
    limits = [
        (float(np.sum(flat**2)), math.exp(float(log_s.mean())), 0.0),
        (float(np.sum((floorless - floorless.mean()) ** 2)), 0.0, math.exp(float(floorless.mean()))),
    ]
    if best in (0, grid.size - 1):  # still falling at the grid's edge: the limit on that side is the optimum
        _, s_min, e_min = limits[0] if best == 0 else limits[1]
        return s_min, e_min
    lo, hi = float(grid[best - 1]), float(grid[best + 1])
    for _ in range(50):  # the bracket shrinks to ~1e-11 of a grid step
        left, right = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        pair, _ = profile(np.array([left, right]))
        if pair[0] <= pair[1]:
            hi = right
        else:
            lo = left
    log_b_crit = np.array([(lo + hi) / 2])
    loss, log_s_min = profile(log_b_crit)
    interior = (float(loss[0]), math.exp(float(log_s_min[0])), math.exp(float(log_s_min[0] + log_b_crit[0])))
    _, s_min, e_min = min([interior, *limits], key=lambda candidate: candidate[0])
    return s_min, e_min


def fit_tradeoff(batch_sizes: ArrayLike, steps: ArrayLike) -> TradeoffFit:
    """Fit ``S = S_min + E_min / B`` to runs (one row per run; repeat batch sizes for seeds).

    Least squares in ``log S``, ``S_min, E_min >= 0`` (see the module docstring for the derivation from
    eq. 2.11 and the search).

    >>> fit = fit_tradeoff([16, 16, 64, 64], [110.0, 90.0, 40.0, 40.0])
    >>> round(fit.b_crit, 1)
    62.9
    """
    b, s = _validate(batch_sizes, steps)
    s_min, e_min = _log_fit(b, np.log(s))
    rel = (s - (s_min + e_min / b)) / s
    return TradeoffFit(
        s_min=s_min,
        e_min=e_min,
        num_runs=int(b.size),
        num_batch_sizes=int(np.unique(b).size),
        rel_rms=float(np.sqrt(np.mean(rel**2))),
    )


def bootstrap_fit(
    batch_sizes: ArrayLike,
    steps: ArrayLike,
    num_resamples: int = 2000,
    confidence: float = 0.9,
    seed: int = 0,
) -> BootstrapResult:
    """``fit_tradeoff`` plus percentile intervals from resampling runs within each batch size.

    With a single run at some batch size, resampling cannot show the scatter there: the intervals are NaN
    (undefined) rather than of zero width.

    >>> b = [8, 8, 8, 32, 32, 32, 128, 128, 128]
    >>> s = [300, 330, 270, 100, 110, 90, 55, 50, 45]
    >>> result = bootstrap_fit(b, s, num_resamples=200)
    >>> lo, hi = result.b_crit_interval
    >>> lo < result.fit.b_crit < hi
    True
    """
    if not 0 < confidence < 1:
        raise CriticalBatchError(f"confidence must be in (0, 1), got {confidence}.")
    if num_resamples < 1:
        raise CriticalBatchError(f"num_resamples must be positive, got {num_resamples}.")
    b, s = _validate(batch_sizes, steps)
    fit = fit_tradeoff(b, s)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(b == value) for value in np.unique(b)]
    samples = np.empty((num_resamples, 3))
    for i in range(num_resamples):
        index = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups])
        resampled = fit_tradeoff(b[index], s[index])
        samples[i] = (resampled.s_min, resampled.e_min, resampled.b_crit)
    tail = 100 * (1 - confidence) / 2

    single = min(g.size for g in groups) < 2

    def interval(column: int) -> tuple[float, float]:
        if single:
            return math.nan, math.nan
        # No interpolation between order statistics: a resample without a step floor has B_crit = inf.
        lo, hi = np.percentile(samples[:, column], [tail, 100 - tail], method="inverted_cdf")
        return float(lo), float(hi)

    return BootstrapResult(
        fit=fit,
        s_min_interval=interval(0),
        e_min_interval=interval(1),
        b_crit_interval=interval(2),
        b_crit_samples=samples[:, 2].copy(),
        confidence=confidence,
    )


def steps_to_target(steps: ArrayLike, losses: ArrayLike, target: float) -> float:
    """Optimizer steps at which a loss curve first reaches ``target``; ``nan`` if it never does.

    Between the last evaluation above the target and the first at or below it, the crossing is interpolated
    linearly in log loss (losses fall roughly exponentially over a short stretch), so coarse evaluation
    intervals do not round every run up to its next evaluation.

    >>> round(steps_to_target([0, 10, 20], [2.0, 1.0, 0.5], 0.5**0.5), 6)
    15.0
    >>> steps_to_target([0, 10], [2.0, 1.0], 0.5)
    nan
    """
    x = np.asarray(steps, dtype=np.float64).reshape(-1)
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise CriticalBatchError(f"steps and losses differ in length: {x.size} and {y.size}.")
    if not target > 0:
        raise CriticalBatchError(f"The target loss must be positive (it is compared in log space), got {target}.")
    below = np.flatnonzero(np.isfinite(y) & (y <= target))
    if below.size == 0:
        return math.nan
    i = int(below[0])
    if i == 0 or not np.isfinite(y[i - 1]) or y[i - 1] <= 0 or y[i] <= 0:
        return float(x[i])
    frac = (math.log(y[i - 1]) - math.log(target)) / (math.log(y[i - 1]) - math.log(y[i]))
    return float(x[i - 1] + frac * (x[i] - x[i - 1]))


def local_critical_batch(multipliers: ArrayLike, losses: ArrayLike, tolerance: float) -> float:
    """Largest batch multiplier ``k`` of a branched-training comparison (Merrill et al. 2025) that still keeps up.

    Branches from the same checkpoint train on the same number of examples with batch ``k * B``. Going up
    from the smallest ``k``, a branch keeps up when its loss is at most ``(1 + tolerance)`` times the best
    loss of the smaller multipliers; the answer is the last ``k`` before the first one that does not (the
    smallest ``k`` always counts). At the smallest or the largest ``k`` the answer is only a bound (at most, at
    least: :func:`lightning_gns.batch_schedule.critical_batch_bound`); ``nan`` when the smallest ``k``'s loss is
    not finite (it diverged).

    >>> local_critical_batch([1, 2, 4, 8], [1.00, 0.99, 1.02, 1.30], tolerance=0.05)
    4.0
    """
    k = np.asarray(multipliers, dtype=np.float64).reshape(-1)
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    if k.shape != y.shape or k.size == 0:
        raise CriticalBatchError("multipliers and losses must be non-empty and of equal length.")
    if tolerance < 0:
        raise CriticalBatchError(f"tolerance must be non-negative, got {tolerance}.")
    order = np.argsort(k)
    k, y = k[order], y[order]
    if not np.isfinite(y[0]):
        return math.nan
    best = y[0]
    result = float(k[0])
    for multiplier, loss in zip(k[1:], y[1:], strict=True):
        if not (np.isfinite(loss) and loss <= best * (1 + tolerance)):
            break
        result = float(multiplier)
        best = min(best, float(loss))
    return result
