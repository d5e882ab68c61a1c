"""The schedule rules of AdaptiveBatchSize: decisions on a confidence bound, growth limit, calibration, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.batch_schedule import (
    NoiseScaleStatistics,
    calibration_from_branch,
    calibration_from_branch_points,
    ema_effective_samples,
    interval_accumulation,
    limit_growth,
)
from lightning_gns.estimators import EstimateSpread, relative_error
from support.adaptive_support import (
    DIM,
    LR,
    MICRO,
    PROBLEM,
    EstimateRecorder,
    RecordingRegression,
    X,
    Y,
    fit,
    reference_interval,
    scheduled_target,
)
from support.models import LinearProblem, LinearRegression, loader
from support.recording import Recorder
from support.reference import step_estimates
from support.trainers import make_trainer

# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("steps", [1, 2, 7, 50, 1000])
def test_ema_effective_samples_is_kish_count_of_the_ema_weights(beta: float, steps: int) -> None:
    weights = np.array([beta ** (steps - i) for i in range(1, steps + 1)], dtype=np.float64)
    weights /= weights.sum()
    assert ema_effective_samples(beta, steps) == pytest.approx(1 / np.sum(weights**2), rel=1e-10)
    assert ema_effective_samples(beta, 0) == 0.0


def test_ratio_relative_error_matches_simulated_spread() -> None:
    # Independent normal per-step estimates: the spread of T_mean / G_mean over many repetitions.
    rng = np.random.default_rng(0)
    n, t, g, st, sg, rho = 40, 10.0, 2.0, 4.0, 0.8, 0.3
    cov = np.array([[st**2, rho * st * sg], [rho * st * sg, sg**2]])
    draws = rng.multivariate_normal([t, g], cov, size=(20000, n)).mean(axis=1)
    simulated = np.std(draws[:, 0] / draws[:, 1]) / (t / g)

    def error(t: float, g: float, var_t: float, var_g: float, cov: float, samples: float) -> float:
        # The spread holds the variances of the averages: one step's over the sample count.
        values = [t, g, var_t / samples, var_g / samples, cov / samples, samples]
        return float(relative_error(EstimateSpread(*torch.tensor(values, dtype=torch.float64).unbind())))

    assert error(t, g, st**2, sg**2, rho * st * sg, n) == pytest.approx(simulated, rel=0.05)
    assert error(t, -1.0, 1.0, 1.0, 0.0, n) == math.inf
    assert error(t, g, 1.0, 1.0, 0.0, 1.0) == math.inf
    assert error(t, g, math.nan, 1.0, 0.0, n) == math.inf


def test_limit_growth() -> None:
    assert limit_growth(1000.0, 64.0, 2.0) == 128.0
    assert limit_growth(10.0, 64.0, 2.0) == 32.0
    assert limit_growth(100.0, 64.0, 2.0) == 100.0
    assert limit_growth(1000.0, 64.0, math.inf) == 1000.0


def test_interval_accumulation_limits_each_change_and_says_why() -> None:
    common = {"min_accumulation": 1, "max_accumulation": 64, "tolerance": 0.25}
    assert interval_accumulation(1e6, math.inf, 3, 10.0, monotonic=True, max_growth=2.0, **common)[0] == 6
    # 1.5 x 5 = 7.5 micro-batches: rounding (to 8) must not pass the limit.
    assert interval_accumulation(1e6, math.inf, 5, 10.0, monotonic=True, max_growth=1.5, **common)[0] == 7
    assert interval_accumulation(0.5, 1.0, 8, 10.0, monotonic=False, max_growth=2.0, **common)[0] == 4
    assert interval_accumulation(1e6, math.inf, 3, 10.0, monotonic=True, max_growth=math.inf, **common)[0] == 64
    new, why = interval_accumulation(1000.0, math.inf, 2, 32.0, monotonic=True, max_growth=2.0, **common)
    assert (new, why) == (4, "target >= 1000 > 64 x 1.25: grow to 128 (max_growth 2)")
    assert interval_accumulation(70.0, 90.0, 2, 32.0, monotonic=True, max_growth=2.0, **common) == (
        2,
        "target in [70, 90]: 64 within it (tolerance 0.25), keep",
    )
    # The estimate alone (say 100) would grow; its lower bound 60 does not.
    assert interval_accumulation(60.0, 200.0, 2, 32.0, monotonic=True, max_growth=2.0, **common)[0] == 2
    assert interval_accumulation(5.0, 10.0, 2, 32.0, monotonic=True, max_growth=2.0, **common)[1] == (
        "target <= 10 < 64 / 1.25: monotonic, keep"
    )
    assert interval_accumulation(1e6, math.inf, 64, 1.0, monotonic=True, max_growth=2.0, **common)[1] == (
        "target >= 1e+06 > 64 x 1.25: at max_accumulation 64"
    )
    assert interval_accumulation(math.nan, math.nan, 2, 32.0, monotonic=True, max_growth=2.0, **common)[1].startswith(
        "no usable target"
    )


def test_calibration_from_branch() -> None:
    assert calibration_from_branch(35.0, 92.0) == pytest.approx(35 / 92)
    with pytest.raises(ValueError, match="b_simple must be a positive finite batch size"):
        calibration_from_branch(35.0, math.inf)
    with pytest.raises(ValueError, match="b_crit must be a positive finite batch size"):
        calibration_from_branch(0.0, 92.0)


def test_calibration_from_branch_points_reads_branch_json_and_branch_points() -> None:
    # Dictionaries (branch.json) and objects with the BranchPoint attributes alike.
    # The digits study's branch.json (docs/critical_batch/): 16 / 102, 16 / 23.4 and 64 / 47.1.
    path = Path(__file__).resolve().parents[1] / "docs" / "critical_batch" / "branch.json"
    # Steps 30 and 100 stopped at the smallest multiplier (16 = 1 x 16): bounds, inferred from a branch.json that
    # predates the bound field, and left out with a warning. Step 250 (64 = 4 x 16) is a value.
    points = json.loads(path.read_text())
    assert all("bound" not in p for p in points)
    with pytest.warns(UserWarning, match=r"at steps \[30, 100\] hold a local critical batch at the smallest"):
        assert calibration_from_branch_points(points) == pytest.approx(64.0 / points[2]["b_simple"])
    with pytest.warns(UserWarning, match=r"at steps \[100\]"):
        value = calibration_from_branch_points([SimpleNamespace(**p) for p in points], min_step=100)
    assert value == pytest.approx(64.0 / points[2]["b_simple"])
    values = [{**p, "bound": ""} for p in points]  # told they are values: all three, geometric mean
    ratios = [p["local_critical_batch"] / p["b_simple"] for p in points]
    assert calibration_from_branch_points(values) == pytest.approx(float(np.exp(np.mean(np.log(ratios)))))
    with pytest.raises(ValueError, match="No branch point at step >= 10000"):
        calibration_from_branch_points(points, min_step=10_000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calibration": 0.0}, r"calibration must be a finite number > 0"),
        ({"calibration": math.inf}, r"calibration must be a finite number > 0"),
        ({"max_growth": 0.5}, r"max_growth must be a number >= 1"),
        ({"min_samples": -1}, r"min_samples must be a finite number > 0 \(10 effective steps, or 0 for no check\)"),
        ({"z": math.nan}, r"z must be a finite number >= 0"),
        ({"z": True}, r"z must be a finite number >= 0"),
    ],
)
def test_bad_schedule_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveBatchSize(**kwargs)


# ---------------------------------------------------------------- in training


def schedule(**kwargs: Any) -> AdaptiveBatchSize:
    settings: dict[str, Any] = {
        "warmup_steps": 2,
        "min_steps_between_changes": 1,
        "check_every_n_steps": 1,
        "tolerance": 0.0,
        "max_accumulation": 8,
        "lr_scaling": "linear",
        "min_samples": 0,
        "z": 0.0,
    }
    return AdaptiveBatchSize(**{**settings, **kwargs})


def test_growth_is_limited_to_doublings() -> None:
    callback = schedule(target=scheduled_target({2: 8}), max_growth=2.0)
    fit(callback, max_epochs=1)
    assert [int(h["accumulation"]) for h in callback.history] == [1, 2, 4, 8]
    for entry in callback.history[1:]:
        assert entry["old_accumulation"] * 2 == entry["accumulation"]
        assert entry["target"] == 8 * MICRO  # accumulation 8 of micro-batches of 4
        assert "max_growth 2" in entry["reason"] or entry["accumulation"] == 8


def test_no_change_before_the_estimate_has_enough_samples() -> None:
    # beta = 0.9 averages at most 19 effective steps: min_samples=25 is never reached.
    callback = schedule(target=scheduled_target({2: 4}), min_samples=25)
    fit(callback, max_epochs=1)
    assert [int(h["accumulation"]) for h in callback.history] == [1]
    assert callback.decisions and all(d["reason"].startswith("warming up: ") for d in callback.decisions)
    assert "effective samples < min_samples 25" in callback.decisions[-1]["reason"]
    # With a reachable count the same target is followed once the EMA holds 10 effective steps.
    callback = schedule(target=scheduled_target({2: 4}), min_samples=10)
    fit(callback, max_epochs=1)
    first = callback.history[1]["decided_step"]
    assert ema_effective_samples(0.9, first) >= 10 > ema_effective_samples(0.9, first - 1)


def test_growth_waits_for_the_lower_bound() -> None:
    """B_simple = 11 examples, micro-batches of 4: the estimate alone grows; a lower bound at 50 se never does."""
    on_estimate = schedule(target="b_simple", calibration=1.0, z=0.0)
    fit(on_estimate, LinearRegression(PROBLEM, lr=0.0), max_epochs=1)
    assert len(on_estimate.history) > 1
    cautious = schedule(target="b_simple", calibration=1.0, z=50.0)
    fit(cautious, LinearRegression(PROBLEM, lr=0.0), max_epochs=1)
    assert len(cautious.history) == 1
    assert cautious.decisions and all(d["reason"].endswith("keep") for d in cautious.decisions[2:])
    for d in cautious.decisions[2:]:
        assert d["b_simple_low"] <= d["b_simple"] <= d["b_simple_high"]
        assert d["target_low"] == d["b_simple_low"] and d["target_high"] == d["b_simple_high"]


def test_interval_is_recomputed_from_the_per_step_estimates() -> None:
    """Float64 recomputation: the interval of every decision from the recorded per-step estimates, exact; and
    those estimates against the raw batches."""
    gns = GradientNoiseScale(beta=0.9)
    recorder = Recorder(gns)
    estimates = EstimateRecorder(gns, z=1.0)
    callback = schedule(target=lambda stats: stats.effective_batch_size, z=1.0)  # never changes
    model = RecordingRegression(DIM, LR, PROBLEM.w)
    trainer = make_trainer([gns, callback, recorder, estimates])
    trainer.fit(model, loader(X, Y, MICRO))
    raw = [step_estimates([mb], 1, per_example=True) for mb in recorder.micro_batches]
    np.testing.assert_allclose(np.array(estimates.estimates), np.array(raw), rtol=1e-4, atol=1e-6)
    g = [e[0] for e in estimates.estimates]
    t = [e[1] for e in estimates.estimates]
    assert len(callback.decisions) > 10
    bounded = 0
    for decision in callback.decisions:
        m = decision["step"]  # estimates of optimizer steps 0 .. m - 1
        low, high, error, n_eff = reference_interval(g[:m], t[:m], beta=0.9, z=1.0)
        assert decision["samples"] == pytest.approx(n_eff, rel=1e-12)
        assert decision["b_simple_low"] == pytest.approx(low, rel=1e-9)
        assert decision["b_simple_high"] == pytest.approx(high, rel=1e-9)
        assert decision["relative_error"] == pytest.approx(error, rel=1e-9)
        assert decision["b_simple_low"] <= decision["b_simple"] <= decision["b_simple_high"]
        bounded += math.isfinite(high)
    assert 0 < bounded < len(callback.decisions)  # both cases: |G|^2 resolved, and within its noise
    # The metric's own readout after every step agrees too (what gns/b_simple_low and _high log).
    for m, (low, high, error) in enumerate(estimates.intervals, start=1):
        expected = reference_interval(g[:m], t[:m], beta=0.9, z=1.0)
        assert (low, high, error) == pytest.approx(expected[:3], rel=1e-9)


def test_noise_floor_grows_to_the_maximum_within_a_few_hundred_steps() -> None:
    """At the optimum with lr 0: |G|^2 = 0, B_simple = inf. Default arguments: no change in the first 50 steps,
    then growth by at most doublings to max_accumulation."""
    problem = LinearProblem(dim=DIM, offset_norm=0.0, seed=3)
    x, y = problem.sample(MICRO * 3000, seed=4)
    callback = AdaptiveBatchSize(max_accumulation=8)
    gns = GradientNoiseScale()
    trainer = make_trainer([gns, callback], max_steps=300)
    trainer.fit(LinearRegression(problem, lr=0.0), loader(x, y, MICRO))
    changes = [(h["step"], h["accumulation"]) for h in callback.history]
    assert changes[1][0] >= 50  # the first 50 steps of noise do not grow the batch
    assert changes[-1][1] == 8 and changes[-1][0] <= 300
    # Each change at most doubles (max_growth=2); 0.25 x the lower bound asks for 7, not 8, after 4.
    assert [k for _, k in changes] == [1, 2, 4, 7, 8]
    grown = [d for d in callback.decisions if d["new_accumulation"] > d["accumulation"]]
    assert all(d["b_simple_high"] == math.inf and d["target_low"] > 1.25 * d["accumulation"] * MICRO for d in grown)


def test_early_noise_does_not_grow_a_batch_at_its_noise_scale() -> None:
    """B_simple ~ 6.8 examples, the batch 4, calibration 0.75: the target sits at the tolerance band's edge.

    Deciding from step 1 on the estimate itself grows on noise; the default interval and min_samples hold the
    batch through the first 50 steps (and beyond), even with no warm-up.
    """
    problem = LinearProblem(dim=DIM, offset_norm=3.0, seed=3)
    x, y = problem.sample(MICRO * 300, seed=4)

    def run(**kwargs: Any) -> AdaptiveBatchSize:
        callback = AdaptiveBatchSize(
            calibration=0.75, warmup_steps=0, check_every_n_steps=1, min_steps_between_changes=1, **kwargs
        )
        trainer = make_trainer([GradientNoiseScale(), callback], max_steps=50)
        trainer.fit(LinearRegression(problem, lr=0.0), loader(x, y, MICRO))
        return callback

    assert len(run(z=0.0, min_samples=0).history) > 1
    assert len(run().history) == 1


def test_calibration_scales_the_named_targets_and_reaches_target_functions() -> None:
    callback = schedule(target="b_simple", calibration=3.0, max_growth=math.inf, monotonic=False)
    fit(callback, LinearRegression(PROBLEM, lr=0.0), max_epochs=1)
    changes = callback.history[1:]
    assert changes
    for decision in callback.decisions:
        assert decision["target"] == pytest.approx(3.0 * decision["b_simple"], rel=1e-12)
    # B_simple = 11 examples here: 3 x 11 = 33 is about 8 micro-batches of 4.
    assert callback.accumulation is not None and callback.accumulation >= 6

    seen: list[NoiseScaleStatistics] = []

    def target(stats: NoiseScaleStatistics) -> float:
        seen.append(stats)
        return stats.effective_batch_size

    fit(schedule(target=target, calibration=0.25), LinearRegression(PROBLEM, lr=0.0), max_epochs=1)
    assert seen and all(s.calibration == 0.25 and s.b_crit == 0.25 * s.b_simple for s in seen)


def test_resume_mid_run_keeps_the_interval_state(tmp_path: Path) -> None:
    """A run resumed at the end of epoch 0 makes the same decisions, on the same intervals, as the whole run."""

    def make() -> AdaptiveBatchSize:
        return schedule(target="b_simple", calibration=1.0, min_samples=5, z=1.0, max_growth=2.0, monotonic=False)

    full = make()
    fit(full, RecordingRegression(DIM, LR, PROBLEM.w))
    first = make()
    trainer, _ = fit(first, RecordingRegression(DIM, LR, PROBLEM.w), max_epochs=1)
    ckpt = tmp_path / "epoch0.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = make()
    fit(resumed, RecordingRegression(DIM, LR, PROBLEM.w), ckpt_path=str(ckpt))
    # Changes before the resume, and after it both holds inside the interval and changes.
    assert len(first.history) > 2
    after = [d["reason"] for d in full.decisions if d["step"] > trainer.global_step]
    assert any(r.endswith("keep") for r in after)
    assert any(" to " in r and not r.endswith("keep") for r in after)
    # Compared as JSON text: exact floats (the intervals included), and NaN/inf equal themselves.
    assert json.dumps(resumed.decisions) == json.dumps(full.decisions)
    assert json.dumps(resumed.history) == json.dumps(full.history)
    assert torch.equal(resumed.gns.metric.estimate_moments, full.gns.metric.estimate_moments)
