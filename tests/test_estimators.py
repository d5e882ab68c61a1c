"""Algebra of the unbiased |G|^2 and tr(Sigma) estimators (lightning_gns.estimators)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_gns import GradientNoiseScaleMetric
from lightning_gns.estimators import (
    MIN_STEP_INFORMATION,
    SmallBatchSummary,
    StepSums,
    paper_estimates,
    simple_noise_scale,
    step_information,
    summarize_small_batches,
    unbiased_estimates,
    weighted_estimates,
)

F64 = torch.float64

sizes_st = st.lists(st.integers(1, 1000), min_size=2, max_size=16)
positive_st = st.floats(1e-2, 1e2)
weight_st = st.floats(1e-2, 1e2)
norm_st = st.floats(0.0, 1e3)


def t(values: list[float] | float) -> Tensor:
    return torch.tensor(values, dtype=F64)


def expected_norms(g2: float, tr: float, sizes: list[int], weights: list[float]) -> tuple[list[float], float, float]:
    """E|g_i|^2, E|G_big|^2 and the determinant n - Q B, computed in Python floats."""
    w_sum = math.fsum(weights)
    q = math.fsum(w * w / b for w, b in zip(weights, sizes, strict=True)) / w_sum**2
    determinant = len(sizes) - q * sum(sizes)
    return [g2 + tr / b for b in sizes], g2 + tr * q, determinant


def information(sizes: list[int], weights: list[float]) -> float:
    """D^2 / tr(K^2) / (n - 1) in Python floats: the step's share of an equal-sized step's information."""
    n, w_sum = len(sizes), math.fsum(weights)
    bq = sum(sizes) * math.fsum(w * w / b for w, b in zip(weights, sizes, strict=True)) / w_sum**2
    return (n - bq) ** 2 / (n - 2 * bq + bq * bq) / (n - 1)


@pytest.mark.parametrize(
    ("sizes", "kept"),
    [([32, 32], True), ([21, 324], True), ([32, 16], True), ([35, 6], False), ([32, 32, 3], False), ([32, 8], False)],
)
def test_a_step_of_equal_weights_on_sizes_that_make_it_nearly_singular_is_skipped(sizes: list[int], kept: bool) -> None:
    """Lightning weights micro-batches equally: an epoch's short last window (35, 6) has D = -0.0012, estimates
    unbiased but ~1e6 times as noisy as a normal step's, and one of them per epoch kept B_simple within 20% of
    the truth on 4% of the steps (a helper's Monte Carlo). Such steps are skipped and counted; sizes far apart
    (21, 324: D = -2.37) hold half an equal step's information and are kept."""
    weights = [1.0] * len(sizes)
    summary = summarize_small_batches(t([5.0] * len(sizes)), t(sizes), t(weights))
    assert float(step_information(summary)) == pytest.approx(information(sizes, weights), rel=1e-12)
    assert (information(sizes, weights) >= MIN_STEP_INFORMATION) == kept
    g2_hat, tr_hat = unbiased_estimates(summary, t(4.0))
    assert math.isfinite(float(g2_hat)) == kept and math.isfinite(float(tr_hat)) == kept
    metric = GradientNoiseScaleMetric(beta=0.9)
    metric.update(t([5.0] * len(sizes)), t(sizes), t(4.0), t(weights))
    assert int(metric.skipped_steps) == (0 if kept else 1) and int(metric.measured_steps) == (1 if kept else 0)


@settings(deadline=None, max_examples=200)
@given(g2=positive_st, tr=positive_st, data=st.data())
def test_exactly_unbiased_for_any_sizes_and_weights(g2: float, tr: float, data: st.DataObject) -> None:
    sizes = data.draw(sizes_st)
    weights = data.draw(st.lists(weight_st, min_size=len(sizes), max_size=len(sizes)))
    small, big, determinant = expected_norms(g2, tr, sizes, weights)
    # Negative too: equal weights with sizes far apart (21 and 324 tokens); such steps were skipped without a word.
    assume(abs(determinant) > 1e-3 * len(sizes))
    assume(information(sizes, weights) >= MIN_STEP_INFORMATION)  # the others are skipped (test below)
    g2_hat, tr_hat = unbiased_estimates(summarize_small_batches(t(small), t(sizes), t(weights)), t(big))
    # Relative to the larger unknown: the estimators subtract terms of that size (float cancellation).
    assert float(g2_hat) == pytest.approx(g2, rel=1e-9, abs=1e-9 * max(g2, tr))
    assert float(tr_hat) == pytest.approx(tr, rel=1e-9, abs=1e-9 * max(g2, tr))


@settings(deadline=None, max_examples=200)
@given(g2=positive_st, tr=positive_st, sizes=sizes_st)
def test_exactly_unbiased_with_default_weights(g2: float, tr: float, sizes: list[int]) -> None:
    small, big, determinant = expected_norms(g2, tr, sizes, [float(b) for b in sizes])
    assert determinant == pytest.approx(len(sizes) - 1)  # Q = 1/B when w = b
    g2_hat, tr_hat = unbiased_estimates(summarize_small_batches(t(small), t(sizes)), t(big))
    # Relative to the larger unknown: the estimators subtract terms of that size (float cancellation).
    assert float(g2_hat) == pytest.approx(g2, rel=1e-9, abs=1e-9 * max(g2, tr))
    assert float(tr_hat) == pytest.approx(tr, rel=1e-9, abs=1e-9 * max(g2, tr))


def test_equal_weights_on_sizes_far_apart_are_estimated() -> None:
    """Two micro-batches of 21 and 324 tokens, weighted alike (Lightning's accumulation): the determinant is
    negative (-2.37), not zero, and the estimates are exact on expected norms (the step was skipped as degenerate)."""
    small, big, determinant = expected_norms(2.0, 30.0, [21, 324], [1.0, 1.0])
    assert determinant == pytest.approx(-2.37, abs=0.01)
    g2_hat, tr_hat = unbiased_estimates(summarize_small_batches(t(small), t([21, 324]), t([1.0, 1.0])), t(big))
    assert float(g2_hat) == pytest.approx(2.0, rel=1e-12) and float(tr_hat) == pytest.approx(30.0, rel=1e-12)


@pytest.mark.parametrize("equal_weights", [True, False], ids=["w=1", "w=b"])
def test_monte_carlo_gaussian_gradients(equal_weights: bool) -> None:
    """Average estimates over many simulated steps of Gaussian per-example gradients with known G, Sigma."""
    gen = torch.Generator().manual_seed(1234)
    dim, trials = 12, 20_000
    sizes = [1, 3, 4, 7, 2]
    true_g = torch.randn(dim, generator=gen, dtype=F64) * 0.3
    root = torch.randn(dim, dim, generator=gen, dtype=F64) / math.sqrt(dim)
    true_g2, true_tr = float(true_g.square().sum()), float(root.square().sum())  # tr(L L^T) = |L|_F^2
    examples = true_g + torch.randn(trials, sum(sizes), dim, generator=gen, dtype=F64) @ root.T
    small_grads = torch.stack([chunk.mean(1) for chunk in examples.split(sizes, dim=1)], dim=1)  # (trials, n, dim)
    weights = torch.ones(len(sizes), dtype=F64) if equal_weights else t(sizes)
    big_grad = (small_grads * weights[:, None]).sum(1) / weights.sum()
    small_sq, big_sq = small_grads.square().sum(-1), big_grad.square().sum(-1)

    # The summary's per-step field A = sum_i b_i |g_i|^2 varies per trial; the others are constant.
    # Spot-check summarize_small_batches on a few trials, then evaluate all trials at once (broadcasting).
    base = summarize_small_batches(small_sq[0], t(sizes), weights)
    per_trial_a = (small_sq * t(sizes)).sum(-1)
    for i in range(3):
        summary_i = summarize_small_batches(small_sq[i], t(sizes), weights)
        assert float(summary_i.size_weighted_sq_norm_sum) == pytest.approx(float(per_trial_a[i]), rel=1e-12)
    g2_hat, tr_hat = unbiased_estimates(base._replace(size_weighted_sq_norm_sum=per_trial_a), big_sq)
    for i in range(3):
        single = weighted_estimates(small_sq[i], big_sq[i], t(sizes), weights)
        assert float(single[0]) == pytest.approx(float(g2_hat[i]), rel=1e-9, abs=1e-12)

    for estimate, truth in ((g2_hat, true_g2), (tr_hat, true_tr)):
        standard_error = float(estimate.std()) / math.sqrt(trials)
        assert abs(float(estimate.mean()) - truth) < 4 * standard_error, (float(estimate.mean()), truth)

    # Negative control: the paper's equal-size formula with the mean small size is biased here, and the
    # trial count resolves it (so the checks above can fail).
    mean_small = float(small_sq.mean(1).mean())
    naive_tr = (mean_small - float(big_sq.mean())) / (1 / (sum(sizes) / len(sizes)) - 1 / sum(sizes))
    assert abs(naive_tr - true_tr) > 10 * float(tr_hat.std()) / math.sqrt(trials)


@settings(deadline=None, max_examples=100)
@given(
    n=st.integers(2, 16),
    b=st.integers(1, 1000),
    data=st.data(),
)
def test_equal_sizes_reduce_to_paper_form(n: int, b: int, data: st.DataObject) -> None:
    small = data.draw(st.lists(norm_st, min_size=n, max_size=n))
    big = data.draw(norm_st)
    g2_w, tr_w = weighted_estimates(t(small), t(big), t([b] * n))
    g2_p, tr_p = paper_estimates(math.fsum(small) / n, big, b, n * b)
    scale = max([*small, big, 1e-300]) * n * b
    assert float(g2_w) == pytest.approx(float(g2_p), rel=1e-9, abs=1e-12 * scale)
    assert float(tr_w) == pytest.approx(float(tr_p), rel=1e-9, abs=1e-12 * scale)


def test_paper_form_by_hand() -> None:
    # S_small = 4, S_big = 3.5, b = 4, B = 8: |G|^2 = (28 - 16) / 4 = 3, tr = 0.5 / (1/4 - 1/8) = 4.
    g2, tr = weighted_estimates(t([5.0, 3.0]), t(3.5), t([4, 4]))
    assert (float(g2), float(tr)) == pytest.approx((3.0, 4.0), rel=1e-12)


@settings(deadline=None, max_examples=100)
@given(data=st.data(), with_weights=st.booleans())
def test_summaries_add_over_disjoint_sets(data: st.DataObject, with_weights: bool) -> None:
    def draw_set() -> tuple[list[float], list[int], list[float] | None]:
        k = data.draw(st.integers(1, 8))
        norms = data.draw(st.lists(norm_st, min_size=k, max_size=k))
        sizes = data.draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k))
        weights = data.draw(st.lists(weight_st, min_size=k, max_size=k)) if with_weights else None
        return norms, sizes, weights

    (n1, s1, w1), (n2, s2, w2) = draw_set(), draw_set()
    part1 = summarize_small_batches(t(n1), t(s1), None if w1 is None else t(w1))
    part2 = summarize_small_batches(t(n2), t(s2), None if w2 is None else t(w2))
    union = summarize_small_batches(t(n1 + n2), t(s1 + s2), None if w1 is None or w2 is None else t(w1 + w2))
    summed = SmallBatchSummary.from_stacked(part1.stack() + part2.stack())
    for name, got, want in zip(SmallBatchSummary._fields, summed, union, strict=True):
        assert float(got) == pytest.approx(float(want), rel=1e-12), name
    # The estimates from the summed statistics are those of the union.
    big = t(data.draw(norm_st))
    for got, want in zip(unbiased_estimates(summed, big), unbiased_estimates(union, big), strict=True):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9, equal_nan=True)


def test_summary_fields_by_hand() -> None:
    s = summarize_small_batches(t([2.0, 1.0, 4.0]), t([1, 2, 4]), t([1.0, 1.0, 2.0]))
    expected = {
        "size_weighted_sq_norm_sum": 2 + 2 + 16,
        "num_small_batches": 3,
        "size_sum": 7,
        "weight_sum": 4,
        "weight_sq_over_size_sum": 1 + 0.5 + 1,
    }
    assert {k: float(v) for k, v in s._asdict().items()} == pytest.approx(expected)


@pytest.mark.parametrize(
    ("small", "sizes", "weights"),
    [
        ([3.0], [8], None),  # one small batch: D = 0
        ([3.0], [8], [2.5]),
        ([], [], None),  # nothing at all
        ([], [], []),
        # D = n - B sum(w^2/b) / W^2 = 2 - 4 (1 + w^2/3) / (1 + w)^2 = 0 at w = 2 sqrt(3) - 3: singular (D < 0 is not)
        ([2.0, 3.0], [1, 3], [1.0, 2 * math.sqrt(3) - 3]),
        ([2.0, 3.0], [4, 4], [1.0, 0.0]),  # big batch is the first small batch: D = 0
    ],
)
def test_degenerate_steps_give_nan(small: list[float], sizes: list[int], weights: list[float] | None) -> None:
    g2, tr = weighted_estimates(t(small), t(2.0), t(sizes), None if weights is None else t(weights))
    assert math.isnan(float(g2))
    assert math.isnan(float(tr))


@settings(deadline=None, max_examples=100)
@given(
    sizes=sizes_st,
    c=st.floats(1e-3, 1e3),
    data=st.data(),
)
def test_scaling_norms_scales_estimates(sizes: list[int], c: float, data: st.DataObject) -> None:
    small = data.draw(st.lists(norm_st, min_size=len(sizes), max_size=len(sizes)))
    big = data.draw(norm_st)
    g2, tr = weighted_estimates(t(small), t(big), t(sizes))
    g2_c, tr_c = weighted_estimates(t(small) * c, t(big) * c, t(sizes))
    scale = c * max([*small, big, 1e-300]) * sum(sizes)
    assert float(g2_c) == pytest.approx(c * float(g2), rel=1e-9, abs=1e-12 * scale)
    assert float(tr_c) == pytest.approx(c * float(tr), rel=1e-9, abs=1e-12 * scale)
    assume(abs(float(g2)) > 1e-6 * scale / c)
    assert float(tr_c / g2_c) == pytest.approx(float(tr / g2), rel=1e-6)


@settings(deadline=None, max_examples=100)
@given(sizes=sizes_st, c=st.floats(1e-3, 1e3), data=st.data())
def test_scaling_weights_changes_nothing(sizes: list[int], c: float, data: st.DataObject) -> None:
    small = data.draw(st.lists(norm_st, min_size=len(sizes), max_size=len(sizes)))
    weights = data.draw(st.lists(weight_st, min_size=len(sizes), max_size=len(sizes)))
    assume(expected_norms(1.0, 1.0, sizes, weights)[2] > 1e-3 * len(sizes))
    big = t(data.draw(norm_st))
    plain = weighted_estimates(t(small), big, t(sizes), t(weights))
    scaled = weighted_estimates(t(small), big, t(sizes), t(weights) * c)
    for got, want in zip(scaled, plain, strict=True):
        assert torch.allclose(got, want, rtol=1e-8, atol=1e-8 * max([*small, 1.0]), equal_nan=True)


@pytest.mark.parametrize(
    ("trace_cov", "grad_sq_norm", "expected"),
    [
        (40.0, 2.0, 20.0),
        (float("nan"), 2.0, float("nan")),
        (40.0, float("nan"), float("nan")),
        (float("nan"), -1.0, float("nan")),  # NaN wins over the non-positive |G|^2 rule
        (40.0, 0.0, float("inf")),
        (40.0, -3.0, float("inf")),
        (0.0, 0.0, float("inf")),  # not 0/0 = NaN
        (-5.0, 0.0, float("inf")),
        (-5.0, 2.0, 0.0),  # a negative trace average reads as 0
        (0.0, 1e-300, 0.0),
    ],
)
def test_simple_noise_scale_readout(trace_cov: float, grad_sq_norm: float, expected: float) -> None:
    value = float(simple_noise_scale(t(trace_cov), t(grad_sq_norm)))
    if math.isnan(expected):
        assert math.isnan(value)
    else:
        assert value == expected


def test_simple_noise_scale_is_elementwise() -> None:
    out = simple_noise_scale(t([40.0, -1.0, 3.0]), t([2.0, 1.0, 0.0]))
    assert out.tolist() == [20.0, 0.0, math.inf]


def test_paper_estimates_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="b_big > b_small > 0"):
        paper_estimates(1.0, 1.0, 8, 8)


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError, match="one entry per small batch"):
        summarize_small_batches(t([1.0, 2.0]), t([1.0]))
    with pytest.raises(ValueError, match="small_weights must have 2 entries"):
        summarize_small_batches(t([1.0, 2.0]), t([1.0, 2.0]), t([1.0]))


def test_a_backward_record_sums_like_the_small_batches_it_holds() -> None:
    """StepSums.add_backward, fed norms as a backward sees them (each small batch's share of the micro-batch's
    mean loss, every backward weighted 1), gives the summary that StepSums.add gives for the mean-loss gradients
    g_i with sizes b_i and weights w_i = share_i."""
    gen = torch.Generator().manual_seed(3)
    # Per example, in two parts (parameters): unit counts per example, then an int count spread evenly.
    recorded, direct = StepSums(), StepSums()
    for counts in ([3, 1, 4], [2, 2, 7, 1]):
        c = torch.tensor(counts, dtype=F64)
        g_sq = torch.rand(2, len(counts), generator=gen, dtype=F64)
        recorded.add_backward(g_sq * (c / c.sum()) ** 2, torch.tensor(counts), by_example=True, measured=(True, False))
        direct.add(g_sq.sum(dim=0), c, c / c.sum())
    g_sq = torch.rand(2, 4, generator=gen, dtype=F64)  # 6 units over 4 examples: 1.5 units and a 1/4 share each
    recorded.add_backward(g_sq / 16, 6, by_example=True, measured=(False, True))
    direct.add(g_sq.sum(dim=0), t([1.5] * 4), t([0.25] * 4))
    torch.testing.assert_close(recorded.summary().stack(), direct.summary().stack(), rtol=1e-12, atol=0)
    assert recorded.backward_passes == 3 and recorded.measured == (True, True) and recorded.failed is None
    # The whole micro-batch as the one small batch of each backward (share 1), its units a tensor or an int.
    recorded, direct = StepSums(), StepSums()
    for units in (torch.tensor([2.0, 3.0], dtype=F64), 3):
        g_sq = torch.rand(1, 1, generator=gen, dtype=F64)
        recorded.add_backward(g_sq, units)
        direct.add(g_sq.reshape(1), t([5.0 if isinstance(units, Tensor) else units]), t([1.0]))
    torch.testing.assert_close(recorded.summary().stack(), direct.summary().stack(), rtol=1e-12, atol=0)


def test_a_backward_whose_counts_do_not_match_its_examples_fails_the_step() -> None:
    sums = StepSums()
    sums.add_backward(torch.ones(1, 3, dtype=F64), torch.tensor([1, 2]), by_example=True)
    assert sums.failed == "batch_size_fn returned 2 per-example counts for 3 examples"
    assert sums.size_weighted_sq_norm_sum is None and sums.backward_passes == 1
    assert math.isnan(float(sums.summary().size_weighted_sq_norm_sum))
    sums.clear()
    assert sums.failed is None and sums.backward_passes == 0 and sums.size_sum == 0


@pytest.mark.parametrize("units", [3, 7, 1000003])
@pytest.mark.parametrize("by_example", [False, True])
def test_integer_tensor_units_are_counted_in_float64(units: int, by_example: bool) -> None:
    """A micro-batch's units as an integer tensor (0-d, or 1-D counts summed when the columns are not examples)
    give the sums a Python int gives, bit for bit: 1 / u in float32 would be off by ~1e-8 relative for these u."""
    assert float(1.0 / torch.tensor(units)) != 1.0 / units  # the float32 rounding the test would see
    gen = torch.Generator().manual_seed(units)
    columns = 3 if by_example else 1
    norms = [torch.rand(2, columns, generator=gen, dtype=F64) for _ in range(2)]
    as_int = StepSums()
    for sq in norms:
        as_int.add_backward(sq, units, by_example=by_example)
    tensors = [torch.tensor(units), torch.tensor(units, dtype=torch.int32)]
    if not by_example:  # a 1-D count tensor is summed: the micro-batch is the one small batch
        tensors.append(torch.tensor([units - 1, 1]))
    for units_tensor in tensors:
        as_tensor = StepSums()
        for sq in norms:
            as_tensor.add_backward(sq, units_tensor, by_example=by_example)
        assert torch.equal(as_tensor.summary().stack(), as_int.summary().stack()), units_tensor


@pytest.mark.parametrize(
    ("units", "by_example"),
    [(torch.tensor([2, -1, 3]), True), (torch.tensor(-8), False), (torch.tensor([4, -4]), False)],
    ids=["a negative per-example count", "a negative 0-d count", "counts summing to zero"],
)
def test_counts_that_are_negative_make_the_step_not_finite(units: Tensor, by_example: bool) -> None:
    """batch_size_fn's tensors are not read on the host (a sync per step): a negative count (or a micro-batch of no
    units) turns the step's sums into NaN or infinity, so the step is skipped rather than averaged."""
    sums = StepSums()
    columns = 3 if by_example else 1
    sums.add_backward(torch.ones(2, columns, dtype=F64), units, by_example=by_example)
    summary = sums.summary()
    assert not all(math.isfinite(float(v)) for v in summary.stack())
    padded = StepSums()  # an example of padding alone (count 0) is no small batch, and the step stays finite
    padded.add_backward(torch.ones(2, 3, dtype=F64), torch.tensor([2, 0, 3]), by_example=True)
    assert all(math.isfinite(float(v)) for v in padded.summary().stack())
