"""Fixed cost of ``GradientNoiseScaleTracker.measure_step``: the bookkeeping around the norm passes.

A model of ``--params`` small parameters (64 x 64 Linear layers: the gradient norm pass is a few
microseconds) is attached in ``microbatch`` and ``per_example`` mode; each timed call prepares the state two
recorded micro-batches would leave and calls ``measure_step`` (big-batch norms, packing, the metric's
``fold``). ``fold`` alone is timed too. Reported: the best of ``--repeats`` means over ``--calls`` calls,
microseconds, CPU, 1 thread.

Example: ``nice -n 10 python benchmarks/fixed_cost.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning_gns
from lightning_gns import GradientNoiseScaleTracker
from lightning_gns.estimators import SmallBatchSummary


def time_measure_step(mode: str, n_params: int, calls: int, repeats: int) -> float:
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(n_params // 2)])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    tracker = GradientNoiseScaleTracker(beta=0.9)
    tracker.attach(model.parameters(), mode=mode, model=model)  # type: ignore[arg-type]
    source = tracker._sources.per_example
    watched = len(source.params) if source is not None else 0

    def prepare() -> None:  # what two recorded micro-batches of 16 examples leave behind
        tracker._measuring_step, tracker._accumulation = True, 2
        sums = tracker._sums
        sums.backward_passes, sums.weight_sum = 2, 2.0
        sums.num_small_batches, sums.size_sum, sums.weight_sq_over_size_sum = (32 if watched else 2), 32, 2 / 16
        sums.size_weighted_sq_norm_sum = torch.rand(watched if watched else 1, dtype=torch.float64)
        sums.measured = (True,) * watched

    def mean_call() -> float:
        total = 0.0
        for _ in range(calls):
            prepare()
            start = time.perf_counter()
            tracker.measure_step()
            total += time.perf_counter() - start
        return total / calls

    mean_call()
    return min(mean_call() for _ in range(repeats)) * 1e6


def time_fold(calls: int, repeats: int) -> float:
    tracker = GradientNoiseScaleTracker(beta=0.9)
    packed = torch.rand(6, dtype=torch.float64) + 1

    def mean_call() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            tracker.metric.fold(SmallBatchSummary.from_stacked(packed[:5]), packed[5] * 1.0)
        return (time.perf_counter() - start) / calls

    mean_call()
    return min(mean_call() for _ in range(repeats)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=52, help="parameter tensors in per_example mode")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"lightning_gns from {os.path.dirname(lightning_gns.__file__)}; torch {torch.__version__}, 1 thread.\n")
    print("| call | microseconds |\n|---|---:|")
    microbatch = time_measure_step("microbatch", 6, args.calls, args.repeats)
    print(f"| measure_step, microbatch, 6 parameters | {microbatch:.0f} |")
    rows = time_measure_step("per_example", args.params, args.calls, args.repeats)
    print(f"| measure_step, per_example, {args.params} parameters | {rows:.0f} |")
    print(f"| of which metric.fold | {time_fold(args.calls, args.repeats):.0f} |")


if __name__ == "__main__":
    main()
