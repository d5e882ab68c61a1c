"""Small batches from parameter gradient hooks: each micro-batch's gradient before it is accumulated."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from lightning_gns.sources.base import GradNormSource, fp32_norm


class ParamHookSource(GradNormSource):
    """Norm of each backward pass's gradient, read from ``param.register_hook``.

    A tensor hook on a leaf parameter receives the gradient that one backward pass produces for it
    (summed over every use of the parameter, so tied weights count once) before autograd adds it to
    ``.grad`` and before DDP all-reduces it. The hook computes a norm and keeps nothing else, so no
    gradient is copied or kept alive. Works on one device and, per rank, under DDP.
    """

    name = "param_hooks"

    def attach(self, params: Iterable[nn.Parameter]) -> None:
        self.detach()
        self._handles = [p.register_hook(self._on_grad) for p in params if p.requires_grad]

    def _on_grad(self, grad: Tensor) -> None:
        if self.recording:
            self.record(fp32_norm(grad))
