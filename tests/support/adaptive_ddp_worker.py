"""Runs one 2-process DDP fit on CPU (gloo) with AdaptiveBatchSize; launched by tests/test_adaptive.py.

Lightning's DDP launcher re-executes this script for the other rank, so it must be a script, not a test.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

# Run as a script: tests/ (the support package) and the repository root (lightning_gns) on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.batch_schedule import NoiseScaleStatistics
from lightning_gns.batch_size import leading_dim_batch_size
from support.adaptive_support import EstimateRecorder, RecordingRegression, scheduled_target
from support.models import LinearProblem, loader
from support.multiprocess import end_process, launched_children
from support.trainers import make_trainer

# 104 examples: 52 per rank, 13 micro-batches of 4 per rank per epoch.
WANTED = {2: 3, 5: 2, 8: 4}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rank-units", action="store_true", help="rank r counts r + 1 units per example")
    args = parser.parse_args()

    torch.set_num_threads(1)
    problem = LinearProblem(dim=5, seed=3)
    x, y = problem.sample(104, seed=4)
    calls = 0
    micro_batch_sizes: list[float] = []
    wanted = scheduled_target(WANTED)

    def target(stats: NoiseScaleStatistics) -> float:
        nonlocal calls
        calls += 1
        micro_batch_sizes.append(stats.micro_batch_size)
        return wanted(stats)

    adaptive = AdaptiveBatchSize(
        target=target,
        warmup_steps=2,
        min_steps_between_changes=1,
        check_every_n_steps=1,
        tolerance=0.0,
        monotonic=False,
        lr_scaling="linear",
        max_accumulation=8,
        max_growth=math.inf,
        min_samples=0,
        z=0.0,
    )

    def rank_units(batch: Any) -> int:  # ranks whose micro-batches hold other numbers of tokens
        return len(batch[0]) * (torch.distributed.get_rank() + 1)

    gns = GradientNoiseScale(beta=0.9, batch_size_fn=rank_units if args.rank_units else leading_dim_batch_size)
    estimates = EstimateRecorder(gns, z=1.0)
    trainer = make_trainer([gns, adaptive, estimates], devices=2, strategy="ddp", max_epochs=2)
    model = RecordingRegression(5, 0.05, problem.w)
    trainer.fit(model, loader(x, y, 4))
    result = {
        "history": adaptive.history,
        "steps": model.steps,
        "target_calls": calls,
        "global_step": trainer.global_step,
        "estimates": estimates.estimates,
        "intervals": estimates.intervals,
        "moments": gns.metric.estimate_moments.detach().cpu().clone(),
        "micro_batch_sizes": micro_batch_sizes,
        "last_micro_batch_size": adaptive.micro_batch_size,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out / f"rank{trainer.global_rank}.pt")
    end_process(launched_children(trainer))


if __name__ == "__main__":
    main()
