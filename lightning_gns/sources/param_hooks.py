"""Small batches from parameter gradient hooks: each micro-batch's gradient before it is accumulated."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from torch import Tensor, nn

from lightning_gns.sources.base import BackwardNorms, GradNormSource, fp32_norm


class ParamHookSource(GradNormSource):
    """Norm of each backward pass's gradient, read from ``param.register_hook``.

    A tensor hook on a leaf parameter receives the gradient that one backward pass produces for it
    (summed over every use of the parameter, so tied weights count once) before autograd adds it to
    ``.grad`` and before DDP all-reduces it. The hook computes a norm and keeps nothing else, so no
    gradient is copied or kept alive. Works on one device and, per rank, under DDP.

    A parameter whose hook fires twice between two :meth:`pop_backward` (``autograd.grad`` with respect to the
    parameters inside ``training_step``, or two backward passes per micro-batch) makes the micro-batch
    unmeasurable: the norm of a sum is not the sum of norms. :meth:`pop_backward` then returns NaN.
    """

    name = "param_hooks"

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[int] = set()
        self.failed: str | None = None

    def attach(self, params: Iterable[nn.Parameter]) -> None:
        self.detach()
        self._handles = [p.register_hook(partial(self._on_grad, i)) for i, p in enumerate(params) if p.requires_grad]

    def _on_grad(self, index: int, grad: Tensor) -> None:
        if not self.recording:
            return
        if index in self._seen:
            self.failed = "a parameter received two gradients in one micro-batch (a second backward or autograd.grad)"
        self._seen.add(index)
        self.record(fp32_norm(grad))

    def pop_backward(self) -> BackwardNorms | None:
        failed, self.failed = self.failed, None
        self._seen.clear()
        backward = super().pop_backward()
        if failed is not None and backward is not None:
            return BackwardNorms(torch.full_like(backward.sq_norms, float("nan")))
        return backward

    def detach(self) -> None:
        self._seen.clear()
        self.failed = None
        super().detach()
