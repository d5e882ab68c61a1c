"""Closed-form check: measured B_simple vs the linear-regression closed form, for every mode.

Linear regression with x ~ N(0, I_d), y = w*.x + s * N(0, 1), held at w = w* + d (learning rate 0):
B_simple = d + 1 + d s^2 / |d|^2 (see ../shared/notes/gns-theory.md). Each mode trains on fresh samples
and reports the bias-corrected EMA at the end. Runs the DDP modes on 2 CPU processes (gloo).

    python benchmarks/closed_form.py            # about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gns import GradientNoiseScale
from tests.support.models import LinearProblem, LinearRegression, loader

# (label, mode, devices, accumulate_grad_batches, micro-batch)
CONFIGS: list[tuple[str, str, int, int, int]] = [
    ("microbatch, k=2", "microbatch", 1, 2, 16),
    ("microbatch, k=4", "microbatch", 1, 4, 16),
    ("per_example, k=1", "per_example", 1, 1, 16),
    ("ddp (comm hook), 2 ranks, k=1", "ddp", 2, 1, 16),
    ("ddp (param hooks), 2 ranks, k=2", "ddp", 2, 2, 16),
    ("per_example, 2 ranks, k=1", "per_example", 2, 1, 16),
]


def measure(mode: str, devices: int, accumulate: int, micro_batch: int, steps: int, beta: float) -> dict[str, Any]:
    torch.set_num_threads(1)
    problem = LinearProblem(dim=8, noise_std=1.0, offset_norm=1.0, seed=0)
    x, y = problem.sample(micro_batch * accumulate * devices * steps, seed=1)
    gns = GradientNoiseScale(beta=beta, mode=mode)  # type: ignore[arg-type]
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        accumulate_grad_batches=accumulate,
        callbacks=[gns],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(LinearRegression(problem, lr=0.0), loader(x, y, micro_batch))
    return {
        "rank": trainer.global_rank,
        "source": gns.source,
        "closed_form": problem.b_simple,
        "b_simple": gns.b_simple,
        "trace_cov": gns.trace_cov,
        "closed_trace_cov": problem.trace_cov,
        "grad_sq_norm": gns.grad_sq_norm,
        "closed_grad_sq_norm": problem.grad_sq_norm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per configuration")
    parser.add_argument("--beta", type=float, default=0.998, help="EMA decay (the average spans ~1/(1-beta) steps)")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:  # one DDP configuration; Lightning re-executes this command for rank 1
        mode, devices, accumulate, micro_batch = json.loads(args.child)
        result = measure(mode, devices, accumulate, micro_batch, args.steps, args.beta)
        if result["rank"] == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return

    rows = []
    for label, mode, devices, accumulate, micro_batch in CONFIGS:
        if devices == 1:
            result = measure(mode, devices, accumulate, micro_batch, args.steps, args.beta)
        else:
            child = json.dumps([mode, devices, accumulate, micro_batch])
            command = [sys.executable, __file__, "--steps", str(args.steps), "--beta", str(args.beta), "--child", child]
            env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        rows.append((label, result))
        print(f"done: {label}", file=sys.stderr, flush=True)

    print(f"\nClosed form vs measured ({args.steps} optimizer steps each, beta={args.beta}, learning rate 0)\n")
    print("| mode | source | B_simple closed form | measured | error | tr(Sigma) error | abs(G)^2 error |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        err = r["b_simple"] / r["closed_form"] - 1
        tr_err = r["trace_cov"] / r["closed_trace_cov"] - 1
        g2_err = r["grad_sq_norm"] / r["closed_grad_sq_norm"] - 1
        print(
            f"| {label} | {r['source']} | {r['closed_form']:.2f} | {r['b_simple']:.2f} | {err:+.1%} |"
            f" {tr_err:+.1%} | {g2_err:+.1%} |"
        )


if __name__ == "__main__":
    main()
