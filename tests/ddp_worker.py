"""Runs one 2-process DDP fit on CPU (gloo) and saves what each rank saw; launched by tests/test_ddp.py.

Lightning's DDP launcher re-executes this script for the other rank, so it must be a script, not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gns import GradientNoiseScale
from tests.models import LinearProblem, LinearRegression, loader
from tests.recording import Recorder


class UserCommHook(Callback):
    """Registers a comm hook of the user's own before GradientNoiseScale gets to, to force its fallback."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(state=None, hook=allreduce_hook)  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--beta", type=float, default=0.9)
    parser.add_argument("--dim", type=int, default=6)
    parser.add_argument("--user-comm-hook", action="store_true")
    parser.add_argument("--mode", default="auto")
    args = parser.parse_args()

    torch.set_num_threads(1)
    problem = LinearProblem(dim=args.dim, noise_std=1.0, seed=20)
    x, y = problem.sample(args.examples, seed=21)
    gns = GradientNoiseScale(beta=args.beta, mode=args.mode)
    recorder = Recorder(gns)
    callbacks: list[Any] = [UserCommHook()] if args.user_comm_hook else []
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        accumulate_grad_batches=args.accumulate,
        callbacks=[*callbacks, gns, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LinearRegression(problem, lr=args.lr), loader(x, y, args.batch_size))
    result = {
        "rank": trainer.global_rank,
        "mode": gns.mode,
        "source": gns.source,
        "micro_batches": recorder.micro_batches,
        "history": recorder.history,
        "b_simple": gns.b_simple,
        "grad_sq_norm": gns.grad_sq_norm,
        "trace_cov": gns.trace_cov,
        "closed_form_b_simple": problem.b_simple,
        "closed_form_trace_cov": problem.trace_cov,
        "closed_form_grad_sq_norm": problem.grad_sq_norm,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out / f"rank{trainer.global_rank}.pt")
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
