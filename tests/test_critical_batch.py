"""The trade-off fit on synthetic runs drawn from McCandlish et al.'s eq. 2.11, its errors, and a tiny real sweep."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_gns.batch_schedule import calibration_from_branch_points, critical_batch_bound
from lightning_gns.tools.critical_batch import (
    CriticalBatchError,
    bootstrap_fit,
    fit_tradeoff,
    local_critical_batch,
    steps_to_target,
)

S_MIN, E_MIN = 120.0, 9600.0  # B_crit = 80
BATCH_SIZES = np.array([4, 8, 16, 32, 64, 128, 256, 512, 1024])
ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "example_projects" / "digits_sweep.py")


def paper_runs(batch_sizes: np.ndarray, s_min: float, e_min: float) -> tuple[np.ndarray, np.ndarray]:
    """Steps and examples on the hyperbola, solved for E = B S by bisection rather than by the closed form,
    so the test does not assume the derivation the fit relies on."""
    steps = []
    for b in batch_sizes:
        lo, hi = s_min * (1 + 1e-12), s_min * 1e6

        def residual(s: float, b: float = float(b)) -> float:
            return (s / s_min - 1) * (b * s / e_min - 1) - 1

        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if residual(mid) < 0 else (lo, mid)
        steps.append(math.sqrt(lo * hi))
    s = np.array(steps)
    return s, s * batch_sizes


def test_synthetic_runs_lie_on_the_hyperbola() -> None:
    s, e = paper_runs(BATCH_SIZES, S_MIN, E_MIN)
    np.testing.assert_allclose((s / S_MIN - 1) * (e / E_MIN - 1), 1.0, rtol=1e-9)
    # At B = B_crit a run needs twice the minimum steps and twice the minimum examples (theory notes).
    s_crit, e_crit = paper_runs(np.array([E_MIN / S_MIN]), S_MIN, E_MIN)
    assert s_crit[0] == pytest.approx(2 * S_MIN) and e_crit[0] == pytest.approx(2 * E_MIN)


def test_fit_recovers_exact_parameters() -> None:
    s, _ = paper_runs(BATCH_SIZES, S_MIN, E_MIN)
    fit = fit_tradeoff(BATCH_SIZES, s)
    assert fit.s_min == pytest.approx(S_MIN, rel=1e-8)
    assert fit.e_min == pytest.approx(E_MIN, rel=1e-8)
    assert fit.b_crit == pytest.approx(80.0, rel=1e-8)
    assert fit.rel_rms < 1e-9
    np.testing.assert_allclose(fit.examples(BATCH_SIZES), s * BATCH_SIZES, rtol=1e-8)


@pytest.mark.parametrize("s_min, e_min", [(50.0, 400.0), (300.0, 300_000.0), (10.0, 2000.0)])
def test_fit_recovers_parameters_from_noisy_seeds(s_min: float, e_min: float) -> None:
    rng = np.random.default_rng(1)
    b = np.repeat(BATCH_SIZES, 5)  # five seeds per batch size
    s, _ = paper_runs(b, s_min, e_min)
    noisy = s * np.exp(rng.normal(0.0, 0.05, size=s.shape))  # 5% run-to-run scatter
    result = bootstrap_fit(b, noisy, num_resamples=300, confidence=0.95)
    b_crit = e_min / s_min
    assert result.fit.b_crit == pytest.approx(b_crit, rel=0.15)
    assert result.fit.s_min == pytest.approx(s_min, rel=0.1)
    lo, hi = result.b_crit_interval
    assert lo < b_crit < hi
    assert 0.02 < result.fit.rel_rms < 0.08


def test_fit_is_unbiased_under_lognormal_scatter() -> None:
    # Run-to-run scatter is multiplicative: the fit must find the median run's S_min and E_min. Least squares in
    # relative residuals (S_obs - S_fit) / S_obs, the earlier fit, put both ~14% low here (B_crit unbiased).
    rng = np.random.default_rng(0)
    b = np.repeat(np.array([8.0, 16, 32, 64, 128, 256]), 3)
    truth = 100.0 * (1 + 64 / b)
    fits = [fit_tradeoff(b, truth * np.exp(rng.normal(0.0, 0.35, b.size))) for _ in range(400)]
    assert np.median([f.s_min for f in fits]) == pytest.approx(100.0, rel=0.04)
    assert np.median([f.e_min for f in fits]) == pytest.approx(6400.0, rel=0.04)
    assert np.median([f.b_crit for f in fits]) == pytest.approx(64.0, rel=0.06)


@pytest.mark.parametrize("seed", range(5))
def test_fit_is_the_least_squares_optimum_in_log_steps(seed: int) -> None:
    # An independent search: a dense grid over (log S_min, log E_min) around the fit never does better.
    rng = np.random.default_rng(seed)
    b = np.repeat(np.array([4.0, 16, 64, 256]), 2)
    s = 50.0 * (1 + 40 / b) * np.exp(rng.normal(0.0, 0.3, b.size))
    fit = fit_tradeoff(b, s)

    def loss(s_min: np.ndarray, e_min: np.ndarray) -> np.ndarray:
        model = s_min[..., None] + e_min[..., None] / b
        return np.sum((np.log(s) - np.log(model)) ** 2, axis=-1)

    factors = np.exp(np.linspace(-0.5, 0.5, 401))
    grid_s, grid_e = np.meshgrid(fit.s_min * factors, fit.e_min * factors)
    best = float(loss(np.array(fit.s_min), np.array(fit.e_min)))
    assert best <= float(loss(grid_s, grid_e).min()) + 1e-12


def test_fit_without_a_step_floor_puts_b_crit_at_infinity() -> None:
    # Perfect scaling (S proportional to 1/B) everywhere: no S_min was reached by any batch size.
    fit = fit_tradeoff([8, 16, 32], [800.0, 400.0, 200.0])
    assert fit.s_min == pytest.approx(0.0, abs=1e-9)
    assert fit.e_min == pytest.approx(6400.0)
    assert math.isinf(fit.b_crit)


def test_negative_unconstrained_optimum_is_clamped() -> None:
    # Larger batches needing *more* steps would give E_min < 0; the fit keeps it at 0.
    fit = fit_tradeoff([8, 64], [100.0, 120.0])
    assert fit.e_min == 0.0 and fit.s_min > 0 and fit.b_crit == 0.0


@pytest.mark.parametrize(
    "batch_sizes, steps, message",
    [
        ([32, 32, 32], [10.0, 11.0, 12.0], "two or more different batch sizes"),
        ([32], [10.0], "two or more different batch sizes"),
        ([16, 32, 64], [50.0, float("nan"), 20.0], "batch sizes [32] never reached"),
        ([16, 32, 64], [50.0, float("inf"), float("nan")], "batch sizes [32, 64] never reached"),
        ([16, 32], [50.0], "differ in length"),
        ([0, 32], [50.0, 20.0], "positive and finite"),
        ([16, 32], [50.0, -1.0], "must be positive"),
    ],
)
def test_bad_input_is_an_error(batch_sizes: list[float], steps: list[float], message: str) -> None:
    with pytest.raises(CriticalBatchError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fit_tradeoff(batch_sizes, steps)


def test_bootstrap_argument_errors() -> None:
    with pytest.raises(CriticalBatchError, match="confidence"):
        bootstrap_fit([8, 16], [10.0, 6.0], confidence=1.5)
    with pytest.raises(CriticalBatchError, match="num_resamples"):
        bootstrap_fit([8, 16], [10.0, 6.0], num_resamples=0)


def test_steps_to_target() -> None:
    assert steps_to_target([5, 10, 15], [0.4, 0.3, 0.2], 0.5) == 5.0  # below at the first evaluation
    assert math.isnan(steps_to_target([5, 10], [0.9, 0.8], 0.5))
    assert math.isnan(steps_to_target([], [], 0.5))
    # First crossing counts, even if the loss rises again afterwards.
    assert steps_to_target([10, 20, 30, 40], [1.0, 0.5, 0.9, 0.4], 0.5) == pytest.approx(20.0)
    with pytest.raises(CriticalBatchError, match="positive"):
        steps_to_target([1], [1.0], 0.0)


def test_sweep_lr_rule_and_local_critical_batch() -> None:
    from lightning_gns.tools.sweep import _lr_factor

    assert 0.2 * _lr_factor(16 / 64, "linear") == pytest.approx(0.05)
    assert 0.2 * _lr_factor(16 / 64, "sqrt") == pytest.approx(0.1)
    with pytest.raises(CriticalBatchError, match="Unknown learning-rate rule"):
        _lr_factor(2, "cubic")
    # Within tolerance up to k=4; k=8 is worse; k=16 recovering does not count (contiguous from the start).
    assert local_critical_batch([1, 2, 4, 8, 16], [1.0, 1.0, 1.01, 1.2, 1.0], 0.02) == 4.0
    assert local_critical_batch([4, 1, 2], [0.5, 1.0, 2.0], 0.02) == 1.0  # sorted by multiplier first
    assert local_critical_batch([1, 2], [1.0, float("nan")], 0.02) == 1.0
    with pytest.raises(CriticalBatchError):
        local_critical_batch([1, 2], [1.0], 0.02)


@pytest.mark.slow
def test_fitting_module_does_not_import_lightning() -> None:
    code = "import sys, lightning_gns.tools.critical_batch; print(any(m.startswith('lightning.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ end to end, tiny settings
@pytest.mark.slow
def test_tiny_sweep_command_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_gns.tools.cli import main

    out = tmp_path / "sweep"
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)
    code = main(
        [
            "sweep",
            "--model",
            f"{DIGITS}:model",
            "--data",
            f"{DIGITS}:datamodule",
            "--batch-sizes",
            "16",
            "64",
            "--target-loss",
            "1.5",
            "--seeds",
            "0",
            "1",
            "--lr",
            "0.05",
            "--base-batch-size",
            "32",
            "--lr-rule",
            "sqrt",
            "--max-examples",
            "4000",
            "--eval-every-examples",
            "64",
            "--resamples",
            "50",
            "--accelerator",
            "cpu",
            "-o",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert logging.getLogger("lightning.pytorch").level == logging.INFO  # quieted for the sweep only
    summary = json.loads((out / "fit.json").read_text())
    assert summary["fit_error"] is None
    assert summary["s_min"] >= 0 and summary["e_min"] >= 0
    assert math.isfinite(summary["b_simple_median"]) and summary["b_simple_median"] > 0
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    assert (out / "sweep.png").stat().st_size > 1000
    assert "B_crit = E_min / S_min" in printed and "| 16 |" in (out / "sweep.md").read_text()


def test_tiny_branch_on_digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also: every Trainer the command builds (base run, branches, validations) gets --accelerator."""
    from lightning.pytorch import Trainer

    from lightning_gns.tools import sweep
    from lightning_gns.tools.cli import main

    built: list[dict[str, object]] = []

    class RecordingTrainer(Trainer):
        def __init__(self, **kwargs: object) -> None:
            built.append(kwargs)
            super().__init__(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sweep, "Trainer", RecordingTrainer)
    out = tmp_path / "branch"
    argv = ["branch", "--model", f"{DIGITS}:model", "--data", f"{DIGITS}:datamodule", "--batch-size", "16"]
    argv += ["--lr", "0.05", "--at-steps", "4", "--branch-examples", "128", "--multipliers", "1", "2"]
    argv += ["--seeds", "0", "--accelerator", "cpu", "-o", str(out)]
    assert main(argv) == 0
    text = (out / "branch.json").read_text()
    (point,) = json.loads(text, parse_constant=lambda name: pytest.fail(f"branch.json holds {name}: not strict JSON"))
    assert point["step"] == 4 and point["examples"] == 64
    assert point["loss_stds"] == [None, None]  # one seed: no spread, written as null (NaN is not JSON)
    assert point["local_critical_batch"] in (16, 32)
    assert all(math.isfinite(x) for x in point["losses"])
    # With two multipliers the local critical batch is at one of them: a bound, said, and no calibration.
    assert point["bound"] == ("at most" if point["local_critical_batch"] == 16 else "at least")
    with (
        pytest.warns(UserWarning, match=r"steps \[4\] hold a local critical batch at the smallest or largest"),
        pytest.raises(ValueError, match="with a local critical batch between the multipliers tried"),
    ):
        calibration_from_branch_points([point])
    # Four steps in, |G|^2 may still be within its noise: B_simple inf, written as null, and read back as NaN.
    if point["b_simple"] is None:
        with pytest.raises(ValueError, match="b_simple must be a positive finite batch size, got nan"):
            calibration_from_branch_points([{**point, "bound": ""}])
    else:
        assert point["b_simple"] > 0 and calibration_from_branch_points([{**point, "bound": ""}]) > 0
    # The base run, the validation at the branch point, and per multiplier one branch and its validation.
    assert len(built) == 2 + 2 * 2
    assert [kwargs.get("accelerator") for kwargs in built] == ["cpu"] * len(built)


def test_sweep_reports_an_unreachable_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_gns.tools.cli import main

    argv = ["sweep", "--model", f"{DIGITS}:model", "--data", f"{DIGITS}:datamodule", "--batch-sizes", "16", "32"]
    argv += ["--target-loss", "0.0001", "--seeds", "0", "--lr", "0.05", "--base-batch-size", "32"]
    argv += ["--max-examples", "64", "--accelerator", "cpu", "-o", str(tmp_path)]
    assert main(argv) == 1
    assert "never reached the target" in capsys.readouterr().out
    assert "never reached" in json.loads((tmp_path / "fit.json").read_text())["fit_error"]


def test_a_module_that_cannot_be_imported_names_the_file_form() -> None:
    """MODULE:NAME is imported from sys.path, which a console script does not start in the current folder: the
    error names the FILE.py:NAME form (it was a ModuleNotFoundError traceback)."""
    from lightning_gns.tools.sweep import load_factory

    with pytest.raises(CriticalBatchError, match=r"Cannot import 'digits_swep'.*\(digits_swep\.py:model\)"):
        load_factory("digits_swep:model")


@pytest.mark.parametrize("at_steps", [[0], [-1], [5, 0]])
def test_branch_points_below_step_one_are_refused(at_steps: list[int]) -> None:
    """--at-steps -1 trained forever (max_steps=-1), 0 printed "(no branch points)" with exit status 0."""
    from lightning_gns.tools.sweep import branched_critical_batch

    with pytest.raises(CriticalBatchError, match=r"at_steps must be optimizer steps of 1 or more"):
        branched_critical_batch(
            lambda **kw: None, lambda **kw: None, batch_size=8, lr=0.1, at_steps=at_steps, branch_examples=64
        )


def test_steps_exactly_proportional_to_one_over_b_give_an_infinite_critical_batch() -> None:
    """Rounding left S_min at 8.3e-15 and B_crit at 1.9e17 (a helper's probe: 115 of 204 such data sets)."""
    for batch_sizes, steps in (([4, 8, 16], [400.0, 200.0, 100.0]), ([3, 7, 21], [700.0, 300.0, 100.0])):
        fit = fit_tradeoff(batch_sizes, steps)
        assert fit.s_min == 0.0 and fit.b_crit == math.inf


def test_one_run_per_batch_size_gives_no_bootstrap_interval() -> None:
    """Resampling one run per batch size always drew that run: a 90% interval of zero width ('0.0 to 0.0')."""
    result = bootstrap_fit([8, 32, 128], [300.0, 100.0, 50.0], num_resamples=50)
    assert all(math.isnan(v) for v in (*result.b_crit_interval, *result.s_min_interval, *result.e_min_interval))
    assert math.isfinite(result.fit.b_crit)


def test_a_local_critical_batch_at_the_edge_multipliers_is_a_bound() -> None:
    assert critical_batch_bound([1, 2, 4, 8], local_critical_batch([1, 2, 4, 8], [1.0, 1.3, 1.4, 1.5], 0.05)) == (
        "at most"
    )
    assert critical_batch_bound([1, 2, 4, 8], local_critical_batch([1, 2, 4, 8], [1.0, 1.0, 1.0, 1.0], 0.05)) == (
        "at least"
    )
    assert critical_batch_bound([1, 2, 4, 8], local_critical_batch([1, 2, 4, 8], [1.0, 1.0, 1.3, 1.4], 0.05)) == ""
    assert math.isnan(local_critical_batch([1, 2], [math.nan, 1.0], 0.05))  # the smallest branch diverged


def test_branch_examples_must_give_every_branch_the_same_examples() -> None:
    """Rounded down per branch, 2000 examples at batch 16 gave k = 16 only 1792: the larger batches looked worse
    (a synthetic model's local critical batch read 128 for 256)."""
    from lightning_gns.tools.sweep import branched_critical_batch

    uneven = r"not a whole number of steps at batches \[32, 64, 128, 256\].*e\.g\. 2048"
    with pytest.raises(CriticalBatchError, match=uneven):
        branched_critical_batch(
            model_factory=None, datamodule_factory=None, batch_size=16, lr=0.1, at_steps=[10],  # type: ignore[arg-type]
            multipliers=[1, 2, 4, 8, 16], branch_examples=2000,
        )  # fmt: skip


def test_the_sweep_table_names_what_the_fit_cannot_see() -> None:
    """A batch size whose runs all missed the target was dropped from the fit, one whose runs partly missed was fitted
    on the fast ones, and a learning rate at the edge of the grid was taken as the best, all without a word (exit 0,
    fit_error null)."""
    from lightning_gns.tools.sweep import SweepResult, SweepRun, format_sweep_table

    def run(batch_size: int, lr: float, seed: int, steps: float) -> SweepRun:
        return SweepRun(batch_size, seed, lr, steps, steps * batch_size, 30.0, 30.0, 0.5, 100, 1.0, [10, 20], [1, 0.5])

    runs = [
        run(b, lr, seed, (100 + 1600 / b) * (1.2 if lr == 0.2 else 1.0) + seed)
        for b in (8, 32, 128)
        for lr in (0.1, 0.2)
        for seed in (0, 1)
    ]
    runs += [run(512, 0.1, seed, math.nan) for seed in (0, 1)]
    runs[8] = run(128, 0.1, 0, math.nan)  # one of the two selected runs at 128 missed
    chosen = {8: 0.1, 32: 0.1, 128: 0.1, 512: 0.1}
    selected = [r for r in runs if r.reached and chosen[r.batch_size] == r.lr]
    boot = bootstrap_fit([r.batch_size for r in selected], [r.steps for r in selected], num_resamples=20)
    table = format_sweep_table(SweepResult(1.0, "val/loss", runs, chosen, boot))
    assert "Batch sizes [512] never reached the target in any run: left out of the fit." in table
    assert "At batch sizes [128] some runs missed the target" in table
    assert "At batch sizes [8, 32, 128] the fastest learning rate is at the edge of the grid" in table
