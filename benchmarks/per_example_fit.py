"""Cost of ``mode="per_example"`` inside a Lightning ``Trainer`` fit, beside Opacus' per-sample gradients.

benchmarks/per_example.py times one step of each variant in a plain PyTorch loop; this script measures what
a user of the callback pays in a real fit, with everything Lightning does around a step. Models, all with
the same shape (layers, width, heads, sequence, batch; byte vocabulary, AdamW, CPU):

* ``small GPT``: the nanoGPT-style model of benchmarks/per_example.py (``nn.Linear``/``nn.Embedding``/
  ``nn.LayerNorm``, tied output layer);
* ``HF GPT-2``: transformers' ``GPT2LMHeadModel`` from a config of that shape (its projections are
  transformers' ``Conv1D``, its positional embedding is called on ``position_ids`` of shape ``(1, T)``);
* ``HF GPT-2, Conv1D -> Linear``: the same model and weights with every ``Conv1D`` replaced by the equivalent
  ``nn.Linear``, to compare the cost of the two layer types on the same network.

Fits, per model, alternate ``W0 G0 O0 W1 G1 O1 ... Wn`` (``--reps`` pairs): ``W`` plain (no callback),
``G`` with ``GradientNoiseScale(mode="per_example", layers="all", measure_every_n_steps=2)``, ``O`` with the
model wrapped in Opacus' ``GradSampleModule`` whose hooks are enabled every 2nd step (per-sample gradients
``p.grad_sample`` of every parameter, then their per-sample squared norms, the quantity per_example
computes; the hooks are disabled on the other steps). Each fit: ``--warmup`` untimed steps, then
``--steps`` timed ones (:class:`paired.StepTimer`: from the step's first batch hook to its last, optimizer
step included).

Reported, as median [q1, q3] (samples) of paired ratios (benchmarks/paired.py):

* measured / idle neighbours: each measured step over the mean of its two idle neighbours in the same fit;
* idle / plain: the median idle step of a ``G`` (or ``O``) fit over the mean of the median steps of the
  plain fits just before and after it;
* measured / plain (est.): the product of the two medians, the cost of a measured step against a plain one.

The target (a measured step of the small GPT <= 1.10x a plain one) is judged on measured / idle neighbours:
an idle step is a plain step with idle hooks, and comparing steps within one fit is far less noisy than
comparing fits. ``--clock cpu`` times with ``process_time`` (this process's CPU time) instead of wall time.

Example: ``nice -n 10 python benchmarks/per_example_fit.py`` (about 2 minutes on 2 busy cores); ``--quick``
for a smoke run; ``--skip-opacus`` without Opacus (``pip install -e .[bench]`` installs it); ``--ablate NAME``
switches off part of the per-example work to show where the cost goes (benchmarks/per_example_ablation.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import per_example_ablation as ablation  # noqa: E402
from paired import StepTimer, idle_steps, idle_vs_without, measured_vs_idle, quartiles, summary  # noqa: E402
from per_example import GPT, VOCAB, Shape, stdlib_text_batches  # noqa: E402
from per_example_ablation import ABLATIONS  # noqa: E402

import lightning_gns  # noqa: E402
from lightning_gns import GradientNoiseScale  # noqa: E402
from tests.support.per_example_norms import pop_norms  # noqa: E402

EVERY = 2
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
LR = 3e-4
TARGET = 1.10  # measured per_example step / plain step on the small GPT, layers="all"


# ---------------------------------------------------------------------------------------------- models
def small_gpt(shape: Shape) -> nn.Module:
    return GPT(shape)


def hf_gpt2(shape: Shape) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=shape.n_layer, n_embd=shape.d_model, n_head=shape.n_head, vocab_size=VOCAB,
        n_positions=shape.seq_len, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def hf_gpt2_linear(shape: Shape) -> nn.Module:
    """HF GPT-2 with every transformers Conv1D (y = x @ W + b, W of shape (in, out)) as the same nn.Linear."""
    model = hf_gpt2(shape)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child).__name__ == "Conv1D":
                d_in, d_out = child.weight.shape
                linear = nn.Linear(d_in, d_out)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
    return model


MODELS: dict[str, Callable[[Shape], nn.Module]] = {
    "small GPT": small_gpt,
    "HF GPT-2": hf_gpt2,
    "HF GPT-2, Conv1D -> Linear": hf_gpt2_linear,
}


class LanguageModel(LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, targets = batch
        out = self.net(tokens)
        logits = getattr(out, "logits", out)
        return F.cross_entropy(logits.transpose(1, 2), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)


class CyclingBatches(Dataset):
    def __init__(self, batches: list[tuple[Tensor, Tensor]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batches[index % len(self.batches)]


# ---------------------------------------------------------------------------------------------- Opacus
class OpacusEveryN(Callback):
    """Opacus' per-sample gradients on every ``EVERY``-th step, with their per-sample squared norms."""

    def __init__(self, module: Any) -> None:
        self.module = module  # the GradSampleModule
        self.measuring = False
        self.last_sq_norms: Tensor | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.measuring = trainer.global_step % EVERY == 0
        if self.measuring:
            self.module.enable_hooks()
        else:
            self.module.disable_hooks()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self.measuring:
            return
        total: Tensor | int = 0
        for p in self.module.parameters():
            sample = getattr(p, "grad_sample", None)
            if sample is not None:
                total = total + sample.flatten(1).square().sum(dim=1)  # (1, ...) for a broadcast layer
                p.grad_sample = None  # Opacus accumulates per-sample gradients until cleared
        assert isinstance(total, Tensor)
        self.last_sq_norms = total


def check_against_opacus(shape: Shape, seed: int) -> str:
    """Assert that Opacus' per-sample squared norms equal per_example's on the small GPT (float32): same quantity."""
    from opacus import GradSampleModule

    torch.manual_seed(seed)
    model = small_gpt(shape)
    tokens, targets = stdlib_text_batches(shape, count=1, seed=seed)[0]
    tracker = lightning_gns.GradientNoiseScaleTracker()
    tracker.attach(model.parameters(), mode="per_example", model=model)
    tracker.start_micro_batch(units=len(tokens))
    F.cross_entropy(model(tokens).transpose(1, 2), targets).backward()
    source = tracker._sources.per_example
    assert source is not None and tracker.covered_fraction == 1.0
    ours = pop_norms(source)
    tracker.detach()
    assert ours is not None
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    model.zero_grad(set_to_none=True)
    F.cross_entropy(wrapped(tokens).transpose(1, 2), targets).backward()
    theirs = OpacusEveryN(wrapped)
    theirs.measuring = True
    theirs.on_before_optimizer_step(None, None, None)  # type: ignore[arg-type]
    assert theirs.last_sq_norms is not None
    # Both are norms of each example's share of the batch-mean loss (Opacus scales by the batch size).
    got, want = ours.square(), theirs.last_sq_norms / len(tokens) ** 2
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    return f"max relative difference {((got - want).abs() / want).max().item():.1e} over {len(tokens)} examples"


# ---------------------------------------------------------------------------------------------- fits
@dataclass
class FitResult:
    by_step: dict[int, float]
    covered_fraction: float = float("nan")


def fit_once(
    name: str, variant: str, shape: Shape, args: argparse.Namespace, batches: list[tuple[Tensor, Tensor]]
) -> FitResult:
    """One short fit of ``variant`` ("plain", "per_example" or "opacus"); step times by step index."""
    torch.manual_seed(args.seed)
    net = MODELS[name](shape)
    callbacks: list[Callback] = []
    gns = None
    if variant == "per_example":
        gns = GradientNoiseScale(mode="per_example", layers="all", measure_every_n_steps=EVERY)
        callbacks.append(gns)
    elif variant == "opacus":
        from opacus import GradSampleModule

        net = GradSampleModule(net, batch_first=True, loss_reduction="mean")
        callbacks.append(OpacusEveryN(net))
    timer = StepTimer(clock=CLOCKS[args.clock])
    total = args.warmup + args.steps
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=total, callbacks=[timer.first, *callbacks, timer.last],
        logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LanguageModel(net), DataLoader(CyclingBatches(batches, total), batch_size=None))
    assert len(timer.times) == total, f"expected {total} steps, timed {len(timer.times)}"
    covered = gns.covered_fraction if gns is not None else float("nan")
    return FitResult(timer.by_step(skip=args.warmup), covered)


@dataclass
class Row:
    model: str
    variant: str
    plain_ms: float
    measured_vs_idle: list[float]
    idle_vs_plain: list[float]
    covered_fraction: float


def run_model(name: str, shape: Shape, args: argparse.Namespace) -> list[Row]:
    """Fits W0 G0 O0 W1 G1 O1 ... Wn; the rows for per_example and Opacus."""
    batches = stdlib_text_batches(shape, count=4, seed=args.seed + 1)
    variants = ["per_example"] + ([] if args.skip_opacus else ["opacus"])
    plain: list[float] = []
    fits: dict[str, list[FitResult]] = {v: [] for v in variants}
    for rep in range(args.reps + 1):
        plain.append(statistics.median(fit_once(name, "plain", shape, args, batches).by_step.values()))
        if rep == args.reps:
            break
        for variant in variants:
            fits[variant].append(fit_once(name, variant, shape, args, batches))
        print(f"  {name}: round {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
    rows = []
    for variant, results in fits.items():
        ratios = [r for fit in results for r in measured_vs_idle(fit.by_step, EVERY)]
        idle = [statistics.median(idle_steps(fit.by_step, EVERY)) for fit in results]
        rows.append(
            Row(name, variant, statistics.median(plain) * 1e3, ratios, idle_vs_without(idle, plain),
                results[-1].covered_fraction)
        )  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------- report
def table(rows: list[Row]) -> str:
    lines = [
        "| model | per-example gradients | plain step (ms) | covered fraction | measured / idle neighbours"
        " | idle / plain | measured / plain (est.) | target | met? |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        estimate = statistics.median(r.measured_vs_idle) * statistics.median(r.idle_vs_plain)
        label = 'lightning_gns per_example, layers="all"' if r.variant == "per_example" else "Opacus GradSampleModule"
        covered = f"{r.covered_fraction:.3f}" if r.variant == "per_example" else "1 (all layers)"
        target = met = ""
        if r.model == "small GPT" and r.variant == "per_example":
            # Judged on the paired ratio: the idle steps are plain steps with idle hooks (idle / plain is their
            # cost, measured between fits and much noisier).
            target = f"measured / idle ≤ {TARGET}"
            median, (q1, _) = statistics.median(r.measured_vs_idle), quartiles(r.measured_vs_idle)
            met = "yes" if median <= TARGET else "**NO**" + (" (q1 meets it)" if q1 <= TARGET else "")
        lines.append(
            f"| {r.model} | {label} | {r.plain_ms:.1f} | {covered} | {summary(r.measured_vs_idle)}"
            f" | {summary(r.idle_vs_plain)} | {estimate:.3f} | {target} | {met} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="per_example cost inside a Lightning fit (paired measured/idle steps), beside Opacus.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2, help="fits of each variant per model (plain fits: reps + 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per fit")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--skip-opacus", action="store_true")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: perf_counter; cpu: process_time (this process's CPU time: less disturbed on a busy machine)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers, batch 8, 1 rep of 4 steps")
    parser.add_argument(
        "--ablate",
        choices=ABLATIONS,
        help="switch off part of the per-example work (benchmarks/per_example_ablation.py): cost decomposition only,"
        " the norms are wrong; implies --skip-opacus",
    )
    args = parser.parse_args()
    if args.ablate:
        args.skip_opacus = True
    if args.quick:
        args.n_layer, args.batch, args.reps, args.steps, args.warmup = 2, 8, 1, 4, 1
    return args


def main() -> None:
    args = parse_args()
    for logger in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "transformers"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    shape = Shape(args.n_layer, args.d_model, args.n_head, args.seq_len, args.batch)
    if args.ablate:
        ablation.apply(args.ablate)
    started, load_before = time.perf_counter(), os.getloadavg()
    check = "not run (--skip-opacus)" if args.skip_opacus else check_against_opacus(shape, args.seed)
    rows = [row for name in args.models for row in run_model(name, shape, args)]
    print(
        f"\nModels: {shape.n_layer} layers, d_model {shape.d_model}, {shape.n_head} heads, sequence {shape.seq_len},"
        f" batch {shape.batch}, byte vocabulary {VOCAB}; AdamW; CPU, {args.threads} torch thread(s)."
        f"\nlightning_gns from {os.path.dirname(lightning_gns.__file__)}; torch {torch.__version__}."
        f"\nPer model: fits W0 G0 O0 ... W{args.reps} ({args.reps} of each variant), each {args.warmup} warm-up +"
        f" {args.steps} timed steps; measured every {EVERY}nd step; clock: {args.clock}."
        f"\nPer-example squared norms on the small GPT equal Opacus' (float32): {check}."
        + (f"\nABLATED ({args.ablate}): a cost decomposition only, the norms are wrong." if args.ablate else "")
        + "\n"
    )
    print(table(rows))
    load_after = os.getloadavg()
    print(
        "\nMeasured / idle neighbours: each measured step over the mean of its idle neighbours (same fit)."
        " Idle / plain: median idle step of a fit over the mean of the median steps of the plain fits before and"
        " after it. Measured / plain (est.): product of the two medians. Median [q1, q3] (samples)."
        f"\nTotal runtime {time.perf_counter() - started:.0f} s; 1-minute load average {load_before[0]:.2f} before,"
        f" {load_after[0]:.2f} after."
    )


if __name__ == "__main__":
    main()
