"""Plain torch.distributed DDP (no Lightning) with GradientNoiseScaleTracker on 2 gloo processes.

Launched by tests/test_integrations.py: ``python tests/support/ddp_plain_worker.py OUT_DIR ACCUMULATION [uneven]``;
``uneven``: rank 0 lacks the last micro-batch, so its last window is one shorter than rank 1's.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

# Run as a script: tests/ (the support package) and the repository root (lightning_gns) on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gns import GradientNoiseScaleTracker
from support.models import LinearProblem, LinearRegression, loader
from support.multiprocess import end_process
from support.reference import MicroBatch


def run(rank: int, out: Path, accumulation: int, uneven: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)
    problem = LinearProblem(dim=5, seed=50)
    x, y = problem.sample(8 * 2 * accumulation * 6, seed=51)
    model = LinearRegression(problem).linear
    ddp_model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    tracker = GradientNoiseScaleTracker(beta=0.9)
    tracker.attach(model.parameters(), mode="ddp", ddp_model=ddp_model)
    batches = list(loader(x, y, 8))[rank::2]  # each rank its own half of the data
    if uneven and rank == 0:
        batches = batches[:-1]  # shards of unequal length
    seen: list[MicroBatch] = []
    for step, start in enumerate(range(0, len(batches), accumulation)):
        window = batches[start : start + accumulation]
        for i, (xb, yb) in enumerate(window):
            seen.append(MicroBatch(step, xb, yb, model.weight.detach().reshape(-1).clone(), accumulation))
            tracker.start_micro_batch(units=len(xb), accumulation=accumulation)
            # DDP all-reduces only on the window's last backward, as Lightning does.
            sync = i == len(window) - 1
            with contextlib.nullcontext() if sync else ddp_model.no_sync():
                loss = 0.5 * (ddp_model(xb).squeeze(-1) - yb).square().mean()
                (loss / accumulation).backward()
            tracker.end_micro_batch()
        tracker.measure_step()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(
        {"micro_batches": seen, "source": tracker.source, "g2": tracker.grad_sq_norm, "tr": tracker.trace_cov},
        out / f"rank{rank}.pt",
    )
    end_process()


if __name__ == "__main__":
    out_dir, accumulation = Path(sys.argv[1]), int(sys.argv[2])
    mp.spawn(run, args=(out_dir, accumulation, sys.argv[3:] == ["uneven"]), nprocs=2)
    end_process()
