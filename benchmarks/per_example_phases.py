"""Where a measured per_example step spends its extra time: forward, backward or the callback's hooks.

benchmarks/per_example_fit.py gives the whole step's ratio; this script splits it. In one Lightning fit of the
small GPT with ``GradientNoiseScale(mode="per_example", layers="all", measure_every_n_steps=2)``, two timing
callbacks, one before and one after ``GradientNoiseScale`` in the callback list, read this process's CPU time
(and its minor page faults) at every hook, so each phase of a step is timed: the forward (batch start to
``on_before_backward``), the backward (``on_before_backward`` to ``on_after_backward``) and the callback's own
hooks. Each phase's median over the measured steps is set against its median over the idle steps of the same
fits. ``--ablate NAME`` switches off part of the per-example work first (benchmarks/per_example_ablation.py).

Example: ``nice -n 5 python benchmarks/per_example_phases.py`` (about 40 s on one core); run it with
``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824`` to see the page faults' share.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import time
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import per_example_ablation as ablation  # noqa: E402
from per_example import Shape, stdlib_text_batches  # noqa: E402
from per_example_fit import MODELS, CyclingBatches, LanguageModel  # noqa: E402

from lightning_gns import GradientNoiseScale  # noqa: E402

HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step")
# phase -> (hook, timer) where it starts, (hook, timer) where it ends; timer 0 runs before GradientNoiseScale.
PHASES = {
    "forward": (("on_train_batch_start", 1), ("on_before_backward", 0)),
    "backward": (("on_before_backward", 1), ("on_after_backward", 0)),
    "callback hooks": None,  # the sum of GradientNoiseScale's hooks: from timer 0 to timer 1 in each
}


class HookClock(Callback):
    """Reads the CPU time and minor page faults at every hook in HOOKS, by step."""

    def __init__(self, which: int, readings: dict[tuple[int, str, int], tuple[float, int]]) -> None:
        self.which, self.readings = which, readings

    def _read(self, trainer: Trainer, hook: str) -> None:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.readings[(trainer.global_step, hook, self.which)] = (time.process_time(), faults)

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._read(trainer, "on_train_batch_start")

    def on_before_backward(self, trainer: Trainer, *args: Any) -> None:
        self._read(trainer, "on_before_backward")

    def on_after_backward(self, trainer: Trainer, *args: Any) -> None:
        self._read(trainer, "on_after_backward")

    def on_before_optimizer_step(self, trainer: Trainer, *args: Any) -> None:
        self._read(trainer, "on_before_optimizer_step")


def phases_of_fit(shape: Shape, steps: int, warmup: int) -> dict[tuple[str, bool], list[tuple[float, int]]]:
    """(phase, measured?) -> [(CPU ms, minor faults)] per step of one fit."""
    torch.manual_seed(0)
    readings: dict[tuple[int, str, int], tuple[float, int]] = {}
    gns = GradientNoiseScale(mode="per_example", layers="all", measure_every_n_steps=2)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=[HookClock(0, readings), gns, HookClock(1, readings)],
        logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    data = DataLoader(CyclingBatches(stdlib_text_batches(shape, count=4, seed=1), steps), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(LanguageModel(MODELS["small GPT"](shape)), data)
    out: dict[tuple[str, bool], list[tuple[float, int]]] = {}
    for step in range(warmup, steps):
        read = {(hook, which): readings[(step, hook, which)] for hook in HOOKS for which in (0, 1)}
        measured = step % 2 == 0
        for phase, span in PHASES.items():
            if span is None:
                pairs = [(read[(hook, 0)], read[(hook, 1)]) for hook in HOOKS]
            else:
                pairs = [(read[span[0]], read[span[1]])]
            ms = sum(end[0] - start[0] for start, end in pairs) * 1e3
            faults = sum(end[1] - start[1] for start, end in pairs)
            out.setdefault((phase, measured), []).append((ms, faults))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="steps per fit, warm-up included")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--ablate", choices=ablation.ABLATIONS, default=None)
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.ablate:
        ablation.apply(args.ablate)
    shape = Shape(4, 128, 4, 128, 16)
    samples: dict[tuple[str, bool], list[tuple[float, int]]] = {}
    for _ in range(args.fits):
        for key, values in phases_of_fit(shape, args.steps, args.warmup).items():
            samples.setdefault(key, []).extend(values)
    print(f"small GPT {shape}; {args.fits} fits of {args.steps} steps, CPU time; ablation: {args.ablate or 'none'}")
    print("| phase | measured step (ms) | idle step (ms) | measured - idle (ms) | minor faults, measured / idle |")
    print("|---|---:|---:|---:|---:|")
    for phase in PHASES:
        measured = statistics.median(ms for ms, _ in samples[(phase, True)])
        idle = statistics.median(ms for ms, _ in samples[(phase, False)])
        faults = " / ".join(f"{statistics.median(f for _, f in samples[(phase, m)]):.0f}" for m in (True, False))
        print(f"| {phase} | {measured:.2f} | {idle:.2f} | {measured - idle:+.2f} | {faults} |")


if __name__ == "__main__":
    main()
