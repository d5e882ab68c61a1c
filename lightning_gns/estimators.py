"""Unbiased estimators of |G|^2 and tr(Sigma) from gradient norms at two batch sizes.

Pure tensor functions: no state, no distributed calls. The stateful averaging lives in
:class:`lightning_gns.GradientNoiseScaleMetric`.

Notation
--------
``G`` is the true (full-data) gradient and ``Sigma`` the covariance of per-example gradients. A
gradient ``g`` of a loss that is the *mean* over ``b`` i.i.d. examples satisfies
``E|g|^2 = |G|^2 + tr(Sigma) / b`` (McCandlish et al. 2018, eq. A.1).

The paper's form (equal small batches)
--------------------------------------
With ``S_small`` the mean squared norm of gradients of batch size ``b_small`` and ``S_big`` the
squared norm of one gradient of batch size ``b_big``::

    |G|^2     ~ (b_big * S_big - b_small * S_small) / (b_big - b_small)
    tr(Sigma) ~ (S_small - S_big) / (1 / b_small - 1 / b_big)

:func:`paper_estimates` implements exactly this.

The weighted form (small batches of unequal size)
-------------------------------------------------
In practice the small batches differ: the last micro-batch of an epoch is short, and Lightning's
accumulated gradient weights every micro-batch equally (each micro-batch loss is divided by the
accumulation factor), not every example. So let the step hold ``n`` small batches with mean-loss
gradients ``g_i`` over ``b_i`` examples, and let the big-batch gradient be their weighted mean
``G_big = sum_i w_i g_i / W`` with ``W = sum_i w_i`` (``w_i = b_i`` when every example counts the same,
``w_i = 1`` for Lightning's gradient accumulation). Since the ``g_i`` are independent,

    E[A]         = B |G|^2 + n tr(Sigma)          with A = sum_i b_i |g_i|^2, B = sum_i b_i
    E|G_big|^2   = |G|^2 + Q tr(Sigma)            with Q = sum_i w_i^2 / b_i / W^2

Two linear equations in the two unknowns; solving them gives estimators that are unbiased for any
sizes and weights::

    D         = n - Q B
    |G|^2     ~ (n |G_big|^2 - Q A) / D
    tr(Sigma) ~ (A - B |G_big|^2) / D

Weighting the small batches by ``b_i`` in ``A`` is inverse-variance weighting (each ``g_i`` has noise
``tr(Sigma)/b_i``); ``A - B |G_big|^2 = sum_i b_i |g_i - G_big|^2`` when ``w_i = b_i``, the between-group
sum of squares of a one-way ANOVA. With equal sizes and ``w_i = b_i`` the weighted form reduces to the
paper's form with ``b_small = b`` and ``b_big = n b``.

``D > 0`` exactly when the big-batch gradient is less noisy than the small batches (``Q < n / B``); ``D < 0``
(equal weights on sizes far apart) is solved all the same, unbiased. A single small batch gives ``D = 0``: the
step carries no information about the noise, and the estimators return NaN so that callers can skip it like
any other unmeasurable step.

All the sums are additive over processes, so a distributed run sums a :class:`SmallBatchSummary`
with one all-reduce.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

# Relative tolerance below which D = n - Q B counts as zero (a single small batch, or weights that
# make the big batch no less noisy than the small ones).
_DEGENERATE_TOLERANCE = 1e-9
# The least share of an equal-sized step's information (step_information) a step must hold to be averaged:
# below it, its estimates are more than 4x as noisy as those of a step of as many small batches of equal size.
MIN_STEP_INFORMATION = 0.25


class SmallBatchSummary(NamedTuple):
    """Sufficient statistics of one optimizer step's small batches; every field adds over processes."""

    size_weighted_sq_norm_sum: Tensor
    """A = sum_i b_i |g_i|^2."""
    num_small_batches: Tensor
    """n."""
    size_sum: Tensor
    """B = sum_i b_i, the big batch size."""
    weight_sum: Tensor
    """W = sum_i w_i."""
    weight_sq_over_size_sum: Tensor
    """sum_i w_i^2 / b_i."""

    def stack(self) -> Tensor:
        """All fields as one 1-D tensor (for a single all-reduce)."""
        return torch.stack(tuple(self))

    @classmethod
    def from_stacked(cls, stacked: Tensor) -> SmallBatchSummary:
        return cls(*stacked.unbind())


# One optimizer step's statistics packed into one float64 vector, so that a distributed run sums them with a
# single all-reduce: A = sum_i b_i |g_i|^2 at SUM_INDEX, then the counts n, B, W, sum_i w_i^2 / b_i (COUNTS),
# then |G_big|^2 at BIG_INDEX. A caller that packs other per-step data (per-parameter vectors) keeps the
# COUNT_FIELDS counts together and rebuilds the summary with summary_from_counts.
SUM_INDEX = 0
COUNT_FIELDS = len(SmallBatchSummary._fields) - 1
COUNTS = slice(1, 1 + COUNT_FIELDS)
BIG_INDEX = 1 + COUNT_FIELDS
STEP_SIZE = BIG_INDEX + 1


def pack_step(summary: SmallBatchSummary, big_sq_norm: Tensor) -> Tensor:
    """``summary`` and ``|G_big|^2`` as one vector of :data:`STEP_SIZE` (for a single all-reduce)."""
    return torch.cat([summary.stack(), big_sq_norm.reshape(1).to(summary.size_sum)])


def unpack_step(packed: Tensor) -> tuple[SmallBatchSummary, Tensor]:
    """The summary and ``|G_big|^2`` of a vector in the :func:`pack_step` layout.

    Example:
        >>> import torch
        >>> s = summarize_small_batches(torch.tensor([5.0, 3.0]), torch.tensor([4.0, 4.0]))
        >>> summary, big = unpack_step(pack_step(s, torch.tensor(3.5)))
        >>> float(summary.size_sum), float(big)
        (8.0, 3.5)
    """
    return summary_from_counts(packed[SUM_INDEX], packed[COUNTS]), packed[BIG_INDEX]


def summary_from_counts(size_weighted_sq_norm_sum: Tensor, counts: Tensor) -> SmallBatchSummary:
    """A summary from ``A`` and the :data:`COUNT_FIELDS` counts ``n, B, W, sum w^2/b`` in that order."""
    return SmallBatchSummary(size_weighted_sq_norm_sum, *counts.unbind())


def _unless_negative(term: Tensor, least_count: Tensor) -> Tensor:
    """``term``, or NaN (the step is skipped as not finite) where a count from ``batch_size_fn`` is negative.

    Decided on the device: reading the counts would synchronise with it on every step.
    """
    return torch.where(least_count < 0, torch.full_like(term, float("nan")), term)


class StepSums:
    """Running sums of one optimizer step's small batches on this process: the :class:`SmallBatchSummary` fields.

    Two ways in: :meth:`add` takes small batches as the estimator sees them (mean-loss gradients ``g_i`` with
    sizes and weights), :meth:`add_backward` takes one backward pass of a training loop as a gradient-norm
    source saw it (each small batch's gradient still scaled by its share of the micro-batch's mean loss, every
    backward weighted alike). ``A`` is a ``(P,)`` vector when the norms come in ``P`` parts (per parameter);
    counts stay host numbers while the sizes are, so filling them in costs no host-to-device copy.

    Example (two micro-batches of 4 examples, each backward's norm taken whole):
        >>> import torch
        >>> sums = StepSums()
        >>> sums.add_backward(torch.tensor([[5.0]]), 4)
        >>> sums.add_backward(torch.tensor([[3.0]]), 4)
        >>> [float(x) for x in sums.summary()]
        [32.0, 2.0, 8.0, 2.0, 0.5]
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.size_weighted_sq_norm_sum: Tensor | None = None  # A = sum_i b_i |g_i|^2, None before any small batch
        self.num_small_batches: int | Tensor = 0
        self.size_sum: int | Tensor = 0
        self.weight_sum: float | Tensor = 0.0
        self.weight_sq_over_size_sum: float | Tensor = 0.0
        self.backward_passes = 0
        self.measured: tuple[bool, ...] = ()  # which parts got a norm in some backward of the step
        self.failed: str | None = None  # why the step cannot be measured (the last reason), or None

    def add(self, small_sq_norms: Tensor, small_sizes: Tensor, small_weights: Tensor | None = None) -> None:
        """Small batches given as :func:`summarize_small_batches` takes them."""
        sq_norms = small_sq_norms.reshape(-1).to(torch.float64)
        sizes = small_sizes.reshape(-1).to(device=sq_norms.device, dtype=torch.float64)
        if sq_norms.shape != sizes.shape:
            raise ValueError(
                f"small_sq_norms and small_sizes must have one entry per small batch, got {tuple(sq_norms.shape)}"
                f" and {tuple(sizes.shape)}"
            )
        if small_weights is None:
            weights = sizes
        else:
            weights = small_weights.reshape(-1).to(device=sq_norms.device, dtype=torch.float64)
            if weights.shape != sizes.shape:
                raise ValueError(f"small_weights must have {sizes.numel()} entries, got {weights.numel()}")
        self._add_sq_sum((sizes * sq_norms).sum())
        self.num_small_batches = self.num_small_batches + sizes.numel()
        self.size_sum = self.size_sum + sizes.sum()
        self.weight_sum = self.weight_sum + weights.sum()
        self.weight_sq_over_size_sum = self.weight_sq_over_size_sum + (weights.square() / sizes).sum()

    def add_backward(
        self, sq_norms: Tensor, units: int | Tensor, by_example: bool = False, measured: tuple[bool, ...] = ()
    ) -> None:
        """One backward pass of a loss that is the mean over ``units``, weighted 1 in the big batch.

        Args:
            sq_norms: ``(P, S)``: the squared norm of the gradient each of ``S`` small batches gave each of ``P``
                parts, as the backward saw it (scaled by the small batch's share of the mean loss).
            units: the backward's examples (or tokens), shared evenly by the small batches; with ``by_example``
                a 1-D tensor of each example's units (each column is one example, with its own share).
            by_example: the columns are the micro-batch's examples (else one column: the whole micro-batch).
            measured: which of the ``P`` parts received a norm in this backward.
        """
        sq = sq_norms.to(torch.float64)
        units_sum: int | Tensor
        if by_example and isinstance(units, Tensor) and units.dim() == 1:
            counts = units.to(device=sq.device, dtype=torch.float64)
            if counts.numel() != sq.shape[1]:
                self.add_failed_backward(
                    f"batch_size_fn returned {counts.numel()} per-example counts for {sq.shape[1]} examples"
                )
                return
            # Example i holds c_i units and a share s_i = c_i / u of the mean loss (u = sum c_i), so the backward
            # saw s_i g_i: its term of A = sum_i b_i |g_i|^2 is c_i (u / c_i)^2 |raw_i|^2 = u^2 / c_i |raw_i|^2.
            # Examples without units (all padding) are no small batch.
            units_sum = counts.sum()
            has_units = counts > 0
            weights = torch.where(has_units, units_sum.square() / counts.clamp(min=1), torch.zeros_like(counts))
            term = _unless_negative(sq @ weights, counts.amin())
            self.num_small_batches = self.num_small_batches + has_units.sum()
        else:
            # Equal shares 1 / S of u units: each term is (u / S) (S |raw_i|)^2 = u S |raw_i|^2 (u |raw|^2 for a
            # backward whose one small batch is the micro-batch).
            # An integer tensor of units would make 1 / u a float32 (torch's default dtype): sum in float64.
            units_sum = units.to(torch.float64).sum() if isinstance(units, Tensor) else units
            term = sq.sum(dim=1) * (units_sum * sq.shape[1])
            if isinstance(units, Tensor):  # a 0-d count of zero already makes the step's sums infinite
                term = _unless_negative(term, units.to(torch.float64).amin())
            self.num_small_batches = self.num_small_batches + sq.shape[1]
        self._add_sq_sum(term)
        if measured:
            before = self.measured
            self.measured = measured if not before else tuple(a or b for a, b in zip(before, measured, strict=True))
        self._add_backward_counts(units_sum)

    def add_failed_backward(self, reason: str) -> None:
        """A backward pass whose norms cannot be used: the step is counted as run, and skipped."""
        self.failed = reason
        self._add_backward_counts(1)

    def _add_backward_counts(self, units_sum: int | Tensor) -> None:
        # W: 1 per backward pass; sum w^2/b: the shares' sum_i s_i^2 / c_i = 1 / u per backward pass.
        self.size_sum = self.size_sum + units_sum
        if isinstance(units_sum, Tensor):
            inverse: float | Tensor = 1.0 / units_sum.to(torch.float64)
        else:  # a count of zero (an empty micro-batch with a backward) makes the step's sums infinite: skipped
            inverse = 1.0 / units_sum if units_sum else math.inf
        self.weight_sq_over_size_sum = self.weight_sq_over_size_sum + inverse
        self.weight_sum = self.weight_sum + 1.0
        self.backward_passes += 1

    def _add_sq_sum(self, term: Tensor) -> None:
        total = self.size_weighted_sq_norm_sum
        self.size_weighted_sq_norm_sum = term if total is None else total + term

    def fill_counts(self, out: Tensor) -> None:
        """``n, B, W, sum w^2/b`` into ``out`` (:data:`COUNT_FIELDS` entries).

        Host numbers are written with ``fill_`` (the number travels as a kernel argument): item assignment
        would copy a host scalar to the device and wait for it, a host sync per field on CUDA. Device tensors
        (per-example counts) are copied on the device.
        """
        counts = (self.num_small_batches, self.size_sum, self.weight_sum, self.weight_sq_over_size_sum)
        for i, value in enumerate(counts):
            if isinstance(value, Tensor):
                out[i].copy_(value)
            else:
                out[i].fill_(value)

    def summary(self, device: torch.device | None = None) -> SmallBatchSummary:
        """The sums as float64 tensors (``A`` summed over its parts; NaN before any small batch)."""
        total = self.size_weighted_sq_norm_sum
        if device is None:
            device = total.device if total is not None else torch.device("cpu")
        counts = torch.empty(COUNT_FIELDS, dtype=torch.float64, device=device)
        self.fill_counts(counts)
        if total is None:
            total = torch.full((), float("nan"), dtype=torch.float64, device=device)
        return summary_from_counts(total.to(device=device, dtype=torch.float64).sum(), counts)


def summarize_small_batches(
    small_sq_norms: Tensor,
    small_sizes: Tensor,
    small_weights: Tensor | None = None,
) -> SmallBatchSummary:
    """Reduce one step's small batches to the additive statistics of the weighted estimator.

    Args:
        small_sq_norms: ``|g_i|^2`` for each small batch, where ``g_i`` is the gradient of the *mean*
            loss over that small batch.
        small_sizes: ``b_i``, the number of examples (or tokens) in each small batch.
        small_weights: ``w_i``, the weight of each small batch in the big-batch gradient
            ``G_big = sum_i w_i g_i / sum_i w_i``. Default: ``small_sizes`` (every example counts the same).

    Example:
        >>> import torch
        >>> s = summarize_small_batches(torch.tensor([5.0, 3.0]), torch.tensor([4.0, 4.0]))
        >>> [float(x) for x in s]
        [32.0, 2.0, 8.0, 8.0, 8.0]
    """
    sums = StepSums()
    sums.add(small_sq_norms, small_sizes, small_weights)
    return sums.summary()


def unbiased_estimates(summary: SmallBatchSummary, big_sq_norm: Tensor) -> tuple[Tensor, Tensor]:
    """Unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from summarized small batches and the big batch.

    Args:
        summary: the step's small batches, from :func:`summarize_small_batches` (summed over processes).
        big_sq_norm: ``|G_big|^2`` with ``G_big = sum_i w_i g_i / sum_i w_i``.

    Returns:
        ``(grad_sq_norm, trace_cov)``; both NaN when the step holds no information about the noise
        (fewer than two small batches), or too little to average (:func:`step_information` below
        :data:`MIN_STEP_INFORMATION`: equal weights on sizes far apart, near ``D = 0``). Individual
        ``grad_sq_norm`` estimates can be negative: average them, never clamp them.

    Example:
        >>> import torch
        >>> s = summarize_small_batches(torch.tensor([5.0, 3.0]), torch.tensor([4.0, 4.0]))
        >>> g2, tr = unbiased_estimates(s, torch.tensor(3.5))
        >>> float(g2), float(tr)
        (3.0, 4.0)
    """
    grad_sq_norm, trace_cov, _ = estimates_of_step(summary, big_sq_norm)
    return grad_sq_norm, trace_cov


def estimates_of_step(summary: SmallBatchSummary, big_sq_norm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`unbiased_estimates` and whether the step was found nearly singular (a 0-d bool tensor: its estimates
    are NaN for that reason), computed once for both."""
    a, n, b, w, w2_over_b = (t.to(torch.float64) for t in summary)
    big = big_sq_norm.to(device=a.device, dtype=torch.float64)
    big_noise_coef = w2_over_b / w.square()
    determinant = n - big_noise_coef * b
    # Zero for a single small batch (nothing to tell noise from signal). Negative is no problem: with equal weights
    # and sizes far apart (21 and 324 tokens) the system is still well posed and the estimates unbiased. Near zero
    # (equal weights on sizes about 6x apart: a short last window) the estimates are unbiased but hundreds of times
    # noisier than a normal step's, and one such step would swamp the averages for hundreds of steps.
    nearly_singular = (n >= 2) & (step_information(summary) < MIN_STEP_INFORMATION)
    degenerate = (determinant.abs() <= _DEGENERATE_TOLERANCE * n) | nearly_singular
    determinant = torch.where(degenerate, torch.full_like(determinant, float("nan")), determinant)
    grad_sq_norm = (n * big - big_noise_coef * a) / determinant
    trace_cov = (a - b * big) / determinant
    return grad_sq_norm, trace_cov, nearly_singular


def step_information(summary: SmallBatchSummary) -> Tensor:
    """How much a step tells about ``tr(Sigma)``, as a share of what a step of as many small batches of equal size
    tells: 1 for equal sizes, and for any sizes where ``w_i = b_i``; below 1 for equal weights on unequal sizes.

    The ``tr(Sigma)`` estimate is ``z^T K z / D`` in the small batches' standardised noise ``z_i`` (covariance
    ``Sigma``), with ``K = I - B v v^T``, ``v_i = w_i / (W sqrt(b_i))``, ``|v|^2 = Q`` and ``tr K = D``; for Gaussian
    noise its variance is ``2 tr(K^2) tr(Sigma^2) / D^2`` with ``tr(K^2) = n - 2 B Q + (B Q)^2``, and ``n - 1`` for
    equal sizes. The share is the ratio of the two inverse variances, ``D^2 / tr(K^2) / (n - 1)`` (NaN for one small
    batch).

    Example:
        >>> import torch
        >>> equal = summarize_small_batches(torch.tensor([5.0, 3.0]), torch.tensor([4.0, 4.0]), torch.ones(2))
        >>> short_last = summarize_small_batches(torch.tensor([5.0, 3.0]), torch.tensor([35.0, 6.0]), torch.ones(2))
        >>> round(float(step_information(equal)), 3), float(step_information(short_last)) < 1e-5
        (1.0, True)
    """
    _, n, b, w, w2_over_b = (t.to(torch.float64) for t in summary)
    bq = b * w2_over_b / w.square()
    determinant = n - bq
    return determinant.square() / (n - 2 * bq + bq.square()) / (n - 1)


def weighted_estimates(
    small_sq_norms: Tensor,
    big_sq_norm: Tensor,
    small_sizes: Tensor,
    small_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`unbiased_estimates` of one process's small batches (see the module docstring).

    Example:
        >>> import torch
        >>> g2, tr = weighted_estimates(torch.tensor([5.0, 3.0]), torch.tensor(3.5), torch.tensor([4.0, 4.0]))
        >>> float(g2), float(tr)
        (3.0, 4.0)
    """
    return unbiased_estimates(summarize_small_batches(small_sq_norms, small_sizes, small_weights), big_sq_norm)


def paper_estimates(
    small_sq_norm: Tensor | float,
    big_sq_norm: Tensor | float,
    b_small: float,
    b_big: float,
) -> tuple[Tensor, Tensor]:
    """McCandlish et al. 2018, Appendix A.1: equal small batches of size ``b_small``.

    Args:
        small_sq_norm: mean of ``|g_small|^2`` over the small batches.
        big_sq_norm: ``|g_big|^2``.
        b_small: small batch size.
        b_big: big batch size (``> b_small``).

    Example:
        >>> g2, tr = paper_estimates(4.0, 3.5, 4, 8)
        >>> float(g2), float(tr)
        (3.0, 4.0)
    """
    if not b_big > b_small > 0:
        raise ValueError(f"need b_big > b_small > 0, got b_small={b_small}, b_big={b_big}")
    s_small = torch.as_tensor(small_sq_norm, dtype=torch.float64)
    s_big = torch.as_tensor(big_sq_norm, dtype=torch.float64)
    grad_sq_norm = (b_big * s_big - b_small * s_small) / (b_big - b_small)
    trace_cov = (s_small - s_big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq_norm, trace_cov


def simple_noise_scale(trace_cov: Tensor, grad_sq_norm: Tensor) -> Tensor:
    """``B_simple = tr(Sigma) / |G|^2`` read out from (averaged) estimates.

    NaN when either input is NaN (no estimate yet); ``inf`` when the ``|G|^2`` average is not positive
    (the noise dominates any signal the estimate can resolve); a negative ``tr(Sigma)`` average reads
    as 0. Clamping happens here, at read-out, never before averaging.

    Example:
        >>> import torch
        >>> float(simple_noise_scale(torch.tensor(40.0), torch.tensor(2.0)))
        20.0
    """
    ratio = trace_cov.clamp(min=0) / grad_sq_norm
    infinite = torch.full_like(ratio, float("inf"))
    ratio = torch.where(grad_sq_norm > 0, ratio, infinite)
    return torch.where(trace_cov.isnan() | grad_sq_norm.isnan(), torch.full_like(ratio, float("nan")), ratio)


# ------------------------------------------------------------------ the quality of an averaged estimate
# A metric keeps EMAs (decay beta, the same steps as its averages) of these per-step values, in this order:
# 1 (the weight 1 - beta^m after m measured steps), tr(Sigma), |G|^2, their squares and their product.
MOMENT_FIELDS = ("weight", "trace_cov", "grad_sq_norm", "trace_cov_sq", "grad_sq_norm_sq", "cross")


def step_moments(trace_cov: Tensor, grad_sq_norm: Tensor) -> Tensor:
    """One step's values in the :data:`MOMENT_FIELDS` order (float64), to be folded into an EMA."""
    t, g = trace_cov.to(torch.float64), grad_sq_norm.to(torch.float64)
    return torch.stack([torch.ones_like(t), t, g, t * t, g * g, t * g])


class EstimateSpread(NamedTuple):
    """Averaged ``tr(Sigma)`` and ``|G|^2`` estimates with the (co)variances of those averages."""

    trace_cov: Tensor
    grad_sq_norm: Tensor
    var_trace_cov: Tensor
    """Variance of the averaged ``tr(Sigma)`` estimate (not of one step's)."""
    var_grad_sq_norm: Tensor
    cov: Tensor
    samples: Tensor
    """Kish's effective sample count of the EMA, ``1 / sum_i w_i^2``."""


def spread_from_moments(moments: Tensor, beta: float) -> EstimateSpread:
    """Means, and variances of the means, from EMAs (decay ``beta``) of :func:`step_moments`.

    With normalised EMA weights ``w_i`` the average has effective sample count ``n = 1 / sum w_i^2``
    ``= W (1 + beta) / ((1 - beta)(2 - W))`` (``W = 1 - beta^m``), and the unbiased variance of the average
    is the weighted spread over ``n - 1``: ``sum w_i (x_i - mean)^2 / (n - 1)``. With ``n <= 1`` (fewer than
    two steps) the variances are ``inf``; before any step everything is NaN. Per-step estimates are taken
    to be independent (they are computed from disjoint batches).

    Example:
        >>> import torch
        >>> one = torch.tensor(1.0)
        >>> m = 0.5 * 0.5 * step_moments(2 * one, one) + 0.5 * step_moments(4 * one, one)  # beta 0.5, two steps
        >>> s = spread_from_moments(m, 0.5)
        >>> round(float(s.trace_cov), 4), round(float(s.samples), 4), round(float(s.var_trace_cov), 4)
        (3.3333, 1.8, 1.1111)
    """
    m = moments.to(torch.float64)
    weight = m[0]
    mean = m[1:] / weight
    t, g, tt, gg, tg = mean.unbind()
    samples = weight * (1 + beta) / ((1 - beta) * (2 - weight))
    spread = samples > 1
    over = 1 / torch.where(spread, samples - 1, torch.ones_like(samples))
    inf = torch.full_like(samples, float("inf"))
    var_t = torch.where(spread, (tt - t * t).clamp(min=0) * over, inf)
    var_g = torch.where(spread, (gg - g * g).clamp(min=0) * over, inf)
    cov = torch.where(spread, (tg - t * g) * over, torch.zeros_like(samples))
    return EstimateSpread(t, g, var_t, var_g, cov, samples)


def relative_error(spread: EstimateSpread) -> Tensor:
    """Relative standard error of ``B_simple = tr(Sigma) / |G|^2`` by the delta method for a ratio of averages.

    ``se^2 / B^2 = v_T / T^2 + v_G / G^2 - 2 c / (T G)`` with ``v``, ``c`` the (co)variances of the averages.
    ``inf`` while either average is not positive or there are fewer than two samples.

    Example:
        >>> import torch
        >>> one = torch.tensor(1.0, dtype=torch.float64)
        >>> s = EstimateSpread(10 * one, one, 0 * one, one / 25, 0 * one, 25 * one)
        >>> round(float(relative_error(s)), 6)
        0.2
    """
    t, g, v_t, v_g, c, samples = spread
    relative = v_t / t.square() + v_g / g.square() - 2 * c / (t * g)
    error = relative.clamp(min=0).sqrt()
    usable = (t > 0) & (g > 0) & (samples > 1) & error.isfinite()
    return torch.where(usable, error, torch.full_like(error, float("inf")))


def noise_scale_interval(spread: EstimateSpread, z: float) -> tuple[Tensor, Tensor]:
    """Confidence bounds ``(low, high)`` of ``B_simple`` at ``z`` standard errors (Fieller's construction).

    A ratio ``rho`` is too small when ``T - rho G > z sd(T - rho G)`` and too large when
    ``rho G - T > z sd(T - rho G)``, with ``Var(T - rho G) = v_T - 2 rho c + rho^2 v_G``: the delta
    method applied to the linear combination rather than to the ratio, so the bounds stay meaningful
    while ``|G|^2`` is within its noise. They are roots of
    ``(G^2 - z^2 v_G) rho^2 - 2 (T G - z^2 c) rho + T^2 - z^2 v_T``. For a precise estimate they are
    ``B (1 -+ z r)`` to first order in the :func:`relative_error` ``r``. Cases:

    - ``high = inf`` when ``|G|^2``'s lower bound ``G - z sd(G)`` is not positive (no ratio is too large);
    - ``low = 0`` when ``tr(Sigma)``'s lower bound ``T - z sd(T)`` is not positive;
    - ``low`` is large when ``T`` is resolved and ``G`` is not: about ``T / (z sd(G))`` at ``G = 0``;
    - ``z = 0`` gives ``low = high = B_simple`` (with its read-out rules: ``inf`` for ``G <= 0``, 0 for ``T <= 0``).

    NaN before the first estimate. Fewer than two samples: ``(0, inf)`` for ``z > 0``.

    Example:
        >>> import torch
        >>> one = torch.tensor(1.0, dtype=torch.float64)
        >>> s = EstimateSpread(10 * one, one, 0 * one, one / 100, 0 * one, 100 * one)
        >>> [round(float(b), 4) for b in noise_scale_interval(s, 1.0)]
        [9.0909, 11.1111]
        >>> [float(b) for b in noise_scale_interval(s._replace(grad_sq_norm=0 * one), 1.0)]
        [100.0, inf]
    """
    t, g, v_t, v_g, c, _ = spread
    z2 = float(z) ** 2

    def scaled(v: Tensor) -> Tensor:  # z^2 v, with z = 0 meaning "no spread" even where v is inf
        return torch.zeros_like(v) if z2 == 0 else z2 * v

    quad = g.square() - scaled(v_g)
    half_lin = t * g - scaled(c)
    const = t.square() - scaled(v_t)
    root = (half_lin.square() - quad * const).clamp(min=0).sqrt()
    inf = torch.full_like(t, float("inf"))
    zero = torch.zeros_like(t)
    # low: the smallest positive root, written C / (b + sqrt(disc)) to avoid cancellation; no positive
    # root while T is resolved means every ratio is too small (G is resolved and negative).
    denominator = half_lin + root
    low = torch.where(denominator > 0, const / denominator, inf)
    low = torch.where((t <= 0) | (const <= 0), zero, low)
    high = torch.where((g > 0) & (quad > 0), ((half_lin + root) / quad).clamp(min=0), inf)
    low = torch.minimum(low, high)
    unknown = t.isnan() | g.isnan()
    nan = torch.full_like(t, float("nan"))
    return torch.where(unknown, nan, low), torch.where(unknown, nan, high)
