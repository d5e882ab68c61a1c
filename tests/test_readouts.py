"""Readouts after every kind of fit: steps without a backward, batches whose examples must be counted by the user."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.callbacks._spawn import SpawnedResult
from support.models import LinearProblem, LinearRegression, loader
from support.trainers import MemoryLogger, make_trainer

PROBLEM = LinearProblem(dim=5, seed=30)


class StepReadouts(Callback):
    """After GradientNoiseScale's hook: every optimizer step's readouts, and whether a backward ran in it."""

    def __init__(self, gns: GradientNoiseScale) -> None:
        self.gns = gns
        self.steps: list[tuple[bool, dict[str, float]]] = []
        self._backward = False

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._backward = True

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        self.steps.append((self._backward, self.gns.compute()))
        self._backward = False

    def last_with_backward(self) -> dict[str, float]:
        return [readouts for backward, readouts in self.steps if backward][-1]


def assert_same_readouts(got: dict[str, float], want: dict[str, float]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == value or (math.isnan(got[name]) and math.isnan(value)), name


# ---------------------------------------------------------------- steps without a backward


class BatchNormRegression(LinearRegression):
    def __init__(self) -> None:
        super().__init__(PROBLEM, lr=0.05)
        self.norm = nn.BatchNorm1d(PROBLEM.dim)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return 0.5 * (self.linear(self.norm(x)).squeeze(-1) - y).square().mean()


def test_swa_batchnorm_epoch_changes_no_readout() -> None:
    """SWA's extra epoch runs the forward to refresh BatchNorm and steps the optimizer without a backward."""
    gns = GradientNoiseScale(beta=0.9)
    readouts = StepReadouts(gns)
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    trainer = make_trainer([gns, readouts, swa], max_epochs=2, accumulate_grad_batches=2)
    trainer.fit(BatchNormRegression(), loader(*PROBLEM.sample(96, seed=31), batch_size=8))
    assert gns.mode == "microbatch"
    assert [backward for backward, _ in readouts.steps].count(False) == 1  # the test needs SWA's step
    assert readouts.steps[-1][0] is False
    final = gns.compute()
    assert_same_readouts(final, readouts.last_with_backward())
    assert final["gns/b_big"] == 16.0 and final["gns/b_small"] == 8.0
    assert final["gns/skipped_steps"] == 0.0 and math.isfinite(final["gns/steps_over_min"])
    assert int(gns.metric.measured_steps) == 12


class SometimesNoLoss(LinearRegression):
    """training_step returns None for some batches: Lightning still calls the optimizer-step hooks."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__(PROBLEM, lr=0.05)
        self.skip = skip

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        return None if batch_idx in self.skip else super().training_step(batch, batch_idx)


def test_optimizer_steps_without_backward_change_no_readout() -> None:
    gns = GradientNoiseScale(beta=0.9, mode="per_example")
    readouts = StepReadouts(gns)
    trainer = make_trainer([gns, readouts])
    trainer.fit(SometimesNoLoss(skip={3, 9}), loader(*PROBLEM.sample(80, seed=32), batch_size=8))  # 10 batches
    assert [backward for backward, _ in readouts.steps] == [i not in (3, 9) for i in range(10)]
    # The step without a backward in the middle left everything as the step before had it.
    assert_same_readouts(readouts.steps[3][1], readouts.steps[2][1])
    assert_same_readouts(gns.compute(), readouts.steps[8][1])
    assert gns.skipped_steps == 0 and int(gns.metric.measured_steps) == 8
    assert gns.compute()["gns/b_big"] == 8.0 and gns.compute()["gns/b_small"] == 1.0


# ---------------------------------------------------------------- batches of several dataloaders


class ConcatenatedLoaders(LinearRegression):
    """Two train dataloaders in a dict (a CombinedLoader); one forward on their concatenation, the mean loss."""

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        x = torch.cat([batch["a"][0], batch["b"][0]])
        y = torch.cat([batch["a"][1], batch["b"][1]])
        return super().training_step((x, y), batch_idx)


class SeparateForwards(LinearRegression):
    """The same two dataloaders, one forward each, the loss the mean over both batches' examples."""

    def training_step(self, batch: dict[str, tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        total = sum(len(y) for _, y in batch.values())
        return sum(0.5 * (self.linear(x).squeeze(-1) - y).square().sum() for x, y in batch.values()) / total


def two_loaders() -> tuple[dict[str, Any], Any]:
    """Batches of 8 and 4 examples, and a loader of their concatenations (12 per batch, the same order)."""
    xa, ya = PROBLEM.sample(64, seed=33)
    xb, yb = PROBLEM.sample(32, seed=34)
    x = torch.cat([torch.cat([xa[8 * i : 8 * i + 8], xb[4 * i : 4 * i + 4]]) for i in range(8)])
    y = torch.cat([torch.cat([ya[8 * i : 8 * i + 8], yb[4 * i : 4 * i + 4]]) for i in range(8)])
    return {"a": loader(xa, ya, 8), "b": loader(xb, yb, 4)}, loader(x, y, 12)


def total(batch: dict[str, tuple[Tensor, Tensor]]) -> int:
    return sum(len(y) for _, y in batch.values())


def test_batch_of_two_dataloaders_is_refused_once_naming_batch_size_fn() -> None:
    combined, _ = two_loaders()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"disagree on the leading dimension") as info:
            make_trainer([GradientNoiseScale(beta=0.9)]).fit(ConcatenatedLoaders(PROBLEM), combined)
    message = str(info.value)
    assert "batch['a'][0]: 8" in message and "batch['b'][0]: 4" in message
    assert "batch_size_fn returning the micro-batch's total" in message and "1-D integer tensor" in message
    assert not [w for w in caught if "GradientNoiseScale" in str(w.message)]  # the error is the one message


def test_two_dataloaders_of_one_batch_size_are_said_to_be_counted_once() -> None:
    """Batches of 8 from each of two loaders share their leading dimension: the default count takes 8 where the
    loss averages 16 (a probe's B_simple read half the truth, silently). Said at the start; a batch_size_fn
    silences it."""
    xa, ya = PROBLEM.sample(64, seed=33)
    xb, yb = PROBLEM.sample(64, seed=34)

    def said(batch_size_fn: Any) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer([GradientNoiseScale(beta=0.9, batch_size_fn=batch_size_fn)], accumulate_grad_batches=2).fit(
                ConcatenatedLoaders(PROBLEM), {"a": loader(xa, ya, 8), "b": loader(xb, yb, 8)}
            )
        return [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)]

    default = [m for m in said(None) if "dataloaders at a time" in m]
    assert len(default) == 1 and "each of 2 dataloaders" in default[0] and "pass batch_size_fn" in default[0]
    assert not [m for m in said(total) if "dataloaders at a time" in m]


@pytest.mark.parametrize(
    "batch_size_fn",
    [total, lambda batch: torch.ones(total(batch), dtype=torch.long)],
    ids=["total", "per-example-counts"],
)
def test_batch_size_fn_measures_a_batch_of_two_dataloaders(batch_size_fn: Any) -> None:
    """Counted by the user, the combined batch measures what the same examples in one dataloader measure."""
    combined, concatenated = two_loaders()
    results = []
    for model, data, fn in (
        (ConcatenatedLoaders(PROBLEM), combined, batch_size_fn),
        (LinearRegression(PROBLEM), concatenated, None),
    ):
        gns = GradientNoiseScale(beta=0.9, mode="per_example", batch_size_fn=fn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer([gns]).fit(model, data)
        assert not [w for w in caught if "GradientNoiseScale" in str(w.message)]
        results.append(gns.compute())
    got, want = results
    assert got.keys() == want.keys() and got["gns/b_big"] == 12.0 and got["gns/skipped_steps"] == 0.0
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name


def test_unmeasurable_combined_batch_says_so_once_and_reads_no_nonsense(tmp_path: Path) -> None:
    """Separate forwards per dataloader cannot be split per example: one message, no b_small = inf, every step."""
    combined, _ = two_loaders()
    gns = GradientNoiseScale(beta=0.9, mode="per_example", batch_size_fn=total)
    trainer = make_trainer([gns], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(SeparateForwards(PROBLEM), combined)
    nothing = [w for w in caught if "no optimizer step could be measured" in str(w.message)]
    assert len(nothing) == 1
    readouts = gns.compute()
    assert gns.skipped_steps == 8 and all(
        math.isnan(readouts[name]) for name in ("gns/b_simple", "gns/b_small", "gns/b_big", "gns/steps_over_min")
    )


# ---------------------------------------------------------------- fits in spawned or forked processes


def _leave(result: SpawnedResult, payload: dict[str, Any]) -> None:
    assert result.in_child
    assert result.write(payload)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("start_method", ["fork", "spawn"])  # ddp_notebook forks, ddp_spawn spawns
def test_a_child_process_leaves_its_readouts_for_the_parent(start_method: str) -> None:
    result = SpawnedResult()
    assert not result.in_child and result.read() is None
    payload = {"gns/b_simple": 3.25, "gns/b_small": math.nan, "gns/steps_over_min": math.inf, "mode": "ddp"}
    child = torch.multiprocessing.get_context(start_method).Process(target=_leave, args=(result, payload))
    child.start()
    child.join(timeout=600)
    assert child.exitcode == 0
    got = result.read()
    assert got is not None and got.keys() == payload.keys()
    assert got["gns/b_simple"] == 3.25 and math.isnan(got["gns/b_small"]) and got["gns/steps_over_min"] == math.inf
    assert result.read() is None  # taken once
    assert not SpawnedResult(size=64).write({"too": "x" * 100})


# ---------------------------------------------------------------- before the first measured step


class LoggedLossRegression(LinearRegression):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss)
        return loss


def test_before_the_first_measured_step_what_the_readme_says_is_nan() -> None:
    """README, "Logged scalars": NaN until a step is measured, except the counts, coverage, Kaplan and adaptive ones.

    One example per step in per_example mode is one small batch: no step can be measured.
    """
    gns = GradientNoiseScale(mode="per_example", kaplan_loss="loss")
    logger = MemoryLogger()
    make_trainer([gns, AdaptiveBatchSize(warmup_steps=100)], logger=logger, log_every_n_steps=1, max_steps=3).fit(
        LoggedLossRegression(PROBLEM), loader(*PROBLEM.sample(8, seed=0), batch_size=1)
    )
    assert len(logger.logged) == 3
    for _, row in logger.logged:
        logged = {name: value for name, value in row.items() if name.startswith("gns/")}
        nan = {name for name, value in logged.items() if math.isnan(value)}
        assert nan == {
            "gns/b_simple",
            "gns/b_simple_low",
            "gns/b_simple_high",
            "gns/grad_sq_norm",
            "gns/trace_cov",
            "gns/b_small",
            "gns/b_big",
            "gns/steps_over_min",
            "gns/examples_over_min",
            "gns/statistical_efficiency",
        }
        assert set(logged) - nan == {
            "gns/skipped_steps",
            "gns/covered_fraction",
            "gns/kaplan_b_crit_tokens",
            "gns/effective_batch_size",
            "gns/accumulation",
            "gns/lr_factor",
        }
    assert gns.skipped_steps == 3 and gns.covered_fraction == 1.0


class SampleListRegression(LinearRegression):
    """The linear regression fed uncollated batches: a list of (x_i, y_i) samples (DataLoader(collate_fn=list))."""

    def training_step(self, batch: list[tuple[Tensor, Tensor]], batch_idx: int) -> Tensor:
        x, y = (torch.stack(column) for column in zip(*batch, strict=True))
        return super().training_step((x, y), batch_idx)


def test_a_list_of_samples_is_refused_unless_batch_size_fn_counts_them() -> None:
    """Each sample's x leads with its 5 features: counted as the batch size, every estimate would be in the wrong
    unit (tr(Sigma) 16/5 too small here). Refused, naming batch_size_fn=len, which then gives the collated run's
    numbers."""
    x, y = PROBLEM.sample(16 * 2 * 6, seed=35)
    samples = DataLoader(list(zip(x, y, strict=True)), batch_size=16, collate_fn=list)
    with pytest.raises(ValueError, match=r"list of 16 items of one structure.*batch_size_fn=len"):
        make_trainer([GradientNoiseScale(beta=0.9)], accumulate_grad_batches=2).fit(
            SampleListRegression(PROBLEM), samples
        )
    readouts = []
    for model, data, fn in (
        (SampleListRegression(PROBLEM), samples, len),
        (LinearRegression(PROBLEM), loader(x, y, 16), None),
    ):
        gns = GradientNoiseScale(beta=0.9, batch_size_fn=fn)
        make_trainer([gns], accumulate_grad_batches=2).fit(model, data)
        readouts.append((gns.b_simple, gns.trace_cov, float(gns.metric.last_b_big)))
    assert readouts[0] == pytest.approx(readouts[1], rel=1e-9) and readouts[1][2] == 32.0
