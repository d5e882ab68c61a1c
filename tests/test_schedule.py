"""The schedule rules of AdaptiveBatchSize: readiness of the estimate, growth limit, calibration, reasons, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.batch_schedule import (
    NoiseScaleStatistics,
    calibration_from_branch,
    calibration_from_branch_points,
    ema_effective_samples,
    limit_growth,
    planned_accumulation,
    ratio_relative_error,
)
from support.adaptive_support import DIM, LR, MICRO, PROBLEM, RecordingRegression, X, Y, fit, scheduled_target
from support.models import LinearRegression, loader
from support.recording import Recorder
from support.reference import step_estimates

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
    predicted = ratio_relative_error(t, g, st**2, sg**2, rho * st * sg, n)
    assert predicted == pytest.approx(simulated, rel=0.05)
    assert ratio_relative_error(t, -1.0, 1.0, 1.0, 0.0, n) == math.inf
    assert ratio_relative_error(t, g, 1.0, 1.0, 0.0, 1.0) == math.inf
    assert ratio_relative_error(t, g, math.nan, 1.0, 0.0, n) == math.inf


def test_limit_growth() -> None:
    assert limit_growth(1000.0, 64.0, 2.0) == 128.0
    assert limit_growth(10.0, 64.0, 2.0) == 32.0
    assert limit_growth(100.0, 64.0, 2.0) == 100.0
    assert limit_growth(1000.0, 64.0, math.inf) == 1000.0


def test_planned_accumulation_limits_each_change_and_says_why() -> None:
    common = {"min_accumulation": 1, "max_accumulation": 64, "tolerance": 0.25}
    assert planned_accumulation(1e6, 3, 10.0, monotonic=True, max_growth=2.0, **common)[0] == 6
    # 1.5 x 5 = 7.5 micro-batches: rounding (to 8) must not pass the limit.
    assert planned_accumulation(1e6, 5, 10.0, monotonic=True, max_growth=1.5, **common)[0] == 7
    assert planned_accumulation(1.0, 8, 10.0, monotonic=False, max_growth=2.0, **common)[0] == 4
    assert planned_accumulation(1e6, 3, 10.0, monotonic=True, max_growth=math.inf, **common)[0] == 64
    new, why = planned_accumulation(1000.0, 2, 32.0, monotonic=True, max_growth=2.0, **common)
    assert (new, why) == (4, "target 1000 > 64 x 2: grow to 128 (max_growth 2)")
    assert planned_accumulation(70.0, 2, 32.0, monotonic=True, max_growth=2.0, **common) == (
        2,
        "target 70 within tolerance 0.25 of 64",
    )
    assert planned_accumulation(10.0, 2, 32.0, monotonic=True, max_growth=2.0, **common)[1] == (
        "target 10 < 64: monotonic, keep"
    )
    assert planned_accumulation(1e6, 64, 1.0, monotonic=True, max_growth=2.0, **common)[1] == (
        "target 1e+06 > 64: at max_accumulation 64"
    )
    assert planned_accumulation(math.nan, 2, 32.0, monotonic=True, max_growth=2.0, **common)[1].startswith(
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
    points = json.loads(path.read_text())
    ratios = [p["local_critical_batch"] / p["b_simple"] for p in points]
    assert calibration_from_branch_points(points) == pytest.approx(float(np.exp(np.mean(np.log(ratios)))))
    later = [r for p, r in zip(points, ratios, strict=True) if p["step"] >= 100]
    expected = float(np.exp(np.mean(np.log(later))))
    assert calibration_from_branch_points([SimpleNamespace(**p) for p in points], min_step=100) == pytest.approx(
        expected
    )
    with pytest.raises(ValueError, match="No branch point at step >= 10000"):
        calibration_from_branch_points(points, min_step=10_000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"calibration": 0.0}, r"calibration must be a finite number > 0"),
        ({"calibration": math.inf}, r"calibration must be a finite number > 0"),
        ({"max_growth": 0.5}, r"max_growth must be a number >= 1"),
        ({"min_samples": -1}, r"min_samples must be a finite number > 0 \(10 effective steps, or 0 for no check\)"),
        ({"max_relative_error": math.nan}, r"max_relative_error must be a number > 0"),
        ({"max_relative_error": True}, r"max_relative_error must be a number > 0"),
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
        "max_relative_error": math.inf,
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
    assert callback.decisions and all(d["reason"].startswith("not ready: ") for d in callback.decisions)
    assert "effective samples < min_samples 25" in callback.decisions[-1]["reason"]
    # With a reachable count the same target is followed once the EMA holds 10 effective steps.
    callback = schedule(target=scheduled_target({2: 4}), min_samples=10)
    fit(callback, max_epochs=1)
    first = callback.history[1]["decided_step"]
    assert ema_effective_samples(0.9, first) >= 10 > ema_effective_samples(0.9, first - 1)


def test_no_change_while_the_estimate_is_too_noisy() -> None:
    callback = schedule(target="b_simple", calibration=1.0, max_relative_error=1e-6)
    fit(callback, LinearRegression(PROBLEM, lr=0.0), max_epochs=1)
    assert len(callback.history) == 1
    assert "relative standard error of B_simple" in callback.decisions[-1]["reason"]


def test_relative_error_is_recomputed_from_the_per_step_estimates() -> None:
    """Float64 recomputation: per-step estimates from the raw batches, their EMA spread, the delta method."""
    gns = GradientNoiseScale(beta=0.9)
    recorder = Recorder(gns)
    callback = schedule(target=lambda stats: stats.effective_batch_size)  # never changes
    model = RecordingRegression(DIM, LR, PROBLEM.w)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[gns, callback, recorder],
    )
    trainer.fit(model, loader(X, Y, MICRO))
    estimates = [step_estimates([mb], 1, per_example=True) for mb in recorder.micro_batches]
    g = np.array([e[0] for e in estimates])
    t = np.array([e[1] for e in estimates])
    beta = 0.9
    assert len(callback.decisions) > 10
    for decision in callback.decisions:
        m = decision["step"]  # estimates of optimizer steps 0 .. m - 1
        w = beta ** np.arange(m - 1, -1, -1, dtype=np.float64)
        w /= w.sum()
        n_eff = 1 / np.sum(w**2)
        mt, mg = w @ t[:m], w @ g[:m]
        unbias = n_eff / (n_eff - 1)
        vt, vg = w @ (t[:m] - mt) ** 2 * unbias, w @ (g[:m] - mg) ** 2 * unbias
        c = w @ ((t[:m] - mt) * (g[:m] - mg)) * unbias
        expected = math.sqrt(max(vt / mt**2 + vg / mg**2 - 2 * c / (mt * mg), 0) / n_eff)
        if mg <= 0 or n_eff < 2:
            expected = math.inf  # no spread from fewer than two samples
        assert decision["samples"] == pytest.approx(n_eff, rel=1e-9)
        assert decision["b_simple"] == (pytest.approx(mt / mg, rel=1e-4) if mg > 0 else math.inf)
        assert decision["relative_error"] == pytest.approx(expected, rel=1e-3)


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


def test_resume_mid_run_keeps_the_readiness_state(tmp_path: Path) -> None:
    """A run resumed at the end of epoch 0 makes the same decisions, for the same reasons, as the whole run."""

    def make() -> AdaptiveBatchSize:
        return schedule(
            target="b_simple", calibration=1.0, min_samples=5, max_relative_error=0.6, max_growth=2.0, monotonic=False
        )

    full = make()
    fit(full, RecordingRegression(DIM, LR, PROBLEM.w))
    first = make()
    trainer, _ = fit(first, RecordingRegression(DIM, LR, PROBLEM.w), max_epochs=1)
    ckpt = tmp_path / "epoch0.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = make()
    fit(resumed, RecordingRegression(DIM, LR, PROBLEM.w), ckpt_path=str(ckpt))
    # The thresholds are set so that changes happen before the resume, and both refusals for noise and
    # decisions on a ready estimate after it.
    assert len(first.history) > 2
    after = [d["reason"] for d in full.decisions if d["step"] > trainer.global_step]
    assert any(r.startswith("not ready: relative standard error") for r in after)
    assert any(r.startswith("target ") for r in after)
    # Compared as JSON text: exact floats, and a NaN target (no target while not ready) equals itself.
    assert json.dumps(resumed.decisions) == json.dumps(full.decisions)
    assert json.dumps(resumed.history) == json.dumps(full.history)
    torch.testing.assert_close(
        torch.tensor(resumed.state_dict()["estimate_moments"]), torch.tensor(full.state_dict()["estimate_moments"])
    )
