"""Readouts after every kind of fit: steps without a backward, batches whose examples must be counted by the user."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
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
from lightning_gns.batch_size import leading_dim_batch_size
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


def two_loaders(second_batch: int = 4) -> tuple[dict[str, Any], Any]:
    """Batches of 8 and ``second_batch`` examples, and a loader of their concatenations (the same order)."""
    xa, ya = PROBLEM.sample(64, seed=33)
    xb, yb = PROBLEM.sample(8 * second_batch, seed=34)
    n = second_batch
    x = torch.cat([torch.cat([xa[8 * i : 8 * i + 8], xb[n * i : n * i + n]]) for i in range(8)])
    y = torch.cat([torch.cat([ya[8 * i : 8 * i + 8], yb[n * i : n * i + n]]) for i in range(8)])
    return {"a": loader(xa, ya, 8), "b": loader(xb, yb, n)}, loader(x, y, 8 + n)


def total(batch: dict[str, tuple[Tensor, Tensor]]) -> int:
    return sum(len(y) for _, y in batch.values())


@pytest.mark.parametrize("second_batch", [4, 8], ids=["sizes-8-4", "sizes-8-8"])
def test_two_dataloaders_are_refused_at_the_start_naming_batch_size_fn(second_batch: int) -> None:
    """Batches of 8 from each of two loaders share their leading dimension: the default count took 8 where the
    loss averages 16 (a probe's B_simple read half the truth), and a short last batch of one loader stopped the
    fit mid-epoch (as batches of 8 and 4 did at the first step). Refused before the first step, with the one
    message; a batch_size_fn measures it."""
    xa, ya = PROBLEM.sample(60, seed=33)  # 7 full batches and a short one of 4
    xb, yb = PROBLEM.sample(8 * second_batch, seed=34)
    loaders = {"a": loader(xa, ya, 8), "b": loader(xb, yb, second_batch)}
    steps = Steps()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"each of 2 dataloaders at a time.*Pass batch_size_fn") as info:
            make_trainer([GradientNoiseScale(beta=0.9), steps], accumulate_grad_batches=2).fit(
                ConcatenatedLoaders(PROBLEM), loaders
            )
    assert not [w for w in caught if "GradientNoiseScale" in str(w.message)]
    assert "1-D integer tensor" in str(info.value) and steps.batches == 0
    gns = GradientNoiseScale(beta=0.9, batch_size_fn=total)
    make_trainer([gns], accumulate_grad_batches=2).fit(ConcatenatedLoaders(PROBLEM), loaders)
    assert gns.skipped_steps == 0 and int(gns.metric.measured_steps) == 4


class Steps(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.batches += 1


@pytest.mark.parametrize("second_batch", [4, 8], ids=["sizes-8-4", "sizes-8-8"])
@pytest.mark.parametrize(
    "batch_size_fn",
    [total, lambda batch: torch.ones(total(batch), dtype=torch.long)],
    ids=["total", "per-example-counts"],
)
def test_batch_size_fn_measures_a_batch_of_two_dataloaders(batch_size_fn: Any, second_batch: int) -> None:
    """Counted by the user, the combined batch measures what the same examples in one dataloader measure. With
    loaders of one batch size, per_example once took their shared leading dimension (8) for the rows the model
    sees (16) and left every layer out: 0% covered, every step skipped."""
    combined, concatenated = two_loaders(second_batch)
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
    assert got.keys() == want.keys() and got["gns/b_big"] == 8 + second_batch and got["gns/skipped_steps"] == 0.0
    assert got["gns/covered_fraction"] == 1.0
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


class SequenceListRegression(LinearRegression):
    """Each sample one tensor: the features, then the target (DataLoader(collate_fn=list) over them)."""

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        rows = torch.stack(batch)
        return super().training_step((rows[:, :-1].contiguous(), rows[:, -1]), batch_idx)  # the collated layout


@pytest.mark.parametrize("batch_size", [3, 4, 5])
def test_a_list_of_single_tensor_samples_is_refused_unless_batch_size_fn_counts_them(batch_size: int) -> None:
    """A list of ``batch_size`` samples of shape (6,) was counted as 6 examples, silently (a probe: tr(Sigma) 1.75x
    too large at 4). The dataloader's batch size tells samples from fields; batch_size_fn=len then measures what
    the collated loader does."""
    x, y = PROBLEM.sample(batch_size * 2 * 4, seed=36)
    rows = list(torch.cat([x, y.unsqueeze(1)], dim=1))
    samples = DataLoader(rows, batch_size=batch_size, collate_fn=list)
    refused = rf"list of {batch_size} items of one structure.*lead with \[6\].*batch_size_fn=len"
    with pytest.raises(ValueError, match=refused):
        make_trainer([GradientNoiseScale(beta=0.9)], accumulate_grad_batches=2).fit(
            SequenceListRegression(PROBLEM), samples
        )
    readouts = []
    for model, data, fn in (
        (SequenceListRegression(PROBLEM), samples, len),
        (LinearRegression(PROBLEM), loader(x, y, batch_size), None),
    ):
        gns = GradientNoiseScale(beta=0.9, batch_size_fn=fn)
        make_trainer([gns], accumulate_grad_batches=2).fit(model, data)
        readouts.append((gns.b_simple, gns.trace_cov, float(gns.metric.last_b_big)))
    assert readouts[0] == pytest.approx(readouts[1], rel=1e-9) and readouts[1][2] == 2 * batch_size


def test_uncollated_samples_of_an_iterable_dataset_are_said() -> None:
    """An iterable dataset has no first sample to compare the batch's items with: a list of 4 tensors of shape (6,),
    as many as the batch size, is counted as 6 examples, and said (refusing could stop a packed collate's rows)."""
    x, y = PROBLEM.sample(4 * 2 * 3, seed=43)
    rows = torch.cat([x, y.unsqueeze(1)], dim=1)

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self) -> Any:
            return iter(list(rows))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([GradientNoiseScale(beta=0.9)], accumulate_grad_batches=2).fit(
            SequenceListRegression(PROBLEM), DataLoader(Rows(), batch_size=4, collate_fn=list)
        )
    said = [str(w.message) for w in caught if "laid out alike" in str(w.message)]
    assert len(said) == 1 and "counts 6 examples" in said[0] and "batch_size_fn=len" in said[0]


def test_a_list_of_two_or_three_samples_is_refused_too() -> None:
    """Lists of 4+ samples were refused by their shape alone; 2 or 3 (x, y) samples were taken for a batch's fields
    and counted as x's 5 features. The dataloader's batch size tells them apart."""
    x, y = PROBLEM.sample(3 * 2 * 4, seed=37)
    samples = DataLoader(list(zip(x, y, strict=True)), batch_size=3, collate_fn=list)
    with pytest.raises(ValueError, match=r"list of 3 items of one structure.*batch_size_fn=len"):
        make_trainer([GradientNoiseScale(beta=0.9)], accumulate_grad_batches=2).fit(
            SampleListRegression(PROBLEM), samples
        )


def test_fields_of_one_shape_in_a_short_last_batch_are_not_taken_for_samples() -> None:
    """(x, target) of one shape, 2 per batch, 5 examples: the last batch (1 example) is a list of two (1, 5)
    tensors, as long as a batch of samples would be. Only the fit's first (full) batch is judged."""

    class Autoencoder(LinearRegression):
        def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
            x, target = batch
            return super().training_step((x, target[:, 0]), batch_idx)

    x, _ = PROBLEM.sample(5, seed=38)
    data = DataLoader(torch.utils.data.TensorDataset(x, x.clone()), batch_size=2)
    gns = GradientNoiseScale(beta=0.9)
    make_trainer([gns], accumulate_grad_batches=1, max_epochs=2).fit(Autoencoder(PROBLEM), data)
    assert int(gns.metric.measured_steps) + gns.skipped_steps == 6


class SkipsEmptyBatches(LinearRegression):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        return None if len(batch[1]) == 0 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("mode, accumulation", [("microbatch", 2), ("per_example", 1)])
def test_an_empty_micro_batch_counted_as_zero_is_no_crash(mode: str, accumulation: int) -> None:
    """A collate that filters bad samples can leave a micro-batch empty, and training_step returns None for it. Its
    count of 0 stopped the fit with an error, while a 0-d tensor count of 0 went through: both now measure alike."""
    x, y = PROBLEM.sample(24, seed=39)

    def drop_samples_8_to_11(items: list[tuple[int, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        kept = [(xi, yi) for i, xi, yi in items if not 8 <= i < 12]
        if not kept:
            return torch.zeros(0, PROBLEM.dim), torch.zeros(0)
        return torch.stack([xi for xi, _ in kept]), torch.stack([yi for _, yi in kept])

    data = DataLoader(list(zip(range(24), x, y, strict=True)), batch_size=4, collate_fn=drop_samples_8_to_11)
    readouts = []
    for fn in (None, lambda batch: torch.tensor(len(batch[1]))):
        gns = GradientNoiseScale(beta=0.9, mode=mode, batch_size_fn=fn)  # type: ignore[arg-type]
        make_trainer([gns], accumulate_grad_batches=accumulation).fit(SkipsEmptyBatches(PROBLEM), data)
        readouts.append(gns.compute())
    assert readouts[0] == readouts[1] and readouts[0]["gns/skipped_steps"] <= 1


def test_the_default_count_reads_packed_sequences_and_survives_cycles() -> None:
    """A PackedSequence counts its sequences (its data leads with their total length: it was refused as two
    dataloaders); a batch object that refers to itself, or holds a module, is walked once and not into the module."""
    packed = nn.utils.rnn.pack_sequence([torch.zeros(5, 3), torch.zeros(4, 3), torch.zeros(2, 3)])
    assert leading_dim_batch_size(packed) == 3 and leading_dim_batch_size((packed, torch.zeros(3))) == 3
    with pytest.raises(ValueError, match=r"disagree on the leading dimension \(batch\[0\]: 3, batch\[1\]: 4"):
        leading_dim_batch_size((packed, torch.zeros(4)))

    class Batch:
        def __init__(self) -> None:
            self.x = torch.zeros(6, 2)
            self.itself = self
            self.encoder = nn.Linear(3, 4)  # its weight leads with 4

    assert leading_dim_batch_size(Batch()) == 6

    class Columns(Mapping):  # builds a new tuple at each access: ids of freed ones are reused
        def __init__(self, store: dict[str, list[Tensor]]) -> None:
            self.store = store

        def __getitem__(self, key: str) -> tuple[Tensor, ...]:
            return tuple(self.store[key])

        def __iter__(self) -> Any:
            return iter(self.store)

        def __len__(self) -> int:
            return len(self.store)

    columns = Columns({k: [torch.zeros(n, 2), torch.zeros(n)] for k, n in (("a", 8), ("b", 8), ("c", 5), ("d", 8))})
    with pytest.raises(ValueError, match=r"disagree on the leading dimension"):
        leading_dim_batch_size(columns)  # every column is walked: "c" holds 5


def test_a_collate_that_packs_rows_is_no_list_of_samples() -> None:
    """(inputs, targets) of R rows each from 2 samples a batch (a collate that packs documents into rows): as long
    as the loader's batch size, but not laid out as a sample, so counted as R rows, as before."""
    x, y = PROBLEM.sample(2 * 3 * 4, seed=41)
    documents = [(x[3 * i : 3 * i + 3], y[3 * i : 3 * i + 3]) for i in range(8)]  # a sample: 3 rows

    def pack(samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        return torch.cat([d for d, _ in samples]), torch.cat([t for _, t in samples])

    data = DataLoader(documents, batch_size=2, collate_fn=pack)
    readouts = []
    for loader_ in (data, loader(x, y, 6)):
        gns = GradientNoiseScale(beta=0.9)
        make_trainer([gns], accumulate_grad_batches=2).fit(LinearRegression(PROBLEM), loader_)
        readouts.append((gns.b_simple, gns.trace_cov, float(gns.metric.last_b_big)))
    assert readouts[0] == pytest.approx(readouts[1], rel=1e-9) and readouts[0][2] == 12.0


def test_a_second_fit_at_a_lower_accumulation_measures() -> None:
    """A first fit at accumulation 2 measures in microbatch mode; a second fit of the same Trainer at 1 kept that
    mode for a while (skipping every step, B_simple frozen): auto chooses again, per_example."""
    x, y = PROBLEM.sample(8 * 8, seed=42)
    gns = GradientNoiseScale(beta=0.9)
    trainer = make_trainer([gns], accumulate_grad_batches=2, max_epochs=1)
    trainer.fit(LinearRegression(PROBLEM), loader(x, y, 8))
    assert gns.mode == "microbatch" and int(gns.metric.measured_steps) == 4
    trainer.accumulate_grad_batches = 1
    trainer.fit_loop.max_epochs = 2
    trainer.fit(trainer.lightning_module, loader(x, y, 8))
    assert gns.mode == "per_example" and int(gns.metric.measured_steps) == 12 and gns.skipped_steps == 0


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
