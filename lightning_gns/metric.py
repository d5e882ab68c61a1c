"""Bias-corrected exponential moving averages of the unbiased |G|^2 and tr(Sigma) estimates."""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from lightning_gns.estimators import (
    MOMENT_FIELDS,
    EstimateSpread,
    SmallBatchSummary,
    StepSums,
    estimates_of_step,
    noise_scale_interval,
    pack_step,
    relative_error,
    simple_noise_scale,
    spread_from_moments,
    unpack_step,
)

# The Metric's states, in the order add_state registers them: what its state_dict (and a checkpoint) holds.
STATE_NAMES = (
    "grad_sq_norm_ema",
    "trace_cov_ema",
    "ema_weight",
    "measured_steps",
    "skipped_steps",
    "last_b_small",
    "last_b_big",
    "estimate_moments",
)

# The z of the logged interval gns/b_simple_low .. gns/b_simple_high: one standard error either side.
LOGGED_Z = 1.0


def validate_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 < float(beta) < 1.0:
        raise ValueError(
            f"beta must be a number strictly between 0 and 1 (the EMA decay per optimizer step), got {beta!r}."
            " Typical values: 0.9 (reacts within ~10 steps) to 0.999 (averages ~1000 steps)."
        )
    return float(beta)


def metric_states(metric: GradientNoiseScaleMetric) -> dict[str, Tensor]:
    """The metric's states as host copies, by name (what a checkpoint keeps)."""
    return {name: getattr(metric, name).detach().cpu().clone() for name in metric._defaults}


def load_metric_states(metric: GradientNoiseScaleMetric, states: dict[str, Tensor]) -> None:
    """Copy ``states`` (from :func:`metric_states`) into the metric, keeping each on the metric's device."""
    for name, value in states.items():
        getattr(metric, name).copy_(value)


class GradientNoiseScaleMetric(Metric):
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018).

    Each :meth:`update` folds one optimizer step into bias-corrected EMAs of unbiased ``|G|^2`` and
    ``tr(Sigma)`` estimates (docs/estimator.md); ``B_simple`` is their ratio, and :meth:`confidence_interval`
    bounds it (docs/adaptive.md). A step that is not finite, holds fewer than two small batches, or is nearly
    singular (equal weights on sizes far apart: :meth:`update`) is skipped and counted. :meth:`update` never
    synchronises with the host; under ``torch.distributed`` every process passes its own small batches, and all
    of them call it together.

    Args:
        beta: EMA decay per update, in (0, 1).
        all_reduce: sum small-batch statistics over ``torch.distributed`` processes when a process group
            with more than one process is initialized.
        kwargs: passed to :class:`torchmetrics.Metric` (``process_group`` selects the group).

    Example (one device, two micro-batches accumulated into one step):
        >>> import torch
        >>> metric = GradientNoiseScaleMetric(beta=0.9)
        >>> metric.update(
        ...     small_sq_norms=torch.tensor([5.0, 3.0]),  # |g_1|^2, |g_2|^2 (mean-loss gradients)
        ...     small_sizes=torch.tensor([4, 4]),  # examples in each micro-batch
        ...     big_sq_norm=torch.tensor(3.5),  # |(g_1 + g_2) / 2|^2
        ... )
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'b_simple': 1.3333, 'grad_sq_norm': 3.0, 'trace_cov': 4.0}
        >>> [float(b) for b in metric.confidence_interval(1.0)]  # one step: no spread measured yet
        [0.0, inf]
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = True

    grad_sq_norm_ema: Tensor
    trace_cov_ema: Tensor
    ema_weight: Tensor
    measured_steps: Tensor
    skipped_steps: Tensor
    last_b_small: Tensor
    last_b_big: Tensor
    estimate_moments: Tensor

    def __init__(self, beta: float = 0.99, all_reduce: bool = True, **kwargs: Any) -> None:
        # States already agree across processes after update's all-reduce: nothing to sync at compute, and
        # torchmetrics' own sync would stack every rank's copy of them (compute() gave one value per rank).
        for option in ("sync_on_compute", "dist_sync_on_step"):
            if kwargs.get(option):
                raise ValueError(
                    f"GradientNoiseScaleMetric({option}=True): update() already all-reduces each step's sums, so"
                    " every process holds the same states; leave it False (all_reduce=False for per-process values)."
                )
        kwargs["sync_on_compute"] = False
        super().__init__(**kwargs)
        self.beta = validate_beta(beta)
        self.all_reduce = all_reduce
        f64 = torch.float64
        # EMAs of the raw estimates; divided by ema_weight = 1 - beta^n at read-out.
        self.add_state("grad_sq_norm_ema", torch.tensor(0.0, dtype=f64), dist_reduce_fx=None, persistent=True)
        self.add_state("trace_cov_ema", torch.tensor(0.0, dtype=f64), dist_reduce_fx=None, persistent=True)
        self.add_state("ema_weight", torch.tensor(0.0, dtype=f64), dist_reduce_fx=None, persistent=True)
        self.add_state("measured_steps", torch.tensor(0, dtype=torch.int64), dist_reduce_fx=None, persistent=True)
        self.add_state("skipped_steps", torch.tensor(0, dtype=torch.int64), dist_reduce_fx=None, persistent=True)
        # Batch sizes of the last measured step (one that entered the averages), in the caller's units.
        self.add_state("last_b_small", torch.tensor(float("nan"), dtype=f64), dist_reduce_fx=None, persistent=True)
        self.add_state("last_b_big", torch.tensor(float("nan"), dtype=f64), dist_reduce_fx=None, persistent=True)
        # EMAs of the per-step values in estimators.MOMENT_FIELDS order (not bias-corrected: the first one is
        # the weight). A checkpoint saved before they existed leaves them at zero: the spread is then
        # measured from the resume on.
        moments = torch.zeros(len(MOMENT_FIELDS), dtype=f64)
        self.add_state("estimate_moments", moments, dist_reduce_fx=None, persistent=True)

    def update(
        self,
        small_sq_norms: Tensor,
        small_sizes: Tensor,
        big_sq_norm: Tensor,
        small_weights: Tensor | None = None,
    ) -> None:
        """Fold in one optimizer step.

        Args:
            small_sq_norms: ``|g_i|^2`` of this process's small batches, each ``g_i`` the gradient of the
                mean loss over its batch, with any loss scaling removed.
            small_sizes: examples (or tokens) in each small batch.
            big_sq_norm: ``|G_big|^2`` of the step's big-batch gradient ``sum_i w_i g_i / sum_i w_i`` over
                all small batches of all processes.
            small_weights: ``w_i``; default ``small_sizes`` (the big batch is the mean over all examples).
                Lightning's gradient accumulation weights micro-batches equally: pass ones. Equal weights on
                sizes far apart can make a step nearly singular (two micro-batches about 6x apart in size):
                a step whose estimates would be more than 4x as noisy as with equal sizes
                (:func:`~lightning_gns.estimators.step_information` below 0.25) is skipped and counted.
        """
        sums = StepSums()
        sums.add(small_sq_norms, small_sizes, small_weights)
        summary = sums.summary()
        big = big_sq_norm.reshape(()).to(device=summary.size_sum.device, dtype=torch.float64)
        if self._should_all_reduce():
            packed = pack_step(summary, big)
            dist.all_reduce(packed, group=self.process_group)
            summary, _ = unpack_step(packed)
        self.fold(summary, big)

    def _should_all_reduce(self) -> bool:
        return (
            self.all_reduce
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def fold(self, summary: SmallBatchSummary, big_sq_norm: Tensor) -> Tensor:
        """Fold in one step from statistics already summed over processes (no communication).

        For callers that all-reduce several metrics' statistics together, as the Lightning callback does
        for per-layer noise scales. Returns whether the step was skipped as nearly singular (a 0-d bool tensor,
        not read here).
        """
        grad_sq_norm, trace_cov, nearly_singular = estimates_of_step(summary, big_sq_norm)
        valid = torch.isfinite(grad_sq_norm) & torch.isfinite(trace_cov)
        beta = self.beta
        dtype = self.grad_sq_norm_ema.dtype
        # torch.where keeps a skipped step out of the averages without a host sync. The states are updated in
        # place: reassigning them goes through torchmetrics' and nn.Module's __setattr__, which cost more
        # than the arithmetic on this per-step path.
        self.grad_sq_norm_ema.copy_(
            torch.where(
                valid, beta * self.grad_sq_norm_ema + (1 - beta) * grad_sq_norm.to(dtype), self.grad_sq_norm_ema
            )
        )
        self.trace_cov_ema.copy_(
            torch.where(valid, beta * self.trace_cov_ema + (1 - beta) * trace_cov.to(dtype), self.trace_cov_ema)
        )
        self.ema_weight.copy_(torch.where(valid, beta * self.ema_weight + (1 - beta), self.ema_weight))
        moments = self.estimate_moments
        # One in-place lerp m + w (x - m) with w = (1 - beta) on a measured step and 0 on a skipped one; the
        # zeros keep a skipped step's NaN out of x (0 * NaN would still be NaN).
        pair = torch.where(valid, torch.stack([trace_cov, grad_sq_norm]), 0.0).to(dtype)
        values = torch.cat([torch.ones_like(pair[:1]), pair, pair * pair, pair[:1] * pair[1:]])
        moments.lerp_(values, valid.to(dtype) * (1 - beta))
        self.measured_steps.add_(valid.long())
        # A step without any backward pass on any process (StochasticWeightAveraging's BatchNorm epoch, a
        # training_step that returned None) is no step to measure: it is neither skipped nor a batch size.
        ran = summary.weight_sum > 0
        self.skipped_steps.add_((ran & ~valid).long())
        # The batch sizes are those of the last step that entered the averages, the step the readouts describe.
        self.last_b_big.copy_(torch.where(valid, summary.size_sum, self.last_b_big))
        self.last_b_small.copy_(torch.where(valid, summary.size_sum / summary.num_small_batches, self.last_b_small))
        self._computed = None  # torchmetrics caches compute(); a fold outside update() must clear it too
        return nearly_singular

    def restart(self, where: Tensor | bool = True) -> None:
        """Forget the averages (not the step counts) if ``where`` (a 0-d bool tensor: no host sync) is true.

        For when what the estimates describe changes, as when parameters measured so far are left out: the
        averages start again from the next folded step instead of mixing the two.

        Example:
            >>> metric = GradientNoiseScaleMetric(beta=0.5)
            >>> metric.update(torch.tensor([4.0, 6.0]), torch.tensor([1.0, 1.0]), torch.tensor(3.0))
            >>> metric.restart(torch.tensor(True))
            >>> bool(torch.isnan(metric.b_simple)), int(metric.measured_steps)
            (True, 1)
        """
        where = torch.as_tensor(where, device=self.ema_weight.device)
        for state in (self.grad_sq_norm_ema, self.trace_cov_ema, self.ema_weight, self.estimate_moments):
            state.masked_fill_(where, 0.0)
        self._computed = None

    @property
    def grad_sq_norm(self) -> Tensor:
        """Bias-corrected average of the ``|G|^2`` estimates (NaN before the first measured step)."""
        return self.grad_sq_norm_ema / self.ema_weight

    @property
    def trace_cov(self) -> Tensor:
        """Bias-corrected average of the ``tr(Sigma)`` estimates (NaN before the first measured step)."""
        return self.trace_cov_ema / self.ema_weight

    @property
    def b_simple(self) -> Tensor:
        """``B_simple``: ratio of the averaged ``tr(Sigma)`` and ``|G|^2`` estimates, in the units of the sizes."""
        return simple_noise_scale(self.trace_cov, self.grad_sq_norm)

    def spread(self) -> EstimateSpread:
        """The averaged estimates with the variances of the averages and the effective sample count."""
        return spread_from_moments(self.estimate_moments, self.beta)

    def relative_error(self) -> Tensor:
        """Relative standard error of :attr:`b_simple` (delta method; ``inf`` while it has no finite spread)."""
        return relative_error(self.spread())

    def confidence_interval(self, z: float = LOGGED_Z) -> tuple[Tensor, Tensor]:
        """``(low, high)`` bounds of :attr:`b_simple` at ``z`` standard errors (``high = inf`` while the
        ``|G|^2`` average is within ``z`` standard errors of zero). Device tensors, no host sync.
        """
        return noise_scale_interval(self.spread(), z)

    def compute(self) -> dict[str, Tensor]:
        """``{"b_simple", "grad_sq_norm", "trace_cov"}`` as tensors."""
        return {"b_simple": self.b_simple, "grad_sq_norm": self.grad_sq_norm, "trace_cov": self.trace_cov}
