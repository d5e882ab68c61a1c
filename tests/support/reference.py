"""Independent float64 recomputation of the callback's numbers from the raw batches it saw.

Deliberately shares no code with lightning_gns: gradients come from the linear model's closed form,
and the estimator is re-derived as a 2x2 linear system on Lightning's actual gradient composition
(accumulated gradient = sum over (rank, micro-batch) of g_i / (world_size * k), no normalisation).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from support.models import LinearProblem


@dataclass
class MicroBatch:
    step: int
    x: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor
    accumulation: int


def step_estimates(micro_batches: list[MicroBatch], world_size: int, per_example: bool = False) -> tuple[float, float]:
    """Unbiased (|G|^2, tr Sigma) for one optimizer step, in float64 numpy.

    The small batches are the micro-batches, or with ``per_example`` every example of every micro-batch.
    """
    grads, sizes, coefs = [], [], []
    k = micro_batches[0].accumulation
    for mb in micro_batches:
        x, y, w = mb.x.double().numpy(), mb.y.double().numpy(), mb.w.double().numpy()
        groups = [(x[i : i + 1], y[i : i + 1]) for i in range(len(y))] if per_example else [(x, y)]
        for xs, ys in groups:
            grads.append(xs.T @ (xs @ w - ys) / len(ys))
            sizes.append(float(len(ys)))
            # Each micro-batch loss is a mean over its examples, divided by k, averaged over ranks.
            coefs.append(len(ys) / len(y) / (world_size * k))
    coefs = np.array(coefs)
    accumulated = sum(c * g for c, g in zip(coefs, grads, strict=True))
    b = np.array(sizes)
    # E[sum b_i |g_i|^2] = sum(b) G2 + n T ;  E|accumulated|^2 = (sum c)^2 G2 + sum(c^2 / b) T
    system = np.array([[b.sum(), len(b)], [coefs.sum() ** 2, (coefs**2 / b).sum()]])
    observed = np.array([sum(bi * g @ g for bi, g in zip(b, grads, strict=True)), accumulated @ accumulated])
    grad_sq_norm, trace_cov = np.linalg.solve(system, observed)
    return float(grad_sq_norm), float(trace_cov)


def reference_run(
    micro_batches: list[MicroBatch], world_size: int, beta: float, per_example: bool = False
) -> list[dict[str, float]]:
    """Per optimizer step: the bias-corrected EMAs and their ratio, as the callback should report them."""
    by_step: dict[int, list[MicroBatch]] = defaultdict(list)
    for mb in micro_batches:
        by_step[mb.step].append(mb)
    # One small batch carries no information about the noise.
    steps = [s for s in sorted(by_step) if per_example or len(by_step[s]) * world_size >= 2]
    history = ema_history([(s, *step_estimates(by_step[s], world_size, per_example)) for s in steps], beta)
    for entry in history:
        entry["b_big"] = float(sum(len(mb.y) for mb in by_step[int(entry["step"])]))
    return history


def ema_history(estimates: Iterable[tuple[int, float, float]], beta: float) -> list[dict[str, float]]:
    """Per ``(step, |G|^2, tr(Sigma))`` estimate: the bias-corrected EMAs so far and their ratio ``B_simple``.

    ``B_simple`` reads a negative ``tr(Sigma)`` average as 0 and a non-positive ``|G|^2`` one as ``inf``.
    """
    g2_ema = trace_ema = weight = 0.0
    history: list[dict[str, float]] = []
    for step, g2, tr in estimates:
        g2_ema = beta * g2_ema + (1 - beta) * g2
        trace_ema = beta * trace_ema + (1 - beta) * tr
        weight = beta * weight + (1 - beta)
        g2_avg, tr_avg = g2_ema / weight, trace_ema / weight
        b_simple = max(tr_avg, 0.0) / g2_avg if g2_avg > 0 else math.inf
        history.append({"step": step, "grad_sq_norm": g2_avg, "trace_cov": tr_avg, "b_simple": b_simple})
    return history


def closed_form(problem: LinearProblem) -> dict[str, float]:
    return {"b_simple": problem.b_simple, "grad_sq_norm": problem.grad_sq_norm, "trace_cov": problem.trace_cov}
