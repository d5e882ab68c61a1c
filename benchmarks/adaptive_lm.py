"""Adaptive accumulation against fixed batches at equal training units, on three tasks of different shape.

Tasks (``--task``): ``stdlib``, the char transformer of ``example_projects/char_transformer.py`` (2 layers,
d_model 64, context 64, AdamW at a constant learning rate) on Python's standard-library sources; ``docs``,
the same model with 1 layer and context 128 on the English prose of Python's documentation topics
(``pydoc_data/topics.py``, shipped with the interpreter); ``digits``, the conv net of
``example_projects/digits_classifier.py`` under SGD with momentum. One CPU device; the language models count
the noise scale in tokens. Every configuration trains on the same number of units (``--tokens``: tokens,
or examples for digits); a run stops at the first optimizer step at or past it. Configurations
(``--configs``):

- ``fixed small``: accumulation 1 (the batch the learning rate is set for); ``fixed small lr=<lr>``;
- ``fixed x<k> <rule>``: accumulation ``k`` from the first step, learning rate x ``rule(k)``
  (``none``, ``sqrt``, ``linear``);
- ``adaptive default``: ``AdaptiveBatchSize()`` and ``GradientNoiseScale()`` with their default arguments;
  ``adaptive key=value,key=value``: those ``AdaptiveBatchSize`` arguments changed.

The learning rate is constant unless ``--cooldown F`` decays it linearly to 0 over the last fraction ``F`` of
the budget (set before each step, as a scheduler would; ``--hold-in-cooldown`` also stops the adaptive
configurations from growing during the decay). ``--first-seed`` starts the seeds elsewhere than 0.

Validation: cross-entropy in nats (per token for the language models) on held-out data (the last 5% of the
text, never trained on; the digits' held-out split), on ``--val-sequences`` items every ``--eval-every``
units and on the whole held-out set at the end.

Prints a Markdown table (final validation loss, Δ against the fixed small batch paired per seed with its
standard error, optimizer steps, units, wall time) and, for each adaptive configuration, the issue's
criteria (no worse than fixed small within one standard error, >= 40% fewer steps, against every fixed
batch with at most as many steps); writes every run (loss curve, batch changes, every AdaptiveBatchSize
decision) to ``--results`` (JSON lines; ``--report-only`` re-reads them) and optionally a plot to ``--out``.

Example (the defaults study of docs/adaptive.md):
``nice -n 15 python benchmarks/adaptive_lm.py --task docs --results docs/adaptive/default_calibration/docs.jsonl``
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch.nn import functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "example_projects"))

from char_transformer import CharTransformer, ChunkDataset, datasets, tokens_per_sequence
from digits_classifier import DigitsClassifier, digits_datasets

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.batch_schedule import lr_factor

# Tasks of different shape. "stdlib": Python source, context 64, 2 layers (the char example); "docs": the
# English prose of Python's own documentation topics (pydoc_data/topics.py, shipped with the interpreter),
# context 128, 1 layer; "digits": the conv net of example_projects/digits_classifier.py under SGD with
# momentum, counted in examples. The budget (--tokens) is tokens for the language models, examples for digits.
# The language models start at 128 and 256 tokens per step, below their critical batch, and train 1M tokens:
# at 512 tokens per step and 300k tokens every larger batch already loses (docs/adaptive.md, second study).
TASKS: dict[str, dict[str, Any]] = {
    "stdlib": {"context": 64, "layers": 2, "lr": 4e-3, "micro_batch": 2, "budget": 1_000_000},
    "docs": {"context": 128, "layers": 1, "lr": 4e-3, "micro_batch": 2, "budget": 1_000_000},
    "digits": {"lr": 0.02, "micro_batch": 16, "budget": 12_000},
}


def count_units(batch: Any) -> int:
    """Tokens of a language-model micro-batch (B x T), examples of a digits one."""
    return batch[0].numel() if batch[0].dtype == torch.long else batch[0].shape[0]


def task_data(task: str, context: int, seed: int) -> tuple[Any, Any]:
    if task == "stdlib":
        return datasets(context)
    if task == "docs":
        import sysconfig

        text = (Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py").read_bytes()
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        split = int(len(tokens) * 0.95)
        return ChunkDataset(tokens[:split], context), ChunkDataset(tokens[split:], context)
    return digits_datasets(seed)


@dataclass
class Run:
    name: str
    seed: int
    task: str = "stdlib"
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    final_val_loss: float = math.nan
    curve: list[tuple[int, int, float]] = field(default_factory=list)  # (step, tokens, val loss)
    batches: list[tuple[int, int]] = field(default_factory=list)  # (step, tokens per step) at each change
    max_accumulation: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    cooldown: float = 0.0  # fraction of the budget over which the learning rate decays to 0 (0: constant)


def validation_loss(model: LightningModule, x: torch.Tensor, y: torch.Tensor, chunk: int = 64) -> float:
    """Mean cross-entropy (nats) per token of the sequences ``x`` -> ``y``, or per example (digits)."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            logits = model(x[start : start + chunk])
            classes = logits.shape[-1]
            total += float(
                F.cross_entropy(logits.reshape(-1, classes), y[start : start + chunk].reshape(-1), reduction="sum")
            )
    model.train(was_training)
    return total / y.numel()


class TokenBudget(Callback):
    """Counts tokens per optimizer step, evaluates every ``eval_every`` tokens, stops at ``budget`` tokens."""

    def __init__(self, run: Run, budget: int, eval_every: int, val: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.run = run
        self.budget = budget
        self.eval_every = eval_every
        self.val = val
        self.tokens = 0
        self.next_eval = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.tokens += count_units(batch)
        if trainer.fit_loop._should_accumulate():
            return
        step = trainer.global_step
        per_step = count_units(batch) * trainer.accumulate_grad_batches
        if not self.run.batches or self.run.batches[-1][1] != per_step:
            self.run.batches.append((step, per_step))
        self.run.max_accumulation = max(self.run.max_accumulation, trainer.accumulate_grad_batches)
        if self.tokens >= self.next_eval or self.tokens >= self.budget:
            self.run.curve.append((step, self.tokens, validation_loss(pl_module, *self.val)))
            self.next_eval += self.eval_every
        if self.tokens >= self.budget:
            self.run.steps, self.run.tokens = step, self.tokens
            trainer.should_stop = True


class Cooldown(Callback):
    """Decays the learning rate linearly to 0 over the last ``fraction`` of the budget (warmup-stable-decay).

    Set at every micro-batch from the units ``budget`` has counted, outside ``optimizer.step()`` as a scheduler
    would: AdaptiveBatchSize multiplies it by its factor inside the step and puts it back after. (Set in
    ``on_before_optimizer_step``, which runs inside the step, it would replace the factor.)
    """

    def __init__(self, budget: TokenBudget, fraction: float, hold: AdaptiveBatchSize | None = None) -> None:
        self.budget, self.fraction, self.hold = budget, fraction, hold
        self.base_lrs: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        optimizer = trainer.optimizers[0]
        if not self.base_lrs:
            self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        remaining = 1.0 - self.budget.tokens / self.budget.budget
        scale = min(1.0, max(0.0, remaining / self.fraction))
        if scale < 1.0 and self.hold is not None and self.hold.accumulation is not None:
            self.hold.max_accumulation = self.hold.accumulation  # --hold-in-cooldown: no growth while decaying
        for group, lr in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = lr * scale


def adaptive_overrides(name: str) -> dict[str, Any]:
    """``adaptive default`` -> {}; ``adaptive calibration=0.5,lr_scaling=none`` -> those keyword arguments."""
    spec = name.removeprefix("adaptive").strip()
    if spec in ("", "default"):
        return {}
    overrides: dict[str, Any] = {}
    for item in spec.split(","):
        key, value = item.split("=")
        try:
            overrides[key] = float(value) if "." in value or key in ("calibration", "z", "tolerance") else int(value)
        except ValueError:
            overrides[key] = value
    return overrides


def train(name: str, seed: int, args: argparse.Namespace) -> Run:
    seed_everything(seed, verbose=False)
    task = TASKS[args.task]
    micro_batch = args.micro_batch or task["micro_batch"]
    context = args.context or task.get("context", 0)
    train_set, val_set = task_data(args.task, context, seed)
    loader = DataLoader(
        train_set,
        batch_size=micro_batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    val_x = torch.stack([val_set[i][0] for i in range(len(val_set))])
    val_y = torch.stack([val_set[i][1] for i in range(len(val_set))])
    probe = args.val_sequences
    run = Run(name, seed, args.task)
    base_lr = args.lr or task["lr"]
    accumulation, lr = 1, base_lr
    callbacks: list[Callback] = []
    adaptive: AdaptiveBatchSize | None = None
    if name.startswith("adaptive"):
        # Library defaults, except the overrides the name spells out; the language models count tokens.
        adaptive = AdaptiveBatchSize(**adaptive_overrides(name))
        size_fn = None if args.task == "digits" else tokens_per_sequence
        gns_kwargs: dict[str, Any] = {} if args.beta is None else {"beta": args.beta}
        callbacks += [GradientNoiseScale(batch_size_fn=size_fn, **gns_kwargs), adaptive]
    elif name.startswith("fixed x"):
        _, k, rule = name.split()
        accumulation = int(k.removeprefix("x"))
        lr = base_lr * lr_factor(rule, float(accumulation))  # type: ignore[arg-type]
    elif name.startswith("fixed small lr="):
        lr = float(name.removeprefix("fixed small lr="))
    budget = TokenBudget(run, args.tokens, args.eval_every, (val_x[:probe], val_y[:probe]))
    callbacks.append(budget)
    if args.cooldown > 0:
        run.cooldown = args.cooldown
        callbacks.append(Cooldown(budget, args.cooldown, adaptive if args.hold_in_cooldown else None))
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=100_000,
        accumulate_grad_batches=accumulation,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    model: LightningModule
    if args.task == "digits":
        model = DigitsClassifier(lr=lr)
    else:
        model = CharTransformer(context, args.d_model, task["layers"], args.heads, lr)
    start = time.perf_counter()
    trainer.fit(model, loader)
    run.seconds = time.perf_counter() - start
    run.final_val_loss = validation_loss(model, val_x, val_y)
    if adaptive is not None:
        run.history = adaptive.history
        run.decisions = adaptive.decisions
    return run


def mean_std(values: list[float], digits: int = 0) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    if len(values) < 2:
        return (values[0] if values else math.nan), 0.0
    return statistics.mean(values), statistics.stdev(values) / math.sqrt(len(values))


def table(runs: list[Run], names: list[str]) -> str:
    """Mean ± std over seeds; Δ vs fixed small paired per seed, mean ± standard error."""
    small = {r.seed: r for r in runs if r.name == "fixed small"}
    lines = [
        "| configuration | seeds | final val loss | Δ vs fixed small (± se) | optimizer steps"
        " | steps vs fixed small | units | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        mine = [r for r in runs if r.name == name]
        if not mine:
            continue
        paired = [(r, small[r.seed]) for r in mine if r.seed in small]
        delta, delta_se = paired_se([r.final_val_loss - s.final_val_loss for r, s in paired])
        step_ratio = [r.steps / s.steps for r, s in paired if s.steps]
        lines.append(
            f"| {name} | {len(mine)} | {mean_std([r.final_val_loss for r in mine], 4)} |"
            f" {delta:+.4f} ± {delta_se:.4f} | {mean_std([float(r.steps) for r in mine])} |"
            f" {mean_std(step_ratio, 2) + 'x' if step_ratio else 'n/a'} | {mean_std([float(r.tokens) for r in mine])} |"
            f" {mean_std([r.seconds for r in mine])} |"
        )
    return "\n".join(lines)


def verdict(runs: list[Run], adaptive: str = "adaptive default") -> str:
    """The issue's done-when for one configuration: against fixed small, and against every fixed batch that took
    at most as many steps (is any of them better?)."""
    mine = {r.seed: r for r in runs if r.name == adaptive}
    small = {r.seed: r for r in runs if r.name == "fixed small"}
    if not mine or not small:
        return f"{adaptive}: no runs"
    seeds = sorted(set(mine) & set(small))
    delta, se = paired_se([mine[s].final_val_loss - small[s].final_val_loss for s in seeds])
    saved = 1 - statistics.mean(mine[s].steps / small[s].steps for s in seeds)
    loss = statistics.mean(mine[s].final_val_loss for s in seeds)
    steps = statistics.mean(mine[s].steps for s in seeds)
    fixed = sorted({r.name for r in runs if r.name.startswith("fixed")})
    rivals = []
    for name in fixed:
        theirs = [r for r in runs if r.name == name]
        their_steps = statistics.mean(r.steps for r in theirs)
        if their_steps <= steps * 1.001:
            their_delta, their_se = paired_se(
                [mine[r.seed].final_val_loss - r.final_val_loss for r in theirs if r.seed in mine]
            )
            rivals.append(f"{name} ({their_steps:.0f} steps): adaptive {their_delta:+.4f} ± {their_se:.4f}")
    ok_small = delta <= se
    best_rival = min(
        (r for r in runs if r.name.startswith("fixed")),
        key=lambda r: statistics.mean(x.final_val_loss for x in runs if x.name == r.name),
    ).name
    return (
        f"{adaptive}: vs fixed small {delta:+.4f} ± {se:.4f}"
        f" ({'no worse, within one se' if ok_small else 'WORSE by more than one se'}),"
        f" {saved:.0%} fewer steps ({'>=' if saved >= 0.4 else '<'} 40%); mean loss {loss:.4f} at {steps:.0f} steps;"
        f" best fixed batch overall: {best_rival}; fixed batches at <= its steps: {'; '.join(rivals) or 'none'}"
    )


def plot(runs: list[Run], names: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    labelled: set[str] = set()
    for run in sorted(runs, key=lambda r: names.index(r.name) if r.name in names else len(names)):
        if not run.curve or run.name not in names:
            continue
        steps, tokens, losses = zip(*run.curve, strict=True)
        label = None if run.name in labelled else run.name
        labelled.add(run.name)
        axes[0].plot(steps, losses, color=colors[run.name], alpha=0.75, lw=1, label=label)
        axes[1].plot(tokens, losses, color=colors[run.name], alpha=0.75, lw=1, label=label)
        change_steps = [s for s, _ in run.batches] + [run.steps]
        sizes = [b for _, b in run.batches] + [run.batches[-1][1]]
        axes[2].step(change_steps, sizes, where="post", color=colors[run.name], alpha=0.75, lw=1, label=label)
    for ax, xlabel in zip(axes[:2], ["optimizer steps", "training tokens"], strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_ylim(top=min(2.6, ax.get_ylim()[1]))
        ax.legend()
    axes[0].set_xscale("log")
    axes[2].set_xlabel("optimizer steps")
    axes[2].set_ylabel("tokens per optimizer step")
    axes[2].set_yscale("log", base=2)
    axes[2].legend()
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


DEFAULT_CONFIGS = [
    "fixed small",
    "fixed x2 none",
    "fixed x4 none",
    "fixed x4 sqrt",
    "adaptive default",
    "adaptive lr_scaling=none",
    "adaptive calibration=0.5",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="stdlib")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ...")
    parser.add_argument(
        "--tokens", type=int, default=0, help="training tokens (digits: examples) per run (0: the task's)"
    )
    parser.add_argument("--micro-batch", type=int, default=0, help="micro-batch (0: the task's)")
    parser.add_argument("--context", type=int, default=0, help="context (0: the task's)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.0, help="learning rate at the small batch (0: the task's)")
    parser.add_argument(
        "--cooldown",
        type=float,
        default=0.0,
        help="decay the learning rate linearly to 0 over this last fraction of the budget (0: constant, as before)",
    )
    parser.add_argument(
        "--hold-in-cooldown", action="store_true", help="adaptive configurations keep their batch while the lr decays"
    )
    parser.add_argument("--beta", type=float, default=None, help="GNS EMA decay (default: GradientNoiseScale's)")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        help="'fixed small', 'fixed small lr=X', 'fixed xK RULE' (accumulation K, lr x RULE(K)), 'adaptive default'"
        " (AdaptiveBatchSize's default arguments) or 'adaptive key=value,key=value' (those arguments changed)",
    )
    parser.add_argument("--eval-every", type=int, default=100_000, help="units between validation probes")
    parser.add_argument("--val-sequences", type=int, default=128, help="held-out sequences per probe")
    parser.add_argument("--plot-configs", nargs="+", default=None, help="only these in the plot (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="plot (default: none)")
    parser.add_argument("--results", type=Path, default=Path("adaptive_lm.jsonl"), help="JSON lines, one per run")
    parser.add_argument("--report-only", action="store_true", help="table and plot from --results, no training")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or TASKS[args.task]["budget"]

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    runs: list[Run] = []
    if args.report_only:
        runs = [Run(**json.loads(line)) for line in args.results.read_text().splitlines() if line.strip()]
        runs = [r for r in runs if r.task == args.task]
    else:
        # Seed-major order: a run cut short still leaves complete seeds of every configuration.
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for name in args.configs:
                run = train(name, seed, args)
                runs.append(run)
                with args.results.open("a") as f:
                    f.write(json.dumps(asdict(run)) + "\n")
                changes = ", ".join(f"{b}@{s}" for s, b in run.batches)
                print(
                    f"{args.task} seed {seed} {name:28s} val {run.final_val_loss:.4f} steps {run.steps}"
                    f" units {run.tokens} {run.seconds:.0f}s per step {changes}",
                    file=sys.stderr,
                    flush=True,
                )
    asked = [] if args.report_only else args.configs
    present = list(dict.fromkeys([*asked, *(r.name for r in runs)]))
    budget = args.tokens if not args.report_only else min((r.tokens for r in runs), default=0)
    fraction = args.cooldown or max((r.cooldown for r in runs), default=0.0)
    cooldown = f", learning rate decayed to 0 over the last {fraction:.0%}" if fraction else ""
    print(f"task {args.task}: {budget:,} training units per run (the first step at or past the budget){cooldown}\n")
    print(table(runs, present))
    print()
    for name in present:
        if name.startswith("adaptive"):
            print(verdict(runs, name))
    if args.out is not None:
        plot(
            runs,
            args.plot_configs or present,
            args.out,
            f"{args.task}: validation loss at {args.tokens:,} units per run",
        )
        print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
