"""Switch off parts of the per-example source's work, to see where a measured step's cost goes.

For cost decomposition only: an ablated run's norms are wrong (zeros where work was switched off), so its
gradient noise scale means nothing. Each ablation is a monkeypatch of the installed package, applied in the
benchmark process before any fit (``benchmarks/per_example_fit.py --ablate NAME``):

* ``linear``: a fused Linear's backward computes the plain gradients (``mm`` over all positions, as autograd
  does) and hands the source zero per-example gradients: no per-example tensor, sum or norm;
* ``layernorm``: a fused LayerNorm's backward is autograd's own kernel (input, weight and bias gradients)
  and hands the source zeros;
* ``embedding``: embeddings are not measured (their forward hook returns at once);
* ``all-layers``: all three: what is left is the custom autograd functions, the source's bookkeeping and the
  callback's own work on a measured step;
* ``hooks``: nothing is fused and no forward hook records: the callback and tracker on a measured step that
  records nothing (the step is skipped as unmeasurable).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gns.sources import per_example, per_example_fused
from lightning_gns.sources.per_example_factors import Materialized

ABLATIONS = ("linear", "layernorm", "embedding", "all-layers", "hooks")
_zeros: dict[tuple[int, ...], Tensor] = {}


def _zeros_like_shape(*shape: int) -> Tensor:
    # One zero tensor per shape for the whole run, never written after: handing it over costs no traffic.
    if shape not in _zeros:
        _zeros[shape] = torch.zeros(shape)
    return _zeros[shape]


def _is_ours(t: Tensor | None) -> bool:
    return t is not None and _zeros.get(tuple(t.shape)) is t


def _plain_linear_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    x, weight = ctx.saved_tensors
    grad_x = grad_out.matmul(weight.t() if ctx.in_out else weight)
    flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
    flat_x = x.reshape(-1, x.shape[-1])
    grad_w = flat_x.t().mm(flat_grad) if ctx.in_out else flat_grad.t().mm(flat_x)
    grad_b = flat_grad.sum(0) if ctx.has_bias else None
    batch = grad_out.shape[0]
    bias_zeros = _zeros_like_shape(batch, grad_out.shape[-1]) if ctx.has_bias else None
    with torch.no_grad():
        ctx.call.deliver(_zeros_like_shape(batch, *weight.shape), bias_zeros)
    return grad_x, grad_w, grad_b, None, None


def _plain_layer_norm_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, bias, mean, rstd = ctx.saved_tensors
    mask = [True, True, bias is not None]
    grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
        grad_out, x, ctx.normalized_shape, mean, rstd, weight, bias, mask
    )
    zeros = _zeros_like_shape(grad_out.shape[0], math.prod(ctx.normalized_shape))
    with torch.no_grad():
        ctx.call.deliver(zeros, zeros if bias is not None else None)
    return grad_x, grad_w, grad_b, None, None, None


def apply(name: str) -> None:
    """Switch off the work ``name`` names (one of :data:`ABLATIONS`) for the rest of this process."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {ABLATIONS}")
    source = per_example.PerExampleSource
    if name in ("linear", "layernorm", "all-layers"):
        on_fused_grad = source._on_fused_grad

        def _on_fused_grad(self: Any, use: Any, weight: Tensor, bias: Tensor | None) -> None:
            # The zeros handed over get zero norms without a pass over them; real gradients go on as before.
            if not (self.recording and _is_ours(weight)):
                on_fused_grad(self, use, weight, bias)
                return
            use.fired = True
            for param_name, index in use.params:
                value = weight if param_name == "weight" else bias
                if value is not None and index not in self.excluded:
                    self._add(index, Materialized(value), _zeros_like_shape(value.shape[0]))

        source._on_fused_grad = _on_fused_grad  # type: ignore[method-assign]
    if name in ("linear", "all-layers"):
        per_example_fused.LinearWithPerExampleGrads.backward = staticmethod(_plain_linear_backward)  # type: ignore[method-assign]
    if name in ("layernorm", "all-layers"):
        per_example_fused.LayerNormWithPerExampleGrads.backward = staticmethod(_plain_layer_norm_backward)  # type: ignore[method-assign]
    if name in ("embedding", "all-layers", "hooks"):
        on_forward = source._on_forward
        skip_all = name == "hooks"

        def _on_forward(
            self: Any, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> None:
            if skip_all or isinstance(module, nn.Embedding):
                return
            on_forward(self, module, args, kwargs, output)

        source._on_forward = _on_forward  # type: ignore[method-assign]
    if name == "hooks":
        source.plan_fused = lambda self, module, inp: None  # type: ignore[method-assign]
