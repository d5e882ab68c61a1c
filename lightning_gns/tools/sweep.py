"""Batch-size sweeps and branched training with Lightning: measure the critical batch size, next to B_simple.

The fitting and the bookkeeping live in ``lightning_gns.tools.critical_batch`` (no Lightning there); this module
is the Lightning glue: it builds a user's model and data from factories, trains until a target loss, and
records the optimizer steps, the examples and the run-averaged ``B_simple`` of the ``GradientNoiseScale``
callback.

The contract with the user's code:

- ``model_factory(lr=...) -> LightningModule``: a fresh model whose optimizer uses that learning rate.
- ``datamodule_factory(batch_size=..., seed=...) -> LightningDataModule``: training batches of exactly
  ``batch_size`` examples (``drop_last=True``), shuffled by ``seed``, and a ``val_dataloader`` whose loss the
  model logs under ``monitor`` (e.g. ``self.log("val/loss", loss)`` in ``validation_step``).

Example (the digits example of this repository)::

    from lightning_gns.tools.sweep import format_sweep_table, load_factory, run_sweep
    model = load_factory("example_projects/digits_sweep.py:model")
    data = load_factory("example_projects/digits_sweep.py:datamodule")
    result = run_sweep(model, data, batch_sizes=[16, 64, 256], target_loss=0.3, seeds=[0, 1, 2],
                       base_lr=0.05, base_batch_size=32, lr_rule="sqrt")
    print(format_sweep_table(result))
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from torch.optim import Optimizer

from lightning_gns.batch_schedule import FIXED_LR_SCALINGS, FixedLrScaling, critical_batch_bound, lr_factor
from lightning_gns.callbacks import GradientNoiseScale
from lightning_gns.tools.critical_batch import (
    BootstrapResult,
    CriticalBatchError,
    bootstrap_fit,
    local_critical_batch,
    steps_to_target,
)

ModelFactory = Callable[..., LightningModule]
DataFactory = Callable[..., LightningDataModule]


def load_factory(spec: str) -> Callable[..., Any]:
    """Import ``"package.module:name"`` or ``"path/to/file.py:name"`` and return the attribute ``name``.

    >>> load_factory("math:sqrt")(16.0)
    4.0
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CriticalBatchError(f"Expected MODULE:NAME or FILE.py:NAME, got {spec!r}.")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name).resolve()
        if not path.is_file():
            raise CriticalBatchError(f"No such file: {module_name!r} (from {spec!r}).")
        name = f"_lightning_gns_user_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise CriticalBatchError(f"Cannot import {module_name!r}.")
        module = importlib.util.module_from_spec(module_spec)
        # Registered before executing: dataclasses and pickling look the module up by name.
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            raise CriticalBatchError(
                f"Cannot import {module_name!r} (from {spec!r}): {error}. Name the file instead"
                f" ({module_name.replace('.', '/')}.py:{attr}), or add its folder to PYTHONPATH."
            ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise CriticalBatchError(f"{module_name!r} has no attribute {attr!r}.") from None


@dataclass
class SweepRun:
    """One training run of a sweep. ``steps`` is ``nan`` when the target loss was not reached."""

    batch_size: int
    seed: int
    lr: float
    steps: float
    examples: float
    b_simple_mean: float
    b_simple_at_target: float
    final_loss: float
    optimizer_steps_run: int
    wall_s: float
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        return math.isfinite(self.steps)


@dataclass
class SweepResult:
    """All runs (every learning rate tried) and the trade-off fit on the fastest learning rate per batch size."""

    target_loss: float
    monitor: str
    runs: list[SweepRun]
    chosen_lr: dict[int, float]
    bootstrap: BootstrapResult | None
    fit_error: str | None = None

    def selected_runs(self) -> list[SweepRun]:
        """Runs at each batch size's chosen learning rate: the ones the fit uses."""
        return [r for r in self.runs if self.chosen_lr.get(r.batch_size) == r.lr]

    def b_simple_median(self, at_target: bool = False) -> float:
        """Median over the selected runs that reached the target of the run-averaged B_simple (``at_target``: of
        B_simple at the step the run reached the target)."""
        values = [r.b_simple_at_target if at_target else r.b_simple_mean for r in self.selected_runs() if r.reached]
        values = [v for v in values if math.isfinite(v)]
        return float(np.median(values)) if values else math.nan


class _TargetRecorder(Callback):
    """Records the monitored loss at each validation and B_simple after each step; stops at the target."""

    def __init__(self, gns: GradientNoiseScale, monitor: str, target: float, patience: int) -> None:
        self.gns = gns
        self.monitor = monitor
        self.target = target
        self.patience = patience
        self.eval_steps: list[int] = []
        self.eval_losses: list[float] = []
        self._b_simple: list[torch.Tensor] = []

    @property
    def b_simple(self) -> list[float]:
        """B_simple after each optimizer step so far (one host transfer for the whole list)."""
        return torch.stack(self._b_simple).tolist() if self._b_simple else []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # Kept on the device (no host sync per step); the values before the target make the average.
        self._b_simple.append(self.gns.metric.b_simple.detach().clone())

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise CriticalBatchError(
                f"The model logged no {self.monitor!r} during validation; logged: {sorted(trainer.callback_metrics)}."
                " Pass the name of the validation loss as monitor."
            )
        loss = float(value)
        self.eval_steps.append(trainer.global_step)
        self.eval_losses.append(loss)
        if loss <= self.target:
            trainer.should_stop = True
        # A diverged or stuck run (too high a learning rate) would otherwise burn the whole example budget.
        best = int(np.nanargmin(self.eval_losses)) if np.isfinite(self.eval_losses).any() else -1
        if not math.isfinite(loss) or len(self.eval_losses) - 1 - best >= self.patience:
            trainer.should_stop = True


@contextmanager
def _few_workers_is_fine() -> Iterator[None]:
    """Lightning's advice to add dataloader workers, which small in-memory data sets do not need."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        yield


def _quiet_trainer(**kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    defaults.update(kwargs)
    return Trainer(**defaults)


def train_to_target(
    model_factory: ModelFactory,
    datamodule_factory: DataFactory,
    batch_size: int,
    lr: float,
    seed: int,
    target_loss: float,
    monitor: str = "val/loss",
    max_examples: int = 200_000,
    eval_every_examples: int = 256,
    beta: float = 0.95,
    patience: int = 30,
    trainer_kwargs: dict[str, Any] | None = None,
) -> SweepRun:
    """Train one run at a constant batch size until the monitored loss first reaches ``target_loss``.

    The loss is evaluated every ``eval_every_examples`` training examples (rounded to whole steps), so runs at
    every batch size are measured at the same resolution in examples; the crossing step is interpolated
    between evaluations (``steps_to_target``). ``b_simple_mean`` averages the callback's B_simple over the
    steps up to the target (the paper's run-averaged noise scale); the first step, before the averages hold
    anything, is left out. A run whose loss is not finite, or has not improved for ``patience`` evaluations,
    stops early and counts as not reaching the target.
    """
    seed_everything(seed, workers=True, verbose=False)
    datamodule = datamodule_factory(batch_size=batch_size, seed=seed)
    model = model_factory(lr=lr)
    gns = GradientNoiseScale(beta=beta)
    recorder = _TargetRecorder(gns, monitor, target_loss, patience)
    eval_every = max(1, round(eval_every_examples / batch_size))
    max_steps = max(1, math.ceil(max_examples / batch_size))
    trainer = _quiet_trainer(
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=eval_every,
        check_val_every_n_epoch=None,
        callbacks=[gns, recorder],
        **(trainer_kwargs or {}),
    )
    start = time.perf_counter()
    with _few_workers_is_fine():
        trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    steps = steps_to_target(recorder.eval_steps, recorder.eval_losses, target_loss)
    b_simple = recorder.b_simple
    upto = len(b_simple) if not math.isfinite(steps) else min(len(b_simple), math.ceil(steps))
    window = [v for v in b_simple[1:upto] if math.isfinite(v)]
    return SweepRun(
        batch_size=batch_size,
        seed=seed,
        lr=lr,
        steps=steps,
        examples=steps * batch_size,
        b_simple_mean=float(np.mean(window)) if window else math.nan,
        b_simple_at_target=b_simple[upto - 1] if upto > 0 else math.nan,
        final_loss=recorder.eval_losses[-1] if recorder.eval_losses else math.nan,
        optimizer_steps_run=trainer.global_step,
        wall_s=wall,
        eval_steps=recorder.eval_steps,
        eval_losses=recorder.eval_losses,
    )


def run_sweep(
    model_factory: ModelFactory,
    datamodule_factory: DataFactory,
    batch_sizes: Sequence[int],
    target_loss: float,
    seeds: Sequence[int] = (0, 1, 2),
    base_lr: float = 0.05,
    base_batch_size: int = 32,
    lr_rule: str = "linear",
    lr_grid: Sequence[float] = (1.0,),
    monitor: str = "val/loss",
    max_examples: int = 200_000,
    eval_every_examples: int = 256,
    beta: float = 0.95,
    patience: int = 30,
    num_resamples: int = 2000,
    trainer_kwargs: dict[str, Any] | None = None,
    progress: Callable[[SweepRun], None] | None = None,
) -> SweepResult:
    """Train every (batch size, learning rate, seed), pick the fastest learning rate per batch size, fit.

    Each batch size's learning rate is ``base_lr * lr_factor(lr_rule, B / base_batch_size)`` times each factor of
    ``lr_grid``; with more than one factor, the one with the fewest median steps to the target (runs that
    miss it count as infinite) is kept, and only its runs enter the fit. The fit is ``bootstrap_fit``; when
    it cannot be made (fewer than two batch sizes reached the target) ``fit_error`` says why.
    """
    if not batch_sizes or not seeds or not lr_grid:
        raise CriticalBatchError("batch_sizes, seeds and lr_grid must be non-empty.")
    if any(int(b) < 2 for b in batch_sizes):
        raise CriticalBatchError(f"Batch sizes must be at least 2 (B_simple needs two examples), got {batch_sizes}.")
    runs: list[SweepRun] = []
    chosen: dict[int, float] = {}
    for batch_size in sorted({int(b) for b in batch_sizes}):
        base = base_lr * _lr_factor(batch_size / base_batch_size, lr_rule)
        best: tuple[float, float] | None = None
        for factor in lr_grid:
            lr = base * factor
            group = []
            for seed in seeds:
                run = train_to_target(
                    model_factory,
                    datamodule_factory,
                    batch_size,
                    lr,
                    int(seed),
                    target_loss,
                    monitor=monitor,
                    max_examples=max_examples,
                    eval_every_examples=eval_every_examples,
                    beta=beta,
                    patience=patience,
                    trainer_kwargs=trainer_kwargs,
                )
                group.append(run)
                if progress is not None:
                    progress(run)
            runs.extend(group)
            median = float(np.median([r.steps if r.reached else math.inf for r in group]))
            if best is None or median < best[0]:
                best = (median, lr)
        assert best is not None
        chosen[batch_size] = best[1]
    result = SweepResult(target_loss, monitor, runs, chosen, None)
    selected = [r for r in result.selected_runs() if r.reached]
    try:
        result.bootstrap = bootstrap_fit(
            [r.batch_size for r in selected], [r.steps for r in selected], num_resamples=num_resamples
        )
    except CriticalBatchError as error:
        missed = sorted({r.batch_size for r in result.selected_runs()} - {r.batch_size for r in selected})
        note = f"runs at batch sizes {missed} never reached the target loss; " if missed else ""
        result.fit_error = note + str(error)
    return result


def format_sweep_table(result: SweepResult) -> str:
    """A Markdown table per batch size (mean ± std over seeds) and the fit underneath."""
    lines = [
        f"target {result.monitor} <= {result.target_loss:g}",
        "",
        "| batch size | lr | runs reached | steps S | examples E | fitted S | run-avg B_simple"
        " | B_simple at the target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fit = result.bootstrap.fit if result.bootstrap else None
    for batch_size, lr in sorted(result.chosen_lr.items()):
        group = [r for r in result.runs if r.batch_size == batch_size and r.lr == lr]
        reached = [r for r in group if r.reached]
        steps = np.array([r.steps for r in reached])
        gns = np.array([r.b_simple_mean for r in reached if math.isfinite(r.b_simple_mean)])
        at_target = np.array([r.b_simple_at_target for r in reached if math.isfinite(r.b_simple_at_target)])
        fitted = f"{float(fit.steps(batch_size)):.1f}" if fit else "-"
        lines.append(
            f"| {batch_size} | {lr:.4g} | {len(reached)}/{len(group)} | {_mean_std(steps)} |"
            f" {_mean_std(steps * batch_size)} | {fitted} | {_mean_std(gns)} | {_mean_std(at_target)} |"
        )
    lines.append("")
    if result.bootstrap is None:
        lines.append(f"No fit: {result.fit_error}")
        return "\n".join(lines)
    boot = result.bootstrap
    pct = round(100 * boot.confidence)
    lines += [
        f"S_min  = {fit.s_min:.1f} steps   ({pct}% bootstrap over seeds: {_interval(boot.s_min_interval)})",  # type: ignore[union-attr]
        f"E_min  = {fit.e_min:.0f} examples   ({_interval(boot.e_min_interval)})",  # type: ignore[union-attr]
        f"B_crit = E_min / S_min = {fit.b_crit:.1f}   ({_interval(boot.b_crit_interval)})",  # type: ignore[union-attr]
        f"B_simple (median of the run averages) = {result.b_simple_median():.1f};"
        f"  median of B_simple when the target is reached = {result.b_simple_median(at_target=True):.1f}",
        f"relative rms residual of the fit = {fit.rel_rms:.3f}",  # type: ignore[union-attr]
    ]
    swept = sorted({r.batch_size for r in result.selected_runs() if r.reached})
    b_crit = fit.b_crit  # type: ignore[union-attr]
    if swept and b_crit > swept[-1]:
        lines.append(
            f"B_crit lies above the largest batch size that reached the target ({swept[-1]}): an extrapolation"
            " (inf: the steps showed no floor). Sweep larger batch sizes to measure it."
        )
    elif swept and b_crit < swept[0]:
        lines.append(
            f"B_crit lies below the smallest batch size that reached the target ({swept[0]}): an extrapolation."
            " Sweep smaller batch sizes to measure it."
        )
    lines += _sweep_notes(result)
    early = sorted(
        {r.batch_size for r in result.selected_runs() if r.reached and r.eval_steps and r.steps <= r.eval_steps[0]}
    )
    if early:
        lines.append(
            f"Runs at batch sizes {early} reached the target at their first evaluation: their steps are an upper bound"
            " (nothing to interpolate from). Evaluate more often (--eval-every-examples) or choose a lower target."
        )
    return "\n".join(lines)


def _sweep_notes(result: SweepResult) -> list[str]:
    """What the fit leaves out or cannot see: batch sizes or runs that missed the target, a learning rate chosen at
    the edge of the grid."""
    notes = []
    selected = result.selected_runs()
    sizes = sorted(result.chosen_lr)
    dropped = [b for b in sizes if not any(r.reached for r in selected if r.batch_size == b)]
    partial = [b for b in sizes if b not in dropped and not all(r.reached for r in selected if r.batch_size == b)]
    if dropped:
        notes.append(f"Batch sizes {dropped} never reached the target in any run: left out of the fit.")
    if partial:
        notes.append(
            f"At batch sizes {partial} some runs missed the target: the fit takes the runs that reached it, which"
            " reads those batch sizes as faster than they are. Raise the budget (--max-examples)."
        )
    edge = []
    for b in sizes:
        tried = sorted({r.lr for r in result.runs if r.batch_size == b})
        if len(tried) >= 2 and result.chosen_lr[b] in (tried[0], tried[-1]):
            edge.append(b)
    if edge:
        notes.append(
            f"At batch sizes {edge} the fastest learning rate is at the edge of the grid: a better one may lie"
            " outside it, and those runs read slower than they could. Widen --lr-grid."
        )
    return notes


def _mean_std(values: np.ndarray) -> str:
    if values.size == 0:
        return "-"
    if values.size == 1:
        return f"{float(values[0]):.1f}"
    return f"{float(values.mean()):.1f} ± {float(values.std(ddof=1)):.1f}"


def _interval(interval: tuple[float, float]) -> str:
    if any(math.isnan(v) for v in interval):
        return "undefined: one run at some batch size, run 2 or more seeds"
    return f"{interval[0]:.1f} to {interval[1]:.1f}"


def plot_sweep(result: SweepResult, path: str | Path, dpi: int = 100) -> Path:
    """Steps against examples for every selected run and the fitted hyperbola (log axes), like the paper's figures;
    a second panel puts the run-averaged B_simple of each batch size beside B_crit."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    selected = result.selected_runs()
    sizes = sorted({r.batch_size for r in selected})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(sizes), 1)))
    for color, batch_size in zip(colors, sizes, strict=True):
        group = [r for r in selected if r.batch_size == batch_size and r.reached]
        ax.scatter([r.examples for r in group], [r.steps for r in group], color=color, label=f"B={batch_size}", s=20)
    if result.bootstrap is not None:
        fit = result.bootstrap.fit
        grid = np.geomspace(min(sizes) / 4, max(sizes) * 4, 200)
        ax.plot(fit.examples(grid), fit.steps(grid), "k-", lw=1, label="fit (S/S_min-1)(E/E_min-1)=1")
        ax.axhline(fit.s_min, color="grey", ls=":", lw=1)
        ax.axvline(fit.e_min, color="grey", ls=":", lw=1)
        if math.isfinite(fit.b_crit):
            ax.plot([fit.examples(fit.b_crit)], [fit.steps(fit.b_crit)], "r*", ms=10, label=f"B_crit={fit.b_crit:.0f}")
    ax.set(xscale="log", yscale="log", xlabel="examples E", ylabel="optimizer steps S")
    # Labelled minor ticks on a log axis spanning less than a decade overlap one another.
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title(f"to {result.monitor} <= {result.target_loss:g}", fontsize=10)
    ax.legend(fontsize=7)
    for color, batch_size in zip(colors, sizes, strict=True):
        values = [r.b_simple_mean for r in selected if r.batch_size == batch_size and r.reached]
        ax2.scatter([batch_size] * len(values), values, color=color, s=20)
    if result.bootstrap is not None and math.isfinite(result.bootstrap.fit.b_crit):
        lo, hi = result.bootstrap.b_crit_interval
        ax2.axhline(result.bootstrap.fit.b_crit, color="r", lw=1, label="B_crit (fit)")
        ax2.axhspan(lo, min(hi, 1e12), color="r", alpha=0.15, label="bootstrap interval")
    ax2.set(xscale="log", yscale="log", xlabel="batch size of the run", ylabel="run-averaged B_simple")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def sweep_records(result: SweepResult) -> list[dict[str, Any]]:
    """One flat dict per run (for CSV/JSON), with ``selected`` marking the runs the fit uses."""
    records = []
    for run in result.runs:
        record = asdict(run)
        record.pop("eval_steps")
        record.pop("eval_losses")
        record["selected"] = result.chosen_lr.get(run.batch_size) == run.lr
        records.append(record)
    return records


# ------------------------------------------------------------------------------------- branched training
@dataclass
class BranchPoint:
    """Branches from one checkpoint: loss per batch multiplier (mean over seeds) and the local critical batch."""

    step: int
    examples: int
    b_simple: float
    loss_at_branch: float
    multipliers: list[int]
    losses: list[float]
    loss_stds: list[float]
    local_critical_batch: float
    # "at most" (stopped at the smallest multiplier), "at least" (reached the largest), "" (a value between).
    bound: str = ""


class _Snapshots(Callback):
    """Copies model and optimizer state and B_simple at chosen optimizer steps."""

    def __init__(self, gns: GradientNoiseScale, at_steps: Sequence[int]) -> None:
        self.gns = gns
        self.at_steps = set(at_steps)
        self.saved: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step in self.at_steps and step not in self.saved:
            self.saved[step] = {
                "model": copy.deepcopy(pl_module.state_dict()),
                "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
                "b_simple": self.gns.b_simple,
            }


class BranchStart(Callback):
    """Loads a branch's optimizer state at the start of its fit and scales the learning rate of every group.

    The optimizer is built by the model's ``configure_optimizers`` at the base learning rate; loading the
    saved state would restore the saved rate too, so the factor is applied afterwards.
    """

    def __init__(self, optimizer_state: dict[str, Any], lr_factor: float) -> None:
        self.optimizer_state = optimizer_state
        self.lr_factor = lr_factor

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizer: Optimizer = trainer.optimizers[0]
        optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.lr_factor


def _lr_factor(multiplier: float, rule: str) -> float:
    """A fixed learning-rate rule of the adaptive batch (``FIXED_LR_SCALINGS``), as a sweep's usage error."""
    if rule not in FIXED_LR_SCALINGS:
        choices = ", ".join(repr(r) for r in FIXED_LR_SCALINGS)
        raise CriticalBatchError(f"Unknown learning-rate rule {rule!r}: use one of {choices}.")
    return lr_factor(cast(FixedLrScaling, rule), multiplier)


def branched_critical_batch(
    model_factory: ModelFactory,
    datamodule_factory: DataFactory,
    batch_size: int,
    lr: float,
    at_steps: Sequence[int],
    branch_examples: int,
    multipliers: Sequence[int] = (1, 2, 4, 8, 16),
    lr_rule: str = "sqrt",
    tolerance: float = 0.02,
    seeds: Sequence[int] = (0, 1),
    base_seed: int = 0,
    monitor: str = "val/loss",
    beta: float = 0.95,
    trainer_kwargs: dict[str, Any] | None = None,
) -> list[BranchPoint]:
    """Local critical batch size by branched training (Merrill et al. 2025) at several points of one run.

    A base run at ``batch_size`` and ``lr`` (with the ``GradientNoiseScale`` callback) is stopped at each of
    ``at_steps``; from each, branches continue with batch ``k * batch_size`` and learning rate
    ``lr * f(k)`` (``f`` from ``lr_rule``: ``sqrt`` is a common rule for Adam, ``linear`` for SGD) for
    ``branch_examples`` examples, i.e. ``branch_examples / (k * batch_size)`` steps, carrying over the
    optimizer state. The loss after the branch is the monitored validation loss, averaged over ``seeds``
    (the branch's data order), which is the smoothing. The local critical batch is
    ``batch_size * local_critical_batch(multipliers, losses, tolerance)``. The model must keep a constant
    learning rate (a scheduler would not be carried over).
    """
    if not at_steps:
        raise CriticalBatchError("at_steps must name at least one optimizer step to branch from.")
    if min(at_steps) < 1:
        raise CriticalBatchError(f"at_steps must be optimizer steps of 1 or more, got {sorted(at_steps)}.")
    largest = max(multipliers) * batch_size
    if branch_examples < largest:
        raise CriticalBatchError(
            f"branch_examples={branch_examples} is less than one step at the largest batch {largest}; raise it."
        )
    uneven = [k for k in multipliers if branch_examples % (k * batch_size)]
    if uneven:
        # Rounded down, the larger batches would train on fewer examples and look worse than they are.
        fit = -(-branch_examples // largest) * largest
        raise CriticalBatchError(
            f"branch_examples={branch_examples} is not a whole number of steps at batches"
            f" {[k * batch_size for k in uneven]}, so those branches would train on fewer examples than the others;"
            f" use a multiple of every branch batch, e.g. {fit}."
        )
    steps_needed = [branch_examples // (k * batch_size) for k in multipliers]
    seed_everything(base_seed, workers=True, verbose=False)
    datamodule = datamodule_factory(batch_size=batch_size, seed=base_seed)
    model = model_factory(lr=lr)
    gns = GradientNoiseScale(beta=beta)
    snapshots = _Snapshots(gns, at_steps)
    trainer = _quiet_trainer(
        max_steps=max(at_steps),
        max_epochs=-1,
        limit_val_batches=0,
        callbacks=[gns, snapshots],
        **(trainer_kwargs or {}),
    )
    with _few_workers_is_fine():
        trainer.fit(model, datamodule=datamodule)
    points = []
    for step in sorted(snapshots.saved):
        saved = snapshots.saved[step]
        start_model = model_factory(lr=lr)
        start_model.load_state_dict(saved["model"])
        at_branch_data = datamodule_factory(batch_size=batch_size, seed=base_seed)
        loss_at_branch = _validate_loss(start_model, at_branch_data, monitor, trainer_kwargs)
        means, stds = [], []
        for k, num_steps in zip(multipliers, steps_needed, strict=True):
            losses = []
            for seed in seeds:
                seed_everything(seed, workers=True, verbose=False)
                branch = model_factory(lr=lr)
                branch.load_state_dict(saved["model"])
                data = datamodule_factory(batch_size=k * batch_size, seed=seed)
                branch_trainer = _quiet_trainer(
                    max_steps=num_steps,
                    max_epochs=-1,
                    limit_val_batches=0,
                    callbacks=[BranchStart(saved["optimizer"], _lr_factor(k, lr_rule))],
                    **(trainer_kwargs or {}),
                )
                with _few_workers_is_fine():
                    branch_trainer.fit(branch, datamodule=data)
                losses.append(_validate_loss(branch, data, monitor, trainer_kwargs))
            means.append(float(np.mean(losses)))
            stds.append(float(np.std(losses, ddof=1)) if len(losses) > 1 else math.nan)
        k_star = local_critical_batch(list(multipliers), means, tolerance)
        points.append(
            BranchPoint(
                step=step,
                examples=step * batch_size,
                b_simple=saved["b_simple"],
                loss_at_branch=loss_at_branch,
                multipliers=list(multipliers),
                losses=means,
                loss_stds=stds,
                local_critical_batch=k_star * batch_size,
                bound=critical_batch_bound(list(multipliers), k_star),
            )
        )
    return points


def _validate_loss(
    model: LightningModule, datamodule: LightningDataModule, monitor: str, trainer_kwargs: dict[str, Any] | None
) -> float:
    # The same trainer options as the runs themselves (--accelerator ...), validation being part of the run.
    trainer = _quiet_trainer(**(trainer_kwargs or {}))
    with _few_workers_is_fine():
        metrics = trainer.validate(model, datamodule=datamodule, verbose=False)
    if not metrics or monitor not in metrics[0]:
        raise CriticalBatchError(f"The model logged no {monitor!r} during validation.")
    return float(metrics[0][monitor])


def format_branch_table(points: Sequence[BranchPoint], batch_size: int) -> str:
    """A Markdown table: one row per branch point, the loss of each multiplier, the local CBS beside B_simple."""
    if not points:
        return "(no branch points)"
    ks = points[0].multipliers
    header = "| step | examples | val loss there | B_simple there | " + " | ".join(f"loss k={k}" for k in ks)
    header += " | local CBS |"
    lines = [header, "|" + "---|" * (5 + len(ks))]
    for p in points:
        cells = " | ".join(
            f"{m:.4f} ± {s:.4f}" if math.isfinite(s) else f"{m:.4f}" for m, s in zip(p.losses, p.loss_stds, strict=True)
        )
        bound = {"at most": "≤ ", "at least": "≥ "}.get(p.bound, "")
        lines.append(
            f"| {p.step} | {p.examples} | {p.loss_at_branch:.4f} | {p.b_simple:.1f} | {cells} |"
            f" {bound}{p.local_critical_batch:.0f} |"
        )
    lines.append(f"\nbase batch {batch_size}; local CBS = batch of the largest k whose loss stays within tolerance.")
    if any(p.bound for p in points):
        lines.append(
            "≤: the smallest multiplier already kept up best and the next lost (the local CBS is at most that);"
            " ≥: every multiplier kept up (at least that). Bounds are no values: branch with more multipliers, and"
            " calibration_from_branch_points leaves them out."
        )
    return "\n".join(lines)
