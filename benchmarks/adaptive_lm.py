"""Adaptive accumulation on a character-level language model: optimizer steps and validation loss at equal tokens.

Task: the transformer of ``example_projects/char_transformer.py`` (2 layers, d_model 64, context 64, AdamW
at a constant learning rate) on Python's standard-library sources, one CPU device, the noise scale counted
in tokens. Every configuration trains on the same number of tokens (``--tokens``); a run stops at the first
optimizer step at or past it. Configurations:

- ``fixed small``: accumulation 1 (``--micro-batch`` sequences; the batch the learning rate is set for),
  and ``fixed small lr=<lr>`` for each of ``--small-lrs`` (is the learning rate right for the small batch?);
- ``adaptive <rule> c=<calibration>``: ``AdaptiveBatchSize`` from accumulation 1 to ``--max-accumulation``,
  target ``calibration x B_simple`` (``target="b_simple"``), learning-rate rule ``<rule>``; one configuration
  per ``RULE:CALIBRATION`` in ``--adaptive`` (the rule and the calibration are chosen by this benchmark, not
  assumed);
- ``fixed large x<k> <rule>``: accumulation ``k``, the largest the first adaptive configuration reached
  (over all seeds; or ``--large-accumulation``), from the start, with learning rate ``--lr x f(k)`` for each
  rule ``f`` of ``--large-lr-rules`` (``adascale``'s gain needs measured statistics; ``linear`` is its
  upper bound).

Validation: cross-entropy in nats per token on held-out text (the last 5% of the corpus, never trained on):
on ``--val-sequences`` sequences every ``--eval-every`` tokens, and on the whole held-out set at the end.

Prints a Markdown table (final validation loss mean ± std over seeds, optimizer steps, tokens, wall time),
writes every run to ``--results`` (JSON lines; ``--report-only`` re-reads them) and plots validation loss
against steps and against tokens, and the effective batch, to ``--out``.

Example (the numbers of docs/adaptive.md; 24 runs of 30-45 s each on a busy 2-core machine):
``nice -n 15 python benchmarks/adaptive_lm.py --seeds 3 --out docs/adaptive_lm.png --results docs/adaptive_lm.jsonl``
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

from char_transformer import VOCAB_SIZE, CharTransformer, count_tokens, datasets, tokens_per_sequence

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.batch_schedule import lr_factor


@dataclass
class Run:
    name: str
    seed: int
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    final_val_loss: float = math.nan
    curve: list[tuple[int, int, float]] = field(default_factory=list)  # (step, tokens, val loss)
    batches: list[tuple[int, int]] = field(default_factory=list)  # (step, tokens per step) at each change
    max_accumulation: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)


def validation_loss(model: LightningModule, x: torch.Tensor, y: torch.Tensor, chunk: int = 64) -> float:
    """Mean cross-entropy per token (nats) over the sequences ``x`` -> ``y``."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            logits = model(x[start : start + chunk])
            total += float(
                F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y[start : start + chunk].reshape(-1), reduction="sum")
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
        self.tokens += count_tokens(batch)
        if trainer.fit_loop._should_accumulate():
            return
        step = trainer.global_step
        per_step = count_tokens(batch) * trainer.accumulate_grad_batches
        if not self.run.batches or self.run.batches[-1][1] != per_step:
            self.run.batches.append((step, per_step))
        self.run.max_accumulation = max(self.run.max_accumulation, trainer.accumulate_grad_batches)
        if self.tokens >= self.next_eval or self.tokens >= self.budget:
            self.run.curve.append((step, self.tokens, validation_loss(pl_module, *self.val)))
            self.next_eval += self.eval_every
        if self.tokens >= self.budget:
            self.run.steps, self.run.tokens = step, self.tokens
            trainer.should_stop = True


def train(name: str, seed: int, args: argparse.Namespace) -> Run:
    seed_everything(seed, verbose=False)
    train_set, val_set = datasets(args.context)
    loader = DataLoader(
        train_set,
        batch_size=args.micro_batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    val_x = torch.stack([val_set[i][0] for i in range(len(val_set))])
    val_y = torch.stack([val_set[i][1] for i in range(len(val_set))])
    probe = args.val_sequences
    run = Run(name, seed)
    accumulation, lr = 1, args.lr
    callbacks: list[Callback] = []
    adaptive: AdaptiveBatchSize | None = None
    if name.startswith("adaptive"):
        _, rule, calibration = name.split()
        adaptive = AdaptiveBatchSize(
            target="b_simple",
            calibration=float(calibration.removeprefix("c=")),
            max_accumulation=args.max_accumulation,
            max_growth=args.max_growth,
            min_samples=args.min_samples,
            max_relative_error=args.max_relative_error,
            warmup_steps=args.warmup_steps,
            min_steps_between_changes=args.min_steps_between_changes,
            check_every_n_steps=args.check_every,
            lr_scaling=rule,  # type: ignore[arg-type]
        )
        callbacks += [
            GradientNoiseScale(beta=args.beta, mode="per_example", batch_size_fn=tokens_per_sequence),
            adaptive,
        ]
    elif name.startswith("fixed large"):
        _, _, k, rule = name.split()
        accumulation = int(k.removeprefix("x"))
        lr = args.lr * lr_factor(rule, float(accumulation))  # type: ignore[arg-type]
    elif name.startswith("fixed small lr="):
        lr = float(name.removeprefix("fixed small lr="))
    callbacks.append(TokenBudget(run, args.tokens, args.eval_every, (val_x[:probe], val_y[:probe])))
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=1000,
        accumulate_grad_batches=accumulation,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    model = CharTransformer(args.context, args.d_model, args.layers, args.heads, lr)
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


def table(runs: list[Run], names: list[str]) -> str:
    small = {r.seed: r for r in runs if r.name == "fixed small"}
    lines = [
        "| configuration | seeds | final val loss (nats/token) | Δ vs fixed small | optimizer steps"
        " | steps vs fixed small | tokens | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        mine = [r for r in runs if r.name == name]
        if not mine:
            continue
        paired = [(r, small[r.seed]) for r in mine if r.seed in small]
        delta = [r.final_val_loss - s.final_val_loss for r, s in paired]
        step_ratio = [r.steps / s.steps for r, s in paired if s.steps]
        lines.append(
            f"| {name} | {len(mine)} | {mean_std([r.final_val_loss for r in mine], 4)} |"
            f" {mean_std(delta, 4) if delta else 'n/a'} | {mean_std([float(r.steps) for r in mine])} |"
            f" {mean_std(step_ratio, 2) + 'x' if step_ratio else 'n/a'} | {mean_std([float(r.tokens) for r in mine])} |"
            f" {mean_std([r.seconds for r in mine])} |"
        )
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds (0, 1, ...)")
    parser.add_argument("--tokens", type=int, default=1_500_000, help="training tokens per run")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (the small batch)")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--lr", type=float, default=4e-3, help="AdamW learning rate at the small batch (best of 2e-3, 4e-3, 8e-3)"
    )
    parser.add_argument("--max-accumulation", type=int, default=16, help="adaptive upper bound")
    parser.add_argument("--large-accumulation", type=int, default=0, help="fixed large (0: what adaptive reached)")
    parser.add_argument(
        "--large-lr-rules", nargs="+", default=["sqrt", "linear"], help="fixed large learning-rate rules"
    )
    parser.add_argument("--small-lrs", type=float, nargs="*", default=[0.002, 0.008], help="extra fixed small lrs")
    parser.add_argument(
        "--adaptive",
        nargs="+",
        default=["sqrt:0.5", "adascale:0.5", "none:0.5", "sqrt:1", "sqrt:0.25"],
        help="adaptive configurations, RULE:CALIBRATION (learning-rate rule, B_crit / B_simple); the first one"
        " sets the fixed large batch",
    )
    parser.add_argument("--max-growth", type=float, default=2.0)
    parser.add_argument("--min-samples", type=float, default=10.0)
    parser.add_argument("--max-relative-error", type=float, default=0.5)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--min-steps-between-changes", type=int, default=50)
    parser.add_argument("--check-every", type=int, default=10)
    parser.add_argument("--beta", type=float, default=0.95, help="GNS EMA decay")
    parser.add_argument("--eval-every", type=int, default=100_000, help="tokens between validation probes")
    parser.add_argument("--val-sequences", type=int, default=128, help="held-out sequences per probe")
    parser.add_argument("--configs", nargs="+", default=None, help="only these configurations (default: all)")
    parser.add_argument("--plot-configs", nargs="+", default=None, help="only these in the plot (default: all)")
    parser.add_argument("--out", type=Path, default=Path("adaptive_lm.png"))
    parser.add_argument("--results", type=Path, default=Path("adaptive_lm.jsonl"), help="JSON lines, one per run")
    parser.add_argument("--report-only", action="store_true", help="table and plot from --results, no training")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    adaptive_names = [f"adaptive {spec.split(':')[0]} c={float(spec.split(':')[1]):g}" for spec in args.adaptive]
    small_names = ["fixed small", *(f"fixed small lr={lr:g}" for lr in args.small_lrs)]
    runs: list[Run] = []
    if args.report_only:
        runs = [Run(**json.loads(line)) for line in args.results.read_text().splitlines() if line.strip()]
    else:
        # The first adaptive configuration sets the fixed large batch; the other adaptive ones come last.
        order = [adaptive_names[0], *small_names, "fixed large", *adaptive_names[1:]]
        for name in order:
            if name == "fixed large":
                large = args.large_accumulation or max(
                    [r.max_accumulation for r in runs if r.name == adaptive_names[0]] or [args.max_accumulation]
                )
                names = [f"fixed large x{large} {rule}" for rule in args.large_lr_rules]
            else:
                names = [name]
            for name in names:
                if args.configs and not any(name == c or name.startswith(c + " ") for c in args.configs):
                    continue
                for seed in range(args.seeds):
                    run = train(name, seed, args)
                    runs.append(run)
                    with args.results.open("a") as f:
                        f.write(json.dumps(asdict(run)) + "\n")
                    changes = ", ".join(f"{b}@{s}" for s, b in run.batches)
                    print(
                        f"seed {seed} {name:18s} val {run.final_val_loss:.4f} steps {run.steps} tokens {run.tokens}"
                        f" {run.seconds:.0f}s tokens/step {changes}",
                        file=sys.stderr,
                        flush=True,
                    )
    kinds = ("fixed small", "adaptive", "fixed large")
    present = sorted(
        dict.fromkeys(r.name for r in runs),
        key=lambda n: ([i for i, kind in enumerate(kinds) if n.startswith(kind)] + [len(kinds)])[0],
    )
    print(
        f"Char transformer ({args.layers} layers, d_model {args.d_model}, context {args.context}), AdamW lr {args.lr}"
        f" at {args.micro_batch * args.context} tokens per step; {args.tokens:,} training tokens per run;"
        f" adaptive target c x B_simple, max_growth"
        f" {args.max_growth:g}, min_samples {args.min_samples:g}, max_relative_error {args.max_relative_error:g}:\n"
    )
    print(table(runs, present))
    plot(
        runs,
        args.plot_configs or present,
        args.out,
        f"char transformer: validation loss at {args.tokens:,} training tokens per run",
    )
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
