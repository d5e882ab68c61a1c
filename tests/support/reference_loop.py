"""Float64 per-example gradients by a loop over examples, for models torch.func's vmap cannot batch.

``nn.LSTM``/``nn.GRU`` have no vmap batching rule, and a transformers model's code paths under vmap are
not something to rely on. This reference backpropagates each example alone (a batch of one) through a
float64 copy of the model, then solves the estimator exactly as tests/reference_func.py does
(:func:`~tests.reference_func.step_estimate`). Independent of lightning_gns.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from support.reference_func import ExampleLoss, RecordedMicroBatch, reference_history


def loop_per_example_grads(
    model: nn.Module, params: dict[str, Tensor], example_loss: ExampleLoss, batch: Any, names: list[str]
) -> Tensor:
    """(B, P) float64 per-example gradients of ``example_loss`` w.r.t. the named parameters, flattened."""
    model64 = copy.deepcopy(model).double().train()
    examples = len(batch[0]) if isinstance(batch, (tuple, list)) else len(batch)

    def to64(t: Tensor) -> Tensor:
        return t.double() if t.is_floating_point() else t

    rows = []
    for i in range(examples):
        trainable = {n: params[n].clone().requires_grad_(True) for n in names}
        values = {**{n: t for n, t in params.items() if n not in trainable}, **trainable}
        one = tuple(to64(t[i : i + 1]) for t in batch) if isinstance(batch, (tuple, list)) else to64(batch[i : i + 1])
        loss = example_loss(lambda *a, values=values: functional_call(model64, values, a), one)  # type: ignore[misc]
        grads = torch.autograd.grad(loss, [trainable[n] for n in names], allow_unused=True)
        pairs = zip(names, grads, strict=True)
        rows.append(torch.cat([(torch.zeros_like(trainable[n]) if g is None else g).flatten() for n, g in pairs]))
    return torch.stack(rows)


def loop_reference_history(
    model: nn.Module,
    recorded: list[RecordedMicroBatch],
    example_loss: ExampleLoss,
    names: list[str],
    sizes_of: Callable[[Any], Tensor],
    beta: float,
) -> list[dict[str, float]]:
    """Bias-corrected EMAs per step over the parameters ``names`` (one process), as the callback should report."""
    return reference_history(
        model, recorded, example_loss, lambda step: names, sizes_of, beta, grads_of=loop_per_example_grads
    )
