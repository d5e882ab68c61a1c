"""Adaptive accumulation vs fixed small and fixed large batches: optimizer steps and examples to a target loss.

Task: the conv net and 8x8 digits of ``example_projects/digits_classifier.py`` (SGD, momentum 0.9), micro-
batches of ``--micro-batch`` examples on one CPU device. Three configurations per seed:

- ``fixed small``: accumulation 1 (the batch the learning rate ``--lr`` is set for);
- ``fixed large``: accumulation ``--max-accumulation``, learning rate scaled like the adaptive run's
  rule at that batch (``linear``: ``lr x max-accumulation``);
- ``adaptive``: ``AdaptiveBatchSize`` from accumulation 1 up to ``--max-accumulation``, target and
  learning-rate rule from ``--target`` / ``--lr-scaling``; the noise scale from ``GradientNoiseScale``.

Loss: the **validation** cross-entropy on the held-out 20% (359 examples), evaluated after every optimizer
step (a fixed set, so a threshold crossing is not an artefact of minibatch noise in the training loss).
A run stops at the first step whose validation loss is at most ``--target-loss``; "examples" counts every
training example that went into a gradient up to that step (short windows at an epoch's end included).

Each configuration is also placed against the fixed-batch frontier of the batch-size sweep in
``docs/critical_batch.md`` (``--frontier``: its ``fit.json``, the fitted ``S = S_min + E_min / B``, i.e.
``S(E) = S_min E / (E - E_min)`` at ``E`` examples): a run below it took fewer steps than any fixed batch
(with a tuned learning rate) needs at the same number of examples.

Prints a Markdown table of mean ± std over ``--seeds`` and saves a plot (validation loss against steps
and against examples, and the adaptive effective batch) to ``--out``.

Example: ``python benchmarks/adaptive.py --seeds 3 --out docs/adaptive.png`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "example_projects"))

from digits_classifier import DigitsClassifier, digits_datasets

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.batch_schedule import LR_SCALINGS, NoiseScaleStatistics, lr_factor


@dataclass
class Run:
    name: str
    seed: int
    steps: int | None = None  # optimizer steps to the target (None: not reached)
    examples: int | None = None
    curve: list[tuple[int, int, float, int]] = field(default_factory=list)  # (step, examples, val loss, batch)
    seconds: float = 0.0
    decisions: list[dict[str, Any]] = field(default_factory=list)  # AdaptiveBatchSize.decisions


class ValidationProbe(Callback):
    """After each optimizer step: full validation loss, examples so far; stops at the target."""

    def __init__(self, val: TensorDataset, target: float, run: Run) -> None:
        self.x, self.y = val.tensors
        self.target = target
        self.run = run
        self.examples = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.examples += int(batch[0].shape[0])
        if trainer.fit_loop._should_accumulate():
            return
        with torch.no_grad():
            loss = float(F.cross_entropy(pl_module(self.x), self.y))
        # The nominal batch of the step just taken (an epoch's short last window is not drawn as a dip).
        nominal = int(batch[0].shape[0]) * trainer.accumulate_grad_batches
        self.run.curve.append((trainer.global_step, self.examples, loss, nominal))
        if loss <= self.target and self.run.steps is None:
            self.run.steps, self.run.examples = trainer.global_step, self.examples
            trainer.should_stop = True


def fraction_target(fraction: float) -> Callable[[NoiseScaleStatistics], float]:
    """A user target: the batch at which the forecast E/E_min = 1 + B/B_simple is 1 + ``fraction``."""

    def target(stats: NoiseScaleStatistics) -> float:
        return fraction * stats.b_simple

    return target


def train(name: str, seed: int, args: argparse.Namespace) -> Run:
    seed_everything(seed, verbose=False)
    train_set, val_set = digits_datasets(seed)
    loader = DataLoader(
        train_set,
        batch_size=args.micro_batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    run = Run(name, seed)
    callbacks: list[Callback] = [GradientNoiseScale(beta=args.beta)]
    accumulation, lr = 1, args.lr
    if name == "adaptive":
        callbacks.append(
            AdaptiveBatchSize(
                target=fraction_target(args.fraction) if args.target == "fraction" else args.target,
                calibration=args.calibration,
                max_growth=args.max_growth,
                min_samples=args.min_samples,
                z=args.z,
                max_accumulation=args.max_accumulation,
                warmup_steps=args.warmup_steps,
                min_steps_between_changes=args.min_steps_between_changes,
                check_every_n_steps=5,
                lr_scaling=args.lr_scaling,
            )
        )
    elif name == "fixed large":
        accumulation = args.max_accumulation
        # adascale's gain needs measured statistics; its upper bound is the linear rule.
        rule = "linear" if args.lr_scaling == "adascale" else args.lr_scaling
        lr = args.lr * lr_factor(rule, float(accumulation))
    callbacks.append(ValidationProbe(val_set, args.target_loss, run))
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=args.max_epochs,
        accumulate_grad_batches=accumulation,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    start = time.perf_counter()
    trainer.fit(DigitsClassifier(lr=lr, momentum=args.momentum), loader)
    run.seconds = time.perf_counter() - start
    for callback in callbacks:
        if isinstance(callback, AdaptiveBatchSize):
            run.decisions = callback.decisions
    return run


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.mean(values):.0f} ± {statistics.stdev(values):.0f}"


def ratio(values: list[float]) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}x"
    return f"{values[0]:.2f}x"


def frontier_steps(examples: float, s_min: float, e_min: float) -> float:
    """Steps the fitted fixed-batch frontier needs for ``examples`` (inf at or below ``E_min``)."""
    return s_min * examples / (examples - e_min) if examples > e_min else math.inf


def table(runs: list[Run], names: list[str], frontier: tuple[float, float] | None = None) -> str:
    small = {r.seed: r for r in runs if r.name == "fixed small"}
    lines = [
        "| configuration | reached | optimizer steps | examples | steps vs fixed small | examples vs fixed small |"
        + (" frontier steps at these examples | runs below the frontier |" if frontier else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if frontier else ""),
    ]
    for name in names:
        mine = [r for r in runs if r.name == name]
        done = [r for r in mine if r.steps is not None]
        steps = [float(r.steps) for r in done if r.steps is not None]
        examples = [float(r.examples) for r in done if r.examples is not None]
        paired = [(r, small[r.seed]) for r in done if small.get(r.seed) and small[r.seed].steps is not None]
        step_ratio = [r.steps / s.steps for r, s in paired if r.steps and s.steps]
        example_ratio = [r.examples / s.examples for r, s in paired if r.examples and s.examples]
        row = (
            f"| {name} | {len(done)}/{len(mine)} | {mean_std(steps)} | {mean_std(examples)} |"
            f" {ratio(step_ratio) if step_ratio else 'n/a'} | {ratio(example_ratio) if example_ratio else 'n/a'} |"
        )
        if frontier:
            bound = [frontier_steps(e, *frontier) for e in examples]
            below = sum(s < b for s, b in zip(steps, bound, strict=True))
            finite = [b for b in bound if math.isfinite(b)]
            row += f" {mean_std(finite) if finite else 'inf'} | {below}/{len(steps)} |"
        lines.append(row)
    return "\n".join(lines)


def plot(runs: list[Run], names: list[str], target: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(names, ["tab:blue", "tab:orange", "tab:green"], strict=False))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    for run in runs:
        if not run.curve:
            continue
        steps, examples, losses, batches = zip(*run.curve, strict=True)
        label = run.name if run.seed == runs[0].seed else None
        axes[0].plot(steps, losses, color=colors[run.name], alpha=0.7, lw=1, label=label)
        axes[1].plot(examples, losses, color=colors[run.name], alpha=0.7, lw=1, label=label)
        axes[2].plot(steps, batches, color=colors[run.name], alpha=0.7, lw=1, label=label)
    for ax, xlabel in zip(axes[:2], ["optimizer steps", "training examples"], strict=True):
        ax.axhline(target, color="gray", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.legend()
    axes[2].set_xlabel("optimizer steps")
    axes[2].set_ylabel("examples per optimizer step")
    axes[2].set_yscale("log", base=2)
    axes[2].legend()
    fig.suptitle(f"digits: steps and examples to validation loss {target} (dashed)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds (0, 1, ...)")
    parser.add_argument("--micro-batch", type=int, default=16, help="examples per micro-batch (the small batch)")
    parser.add_argument("--max-accumulation", type=int, default=8, help="fixed large batch and adaptive upper bound")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate at the small batch")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument(
        "--target",
        choices=["sqrt", "b_simple", "fraction"],
        default="sqrt",
        help="AdaptiveBatchSize target; fraction: a user function, --fraction x B_simple",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.2,
        help="--target fraction: effective batch = this x B_simple, where the paper's E/E_min = 1 + B/B_simple"
        " forecasts this fraction of extra examples over batch 1",
    )
    parser.add_argument("--calibration", type=float, default=1.0, help="B_crit / B_simple for the named targets")
    parser.add_argument("--max-growth", type=float, default=2.0, help="largest batch factor per change")
    parser.add_argument("--min-samples", type=float, default=10.0, help="effective EMA samples before a change")
    parser.add_argument("--z", type=float, default=1.0, help="standard errors of the confidence bound decided on")
    parser.add_argument(
        "--frontier",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "docs" / "critical_batch" / "fit.json",
        help="fit.json of a lightning-gns sweep at the same target loss (S_min, E_min); '' for none",
    )
    parser.add_argument("--lr-scaling", choices=LR_SCALINGS, default="linear")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--min-steps-between-changes", type=int, default=20)
    parser.add_argument("--beta", type=float, default=0.95, help="GNS EMA decay")
    parser.add_argument("--target-loss", type=float, default=0.15, help="validation cross-entropy to reach")
    parser.add_argument("--max-epochs", type=int, default=20, help="give up after this many epochs")
    parser.add_argument("--verbose", action="store_true", help="print every AdaptiveBatchSize decision")
    parser.add_argument("--out", type=Path, default=Path("adaptive.png"), help="where to save the plot")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    names = ["fixed small", "fixed large", "adaptive"]
    runs: list[Run] = []
    for seed in range(args.seeds):
        for name in names:
            run = train(name, seed, args)
            runs.append(run)
            for decision in run.decisions if args.verbose else []:
                print(
                    f"  step {decision['step']}: B_simple {decision['b_simple']:.4g}, relative error"
                    f" {decision['relative_error']:.2g}: {decision['reason']}",
                    file=sys.stderr,
                )
            print(
                f"seed {seed} {name:12s} steps {run.steps} examples {run.examples}"
                f" ({len(run.curve)} steps run, {run.seconds:.0f} s)",
                file=sys.stderr,
            )
    print(
        f"Digits, micro-batch {args.micro_batch}, SGD lr {args.lr} (momentum {args.momentum}) at the small batch,"
        f" max accumulation {args.max_accumulation}, adaptive target {args.target!r} with lr_scaling"
        f" {args.lr_scaling!r}; validation loss <= {args.target_loss}; {args.seeds} seeds:\n"
    )
    frontier = None
    if str(args.frontier) and args.frontier.is_file():
        fit = json.loads(args.frontier.read_text())
        frontier = (float(fit["s_min"]), float(fit["e_min"]))
        print(
            f"Frontier: {args.frontier.name} (target loss {fit['target_loss']}): S_min {frontier[0]:.1f},"
            f" E_min {frontier[1]:.0f}, B_crit {frontier[1] / frontier[0]:.1f}\n"
        )
    print(table(runs, names, frontier))
    plot(runs, names, args.target_loss, args.out)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
