"""GradientNoiseScaleMetric on its own: bias-corrected EMAs, skipped steps, state handling."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor

from lightning_gns import GradientNoiseScaleMetric
from lightning_gns.metric import STATE_NAMES

F64 = torch.float64
EMA_STATES = ("grad_sq_norm_ema", "trace_cov_ema", "ema_weight", "measured_steps")


@dataclass
class Step:
    small: list[float]
    sizes: list[int]
    big: float
    weights: list[float] | None = None

    def update(self, metric: GradientNoiseScaleMetric) -> None:
        weights = None if self.weights is None else torch.tensor(self.weights, dtype=F64)
        metric.update(
            small_sq_norms=torch.tensor(self.small, dtype=F64),
            small_sizes=torch.tensor(self.sizes),
            big_sq_norm=torch.tensor(self.big, dtype=F64),
            small_weights=weights,
        )

    def estimates(self) -> tuple[float, float] | None:
        """The weighted estimator in plain Python floats; None for a step the metric must skip."""
        n, weights = len(self.sizes), self.weights or [float(b) for b in self.sizes]
        a = math.fsum(b * s for b, s in zip(self.sizes, self.small, strict=True))
        q = math.fsum(w * w / b for w, b in zip(weights, self.sizes, strict=True)) / math.fsum(weights) ** 2
        bq = q * sum(self.sizes)
        det = n - bq
        if n < 2 or abs(det) <= 1e-9 * n or not all(map(math.isfinite, [*self.small, self.big])):
            return None
        if det * det / (n - 2 * bq + bq * bq) / (n - 1) < 0.25:  # nearly singular: 4x an equal step's variance
            return None
        return (n * self.big - q * a) / det, (a - sum(self.sizes) * self.big) / det


def random_step(rng: random.Random) -> Step:
    n = rng.choice([1, 2, 2, 3, 4, 6])
    sizes = [rng.randint(1, 64) for _ in range(n)]
    g2, tr = rng.uniform(0.0, 2.0), rng.uniform(0.0, 50.0)
    small = [max(0.0, g2 + tr / b + rng.gauss(0.0, 1.0)) for b in sizes]
    weights = [1.0] * n if rng.random() < 0.5 else None
    big = max(0.0, g2 + tr / sum(sizes) + rng.gauss(0.0, 0.3))
    if rng.random() < 0.1:
        small[0] = math.inf
    return Step(small, sizes, big, weights)


def state(metric: GradientNoiseScaleMetric) -> dict[str, Tensor]:
    return {name: getattr(metric, name).clone() for name in metric._defaults}


def assert_states_equal(a: dict[str, Tensor], b: dict[str, Tensor], names: tuple[str, ...] | None = None) -> None:
    for name in names or tuple(a):
        assert torch.equal(a[name], b[name]) or (a[name].isnan().all() and b[name].isnan().all()), name


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
def test_bias_corrected_ema_matches_recursion(beta: float) -> None:
    rng = random.Random(7)
    metric = GradientNoiseScaleMetric(beta=beta)
    ema_g2 = ema_tr = weight = 0.0
    measured = skipped = 0
    saw_negative = saw_skip = False
    for _ in range(60):
        step = random_step(rng)
        step.update(metric)
        estimates = step.estimates()
        if estimates is None:
            skipped += 1
            saw_skip = True
        else:
            g2, tr = estimates
            saw_negative |= g2 < 0
            ema_g2 = beta * ema_g2 + (1 - beta) * g2
            ema_tr = beta * ema_tr + (1 - beta) * tr
            weight = beta * weight + (1 - beta)
            measured += 1
        assert int(metric.measured_steps) == measured
        assert int(metric.skipped_steps) == skipped
        if measured:
            assert float(metric.grad_sq_norm) == pytest.approx(ema_g2 / weight, rel=1e-9, abs=1e-12)
            assert float(metric.trace_cov) == pytest.approx(ema_tr / weight, rel=1e-9, abs=1e-12)
            expected_b = max(ema_tr, 0.0) / ema_g2 if ema_g2 > 0 else math.inf
            assert float(metric.b_simple) == pytest.approx(expected_b, rel=1e-9)
    assert saw_negative and saw_skip  # the sequence exercised both paths


def test_single_update_is_bias_corrected() -> None:
    metric = GradientNoiseScaleMetric(beta=0.9)
    Step([5.0, 3.0], [4, 4], 3.5).update(metric)  # estimates by hand: |G|^2 = 3, tr(Sigma) = 4
    assert float(metric.grad_sq_norm) == pytest.approx(3.0, rel=1e-12)
    assert float(metric.trace_cov) == pytest.approx(4.0, rel=1e-12)
    assert float(metric.b_simple) == pytest.approx(4.0 / 3.0, rel=1e-12)
    out = metric.compute()
    assert set(out) == {"b_simple", "grad_sq_norm", "trace_cov"}
    assert float(out["grad_sq_norm"]) == pytest.approx(3.0, rel=1e-12)


def test_negative_estimates_are_averaged_unclamped() -> None:
    metric = GradientNoiseScaleMetric(beta=0.5)
    # S_small = 4, S_big = 0.5, b = 4, B = 8: |G|^2 = (8 * 0.5 - 4 * 4) / 4 = -3, tr = 3.5 / (1/8) = 28.
    Step([5.0, 3.0], [4, 4], 0.5).update(metric)
    assert float(metric.grad_sq_norm) == pytest.approx(-3.0, rel=1e-12)
    assert float(metric.b_simple) == math.inf
    # Second step: |G|^2 = 3, tr = 4 (as above). Bias-corrected EMA with beta 0.5: (0.25 * -3 + 0.5 * 3) / 0.75.
    Step([5.0, 3.0], [4, 4], 3.5).update(metric)
    assert float(metric.grad_sq_norm) == pytest.approx(1.0, rel=1e-12)
    assert float(metric.trace_cov) == pytest.approx((0.25 * 28 + 0.5 * 4) / 0.75, rel=1e-12)
    assert float(metric.b_simple) == pytest.approx(12.0, rel=1e-12)


def test_negative_trace_average_reads_as_zero_noise_scale() -> None:
    metric = GradientNoiseScaleMetric(beta=0.9)
    # S_small = 1, S_big = 2: tr = -1 / (1/4 - 1/8) = -8, |G|^2 = (16 - 4) / 4 = 3.
    Step([1.0, 1.0], [4, 4], 2.0).update(metric)
    assert float(metric.trace_cov) == pytest.approx(-8.0, rel=1e-12)
    assert float(metric.b_simple) == 0.0


@pytest.mark.parametrize(
    ("small", "big"),
    [
        ([math.inf, 3.0], 3.5),
        ([5.0, math.nan], 3.5),
        ([-math.inf, 3.0], 3.5),
        ([5.0, 3.0], math.inf),
        ([5.0, 3.0], math.nan),
        ([math.inf, 3.0], math.inf),
        ([7.0], 7.0),  # one small batch: no information about the noise
    ],
)
def test_unusable_step_is_skipped_bit_identically(small: list[float], big: float) -> None:
    metric = GradientNoiseScaleMetric(beta=0.9)
    Step([5.0, 3.0], [4, 4], 3.5).update(metric)
    Step([6.0, 2.0, 4.0], [2, 3, 5], 3.0).update(metric)
    before = state(metric)
    Step(small, [4] * len(small), big).update(metric)
    after = state(metric)
    assert_states_equal(before, after, EMA_STATES)
    assert int(after["skipped_steps"]) == int(before["skipped_steps"]) + 1
    # A later good step continues from the untouched averages.
    reference = GradientNoiseScaleMetric(beta=0.9)
    for step in (Step([5.0, 3.0], [4, 4], 3.5), Step([6.0, 2.0, 4.0], [2, 3, 5], 3.0), Step([2.0, 9.0], [1, 3], 1.0)):
        step.update(reference)
    Step([2.0, 9.0], [1, 3], 1.0).update(metric)
    assert_states_equal(state(reference), state(metric), EMA_STATES)


def test_nan_before_any_update() -> None:
    metric = GradientNoiseScaleMetric()
    assert math.isnan(float(metric.b_simple))
    assert math.isnan(float(metric.grad_sq_norm))
    assert math.isnan(float(metric.trace_cov))
    assert math.isnan(float(metric.last_b_small)) and math.isnan(float(metric.last_b_big))
    assert int(metric.measured_steps) == 0 and int(metric.skipped_steps) == 0


def test_nan_after_only_skipped_steps() -> None:
    metric = GradientNoiseScaleMetric()
    Step([1.0], [8], 1.0).update(metric)
    Step([math.nan, 1.0], [8, 8], 1.0).update(metric)
    assert math.isnan(float(metric.b_simple))
    assert int(metric.skipped_steps) == 2


def test_state_dict_round_trip_continues_identically() -> None:
    rng = random.Random(3)
    steps = [random_step(rng) for _ in range(20)]
    original = GradientNoiseScaleMetric(beta=0.8)
    for step in steps[:10]:
        step.update(original)
    saved = original.state_dict()
    assert set(saved) >= {"grad_sq_norm_ema", "trace_cov_ema", "ema_weight", "measured_steps", "skipped_steps"}

    restored = GradientNoiseScaleMetric(beta=0.8)
    assert not torch.equal(restored.ema_weight, original.ema_weight)
    restored.load_state_dict(saved)
    assert_states_equal(state(original), state(restored))
    for step in steps[10:]:
        step.update(original)
        step.update(restored)
        assert_states_equal(state(original), state(restored))
    assert float(restored.b_simple) == float(original.b_simple)


def test_reset_clears_everything() -> None:
    metric = GradientNoiseScaleMetric(beta=0.9)
    Step([5.0, 3.0], [4, 4], 3.5).update(metric)
    Step([1.0], [4], 3.5).update(metric)
    metric.reset()
    fresh = GradientNoiseScaleMetric(beta=0.9)
    assert_states_equal(state(fresh), state(metric))
    assert math.isnan(float(metric.b_simple))
    Step([6.0, 2.0, 4.0], [2, 3, 5], 3.0).update(metric)
    Step([6.0, 2.0, 4.0], [2, 3, 5], 3.0).update(fresh)
    assert_states_equal(state(fresh), state(metric))


def test_last_batch_sizes() -> None:
    metric = GradientNoiseScaleMetric()
    Step([5.0, 3.0, 1.0], [3, 5, 8], 1.0).update(metric)
    assert float(metric.last_b_big) == 16.0
    assert float(metric.last_b_small) == pytest.approx(16.0 / 3.0, rel=1e-15)
    Step([5.0, 3.0], [10, 30], 1.0, weights=[1.0, 1.0]).update(metric)
    assert (float(metric.last_b_small), float(metric.last_b_big)) == (20.0, 40.0)


@pytest.mark.parametrize("beta", [0, 1, 1.5, -0.1, True, "0.9", math.nan])
def test_invalid_beta(beta: object) -> None:
    with pytest.raises(ValueError, match="beta must be a number strictly between 0 and 1"):
        GradientNoiseScaleMetric(beta=beta)  # type: ignore[arg-type]


def test_compute_after_fold_sees_the_new_step() -> None:
    """fold() outside update() (as the tracker calls it) must not leave torchmetrics' compute() cache stale."""
    from lightning_gns.estimators import summarize_small_batches

    metric = GradientNoiseScaleMetric(beta=0.5)
    metric.update(torch.tensor([5.0, 3.0]), torch.tensor([4, 4]), torch.tensor(3.5))
    first = metric.compute()["grad_sq_norm"].clone()
    metric.fold(summarize_small_batches(torch.tensor([9.0, 1.0]), torch.tensor([4, 4])), torch.tensor(2.0))
    assert not torch.equal(metric.compute()["grad_sq_norm"], first)
    assert torch.equal(metric.compute()["grad_sq_norm"], metric.grad_sq_norm)


def test_state_names_are_the_registered_states() -> None:
    metric = GradientNoiseScaleMetric()
    assert tuple(metric._defaults) == STATE_NAMES
    assert tuple(metric.state_dict()) == STATE_NAMES  # all persistent


# ---------------------------------------------------------------- the interval of B_simple


def test_moments_and_interval_match_a_float64_recursion_with_skipped_steps() -> None:
    """estimate_moments follows the same steps as the averages (skipped steps leave it bit-identical), and the
    interval equals the reference recomputation from the per-step estimates."""
    from support.adaptive_support import reference_interval

    rng = random.Random(5)
    metric = GradientNoiseScaleMetric(beta=0.9)
    kept: list[tuple[float, float]] = []
    for _ in range(60):
        step = random_step(rng)
        before = metric.estimate_moments.clone()
        step.update(metric)
        estimates = step.estimates()
        if estimates is None:
            assert torch.equal(metric.estimate_moments, before)
            continue
        kept.append(estimates)
        g, t = zip(*kept, strict=True)
        low, high, error, samples = reference_interval(list(g), list(t), beta=0.9, z=1.0)
        assert float(metric.spread().samples) == pytest.approx(samples, rel=1e-12)
        assert [float(v) for v in metric.confidence_interval(1.0)] == pytest.approx([low, high], rel=1e-9)
        assert float(metric.relative_error()) == pytest.approx(error, rel=1e-9)
        assert float(metric.spread().trace_cov) == pytest.approx(float(metric.trace_cov), rel=1e-12)
    assert len(kept) > 30


def spread(t: float, g: float, var_t: float, var_g: float, cov: float = 0.0, samples: float = 100.0) -> Any:
    from lightning_gns.estimators import EstimateSpread

    return EstimateSpread(*torch.tensor([t, g, var_t, var_g, cov, samples], dtype=F64).unbind())


def test_interval_closed_forms() -> None:
    from lightning_gns.estimators import noise_scale_interval, relative_error

    # z = 0: the estimate itself, with B_simple's read-out rules.
    assert [float(b) for b in noise_scale_interval(spread(10.0, 2.0, 1.0, 1.0), 0.0)] == [5.0, 5.0]
    assert [float(b) for b in noise_scale_interval(spread(10.0, -2.0, 1.0, 1.0), 0.0)] == [math.inf, math.inf]
    assert [float(b) for b in noise_scale_interval(spread(-1.0, 2.0, 1.0, 1.0), 0.0)] == [0.0, 0.0]
    # A precise estimate: B (1 -+ z r) to first order in r.
    precise = spread(10.0, 2.0, 1e-6, 4e-8, 1e-8)
    r = float(relative_error(precise))
    low, high = (float(b) for b in noise_scale_interval(precise, 2.0))
    assert low == pytest.approx(5.0 * (1 - 2 * r), rel=1e-6) and high == pytest.approx(5.0 * (1 + 2 * r), rel=1e-6)
    # Only |G|^2 uncertain: the bounds are T / (G +- z sd(G)) exactly.
    low, high = (float(b) for b in noise_scale_interval(spread(10.0, 2.0, 0.0, 0.25), 1.0))
    assert (low, high) == pytest.approx((10.0 / 2.5, 10.0 / 1.5), rel=1e-12)
    # The noise floor: G = 0 within its noise, T resolved: high = inf, low = T / (z sd(G)).
    low, high = (float(b) for b in noise_scale_interval(spread(10.0, 0.0, 0.0, 0.25), 2.0))
    assert high == math.inf and low == pytest.approx(10.0 / (2.0 * 0.5), rel=1e-12)
    # |G|^2's lower bound exactly at 0 already opens the interval above; T not resolved: low = 0.
    assert float(noise_scale_interval(spread(10.0, 1.0, 0.0, 1.0), 1.0)[1]) == math.inf
    assert float(noise_scale_interval(spread(1.0, 2.0, 4.0, 0.01), 1.0)[0]) == 0.0
    # No estimate: NaN; one step (no spread yet): (0, inf).
    assert all(math.isnan(float(b)) for b in GradientNoiseScaleMetric().confidence_interval())
    metric = GradientNoiseScaleMetric()
    Step([5.0, 3.0], [4, 4], 3.5).update(metric)
    assert [float(b) for b in metric.confidence_interval()] == [0.0, math.inf]
    assert float(relative_error(spread(10.0, 0.0, 1.0, 1.0))) == math.inf


def test_a_checkpoint_without_the_moments_loads_and_measures_the_spread_afresh() -> None:
    from lightning_gns.callbacks._checkpoint import validate_gns_state
    from lightning_gns.tracker import GradientNoiseScaleTracker

    rng = random.Random(2)
    saved = GradientNoiseScaleTracker(beta=0.9)
    for _ in range(20):
        random_step(rng).update(saved.metric)
    old = saved.state_dict()
    del old["metric"]["estimate_moments"]
    validate_gns_state({**old, "beta": 0.9}, saved.metric._defaults, 0.9)
    restored = GradientNoiseScaleTracker(beta=0.9)
    restored.load_state_dict(old)
    assert float(restored.metric.b_simple) == float(saved.metric.b_simple)
    assert torch.equal(restored.metric.estimate_moments, torch.zeros(6, dtype=F64))
    bad = saved.state_dict()
    bad["metric"]["estimate_moments"] = torch.zeros(5, dtype=F64)
    with pytest.raises(ValueError, match="estimate_moments' must have shape"):
        validate_gns_state({**bad, "beta": 0.9}, saved.metric._defaults, 0.9)
