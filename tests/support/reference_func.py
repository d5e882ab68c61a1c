"""Float64 per-example recomputation for arbitrary models, independent of lightning_gns.

Per-example gradients come from ``torch.func`` (vmap of grad) on a float64 copy of the model; the
estimator is solved as the 2x2 linear system of tests/support/reference.py on Lightning's gradient composition
(micro-batch loss = sum_i share_i * loss_i, divided by the accumulation k). Used on models where the
closed-form linear problem of tests/support/reference.py does not reach: transformers, padded tokens, unused or
unfrozen parameters.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from support.reference import ema_history

# (model, one example's batch with a leading dimension of 1) -> that example's mean loss (a scalar).
ExampleLoss = Callable[[nn.Module, Any], Tensor]


@dataclass
class RecordedMicroBatch:
    step: int
    batch: Any
    accumulation: int
    params: dict[str, Tensor] = field(default_factory=dict)


class BatchRecorder(Callback):
    """Keeps every training micro-batch, the model's float64 weights before it, and the metric per step."""

    def __init__(self, gns: Any, names: Iterable[str] | None = None) -> None:
        self.gns = gns
        self.names = None if names is None else set(names)
        self.micro_batches: list[RecordedMicroBatch] = []
        self.history: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        params = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}
        cloned = tuple(t.clone() for t in batch) if isinstance(batch, (tuple, list)) else batch.clone()
        self.micro_batches.append(
            RecordedMicroBatch(trainer.global_step, cloned, trainer.accumulate_grad_batches, params)
        )

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        metric = self.gns.metric
        self.history.append(
            {
                "step": trainer.global_step,
                "grad_sq_norm": float(metric.grad_sq_norm),
                "trace_cov": float(metric.trace_cov),
                "b_simple": float(metric.b_simple),
                "skipped": int(metric.skipped_steps),
            }
        )


def per_example_grads(
    model: nn.Module, params: dict[str, Tensor], example_loss: ExampleLoss, batch: Any, names: list[str]
) -> Tensor:
    """(B, P) float64 per-example gradients of ``example_loss`` w.r.t. the named parameters, flattened."""
    model64 = copy.deepcopy(model).double()
    wanted = {n: params[n] for n in names}
    fixed = {n: t for n, t in params.items() if n not in wanted}

    def one(trainable: dict[str, Tensor], example: Any) -> Tensor:
        unsqueezed = tuple(t.unsqueeze(0) for t in example) if isinstance(example, tuple) else example.unsqueeze(0)
        return example_loss(lambda *a: functional_call(model64, {**fixed, **trainable}, a), unsqueezed)

    def to64(t: Tensor) -> Tensor:
        return t.double() if t.is_floating_point() else t

    in_batch = tuple(to64(t) for t in batch) if isinstance(batch, (tuple, list)) else to64(batch)
    grads = vmap(grad(one), in_dims=(None, 0))(wanted, in_batch)
    return torch.cat([grads[n].flatten(1) for n in names], dim=1)


def step_estimate(grads: list[Tensor], sizes: list[Tensor], shares: list[Tensor], k: int) -> tuple[float, float]:
    """Unbiased (|G|^2, tr Sigma) of one step from each micro-batch's per-example gradients.

    ``grads[j]`` (B_j, P): example gradients of their own mean loss; ``sizes[j]`` their unit counts;
    ``shares[j]`` their shares of the micro-batch loss; ``k`` divides every share (accumulation x ranks).
    Examples without units are no small batch.
    """
    g = torch.cat(grads).numpy()
    b = torch.cat(sizes).double().numpy()
    coef = (torch.cat(shares).double() / k).numpy()
    keep = b > 0
    g, b, coef = g[keep], b[keep], coef[keep]
    accumulated = (coef[:, None] * g).sum(axis=0)
    system = np.array([[b.sum(), len(b)], [coef.sum() ** 2, (coef**2 / b).sum()]])
    observed = np.array([(b * (g * g).sum(axis=1)).sum(), accumulated @ accumulated])
    grad_sq_norm, trace_cov = np.linalg.solve(system, observed)
    return float(grad_sq_norm), float(trace_cov)


def reference_history(
    model: nn.Module,
    recorded: list[RecordedMicroBatch],
    example_loss: ExampleLoss,
    names_at: Callable[[int], list[str]],
    sizes_of: Callable[[Any], Tensor],
    beta: float,
    world_size: int = 1,
    grads_of: Callable[..., Tensor] | None = None,
) -> list[dict[str, float]]:
    """Bias-corrected EMAs per step, as the callback should report them.

    ``names_at(step)``: the parameters measured at that step; ``sizes_of(batch)``: each example's units (its
    share of the micro-batch loss is its units over their sum). Under DDP, pass every rank's micro-batches and
    the world size: the big batch is the average over ranks. ``grads_of`` computes the (B, P) float64
    per-example gradients (default :func:`per_example_grads`, vmap; a loop where vmap has no rule).
    """
    grads_of = per_example_grads if grads_of is None else grads_of
    by_step: dict[int, list[RecordedMicroBatch]] = defaultdict(list)
    for mb in recorded:
        by_step[mb.step].append(mb)
    estimates = []
    for step in sorted(by_step):
        names = names_at(step)
        grads, sizes, shares = [], [], []
        for mb in by_step[step]:
            grads.append(grads_of(model, mb.params, example_loss, mb.batch, names))
            size = sizes_of(mb.batch).double()
            sizes.append(size)
            shares.append(size / size.sum())
        estimates.append((step, *step_estimate(grads, sizes, shares, by_step[step][0].accumulation * world_size)))
    return ema_history(estimates, beta)


def assert_histories_match(got: list[dict[str, float]], want: list[dict[str, float]], rel: float = 1e-7) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert g["step"] == w["step"]
        for key in ("grad_sq_norm", "trace_cov", "b_simple"):
            assert g[key] == _approx(w[key], rel), (key, g["step"], g[key], w[key])


def _approx(value: float, rel: float) -> Any:
    import pytest

    return pytest.approx(value, rel=rel, abs=1e-12)
