"""``nn.Linear``, HF ``Conv1D`` and ``nn.LayerNorm`` with ``.grad`` and per-example gradients from one computation.

Autograd computes a Linear layer's weight gradient as ``delta^T x`` over all ``B T`` positions, which is the
sum over examples of the per-example gradients ``delta_i^T x_i``. Computed per example (one batched matmul)
and then summed over the batch, the same work gives ``.grad`` and every example's gradient, whose squared
norms cost one reduction more. The hook path instead lets autograd form the weight gradient and then
forms the per-example gradients (or their Gram form) a second time.

:class:`FusableForward` replaces a watched layer's ``forward`` (an instance attribute, removed on detach).
While the per-example source records and the layer's input is a batch of sequences for which the fused
form pays (:func:`fused_pays`), it runs :class:`LinearWithPerExampleGrads`; otherwise it is ``F.linear``, and the
source's hooks do what they always did. ``nn.LayerNorm`` gets the same treatment
(:class:`LayerNormWithPerExampleGrads`): its per-example weight gradient ``sum_t delta_t * xhat_t`` needs the
normalised input, which the hook path recomputes and the fused backward rebuilds from the mean and inverse
standard deviation the forward kept.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_gns.sources.base import HALF_PRECISION

# Above this many per-example weight-gradient elements (B x d_out x d_in) the fused form is used only where
# the hook path would materialise the same tensor anyway (see fused_pays).
FUSED_MAX_ELEMENTS = 1 << 26


def fused_pays(batch: int, tokens: int, d_out: int, d_in: int) -> bool:
    """Whether one batched per-example matmul beats the weight-gradient matmul plus the hook path's norms.

    Per example the hook path costs the weight gradient's share ``T d_out d_in`` plus the cheaper of the
    materialised form (``T d_out d_in``) and the Gram form (``T^2 (d_out + d_in)``); the fused form costs the
    same matmul plus a sum and a norm over ``d_out d_in``. Single tokens (``T = 1``) have a closed form that
    costs nothing, and where the Gram form wins the fused form's (B, d_out, d_in) tensor must stay small.
    """
    if tokens < 2:
        return False
    per_example = d_out * d_in
    if tokens * (d_out + d_in) >= per_example:  # the hook path materialises (B, d_out, d_in) itself
        return True
    return per_example < tokens * tokens * (d_out + d_in) and batch * per_example <= FUSED_MAX_ELEMENTS


class PerExampleGradSink(Protocol):
    """What one fused call hands its per-example gradients to (see ``PerExampleSource``)."""

    examples: int | None  # set when the call's input is flattened rows (examples * k, ...) to regroup

    def deliver(self, weight: Tensor, bias: Tensor | None) -> None: ...


class LinearWithPerExampleGrads(torch.autograd.Function):
    """``F.linear`` whose backward forms each example's weight gradient once and hands it to ``call``.

    Inputs ``x`` (B, ..., d_in). The weight gradient is the batch sum of the per-example gradients (float32
    accumulation for half precision, rounded to the weight's dtype as autograd's matmul does).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, call: PerExampleGradSink, in_out: bool = False
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.call = call
        ctx.has_bias = bias is not None
        ctx.in_out = in_out
        # The arithmetic of F.linear on a contiguous input (addmm on the flattened rows) and of HF Conv1D's forward
        # (weight (in, out)), so outputs are bit-identical to theirs. Written into a tensor of the output's shape:
        # returned as a reshaped view of the 2-D product it would be a view made inside a custom Function, which
        # autograd forbids modifying in place (nn.ReLU(inplace=True) after the layer, h += x).
        features = weight.shape[1] if in_out else weight.shape[0]
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(*x.shape[:-1], features)
        matrix = weight if in_out else weight.t()
        if bias is not None:
            torch.addmm(bias, flat, matrix, out=out.view(-1, features))
        else:
            torch.mm(flat, matrix, out=out.view(-1, features))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight.t() if ctx.in_out else weight)
        batch = grad_out.shape[0]
        delta = grad_out.reshape(batch, -1, grad_out.shape[-1])
        inputs = x.reshape(batch, -1, x.shape[-1])
        # Laid out like the weight, so that cross terms with another use of the same parameter line up.
        if ctx.in_out:
            per_example = torch.bmm(inputs.transpose(1, 2), delta)  # (B, d_in, d_out)
        else:
            per_example = torch.bmm(delta.transpose(1, 2), inputs)  # (B, d_out, d_in)
        grad_w = _batch_sum(per_example, weight.dtype)
        per_example_bias = None
        if ctx.has_bias:
            per_example_bias = delta.sum(dim=1)
            grad_b = _batch_sum(per_example_bias, weight.dtype) if ctx.needs_input_grad[2] else None
        with torch.no_grad():
            ctx.call.deliver(per_example.detach(), None if per_example_bias is None else per_example_bias.detach())
        return grad_x, grad_w if ctx.needs_input_grad[1] else None, grad_b, None, None


class LayerNormWithPerExampleGrads(torch.autograd.Function):
    """``F.layer_norm`` whose backward hands each example's weight and bias gradients to ``call``.

    The input gradient comes from the same kernel as autograd's (``native_layer_norm_backward``, input only);
    the weight and bias gradients are the batch sums of the per-example ones, accumulated in float32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        normalized_shape: tuple[int, ...],
        eps: float,
        call: PerExampleGradSink,
    ) -> Tensor:
        out, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape, ctx.call = normalized_shape, call
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, mean, rstd = ctx.saved_tensors
        shape = ctx.normalized_shape
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad_out, x, shape, mean, rstd, weight, bias, [True, False, False]
            )[0]
        batch, width = grad_out.shape[0], math.prod(shape)
        delta = grad_out.reshape(batch, -1, width)
        # delta * (x - mean) * rstd in one temporary (float32, the statistics' dtype, for half inputs): each
        # fresh (B, T, width) buffer costs about as much as the arithmetic on it.
        product = x - mean
        product.mul_(rstd)
        per_example = product.reshape(batch, -1, width).mul_(delta).sum(dim=1)  # (B, width)
        per_example_bias = delta.sum(dim=1, dtype=per_example.dtype) if bias is not None else None
        grad_w = per_example.sum(dim=0).reshape(weight.shape).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = None
        if per_example_bias is not None and ctx.needs_input_grad[2]:
            grad_b = per_example_bias.sum(dim=0).reshape(bias.shape).to(bias.dtype)
        with torch.no_grad():
            ctx.call.deliver(per_example.detach(), None if per_example_bias is None else per_example_bias.detach())
        return grad_x, grad_w, grad_b, None, None, None


def _batch_sum(per_example: Tensor, dtype: torch.dtype) -> Tensor:
    if per_example.dtype in HALF_PRECISION:
        return per_example.sum(dim=0, dtype=torch.float32).to(dtype)
    return per_example.sum(dim=0)


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast would run ``F.linear`` in here, or None when it is off (or leaves ``x`` alone)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # As autocast does: floating-point tensors other than float64 are cast.
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def fused_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, call: PerExampleGradSink, in_out: bool = False
) -> Tensor:
    """``F.linear(x, weight, bias)`` through :class:`LinearWithPerExampleGrads`, casting as autocast would.

    ``in_out``: the weight is laid out (in, out), as HF ``Conv1D``'s, and the output is ``addmm(bias, x, W)``.
    """
    dtype = _autocast_dtype(x)
    if dtype is None:
        return LinearWithPerExampleGrads.apply(x, weight, bias, call, in_out)
    x_cast, weight_cast, bias_cast = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
    with torch.autocast(x.device.type, enabled=False):
        return LinearWithPerExampleGrads.apply(x_cast, weight_cast, bias_cast, call, in_out)


FUSABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm)


def hf_conv1d_class(module: nn.Module) -> type | None:
    """The ``transformers`` ``Conv1D`` class ``module`` is an instance of (GPT-2's linear layer), else None.

    Recognised by name, module path and shape (``nx``/``nf`` attributes, weight ``(nx, nf)``), so that
    ``transformers`` is never imported here.
    """
    for cls in type(module).__mro__:
        if cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers."):
            weight = getattr(module, "weight", None)
            nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
            if isinstance(weight, Tensor) and weight.dim() == 2 and tuple(weight.shape) == (nx, nf):
                return cls
            return None
    return None


class FusableForward:
    """A watched Linear's, HF Conv1D's or LayerNorm's ``forward`` while the per-example source is attached.

    ``owner.plan_fused(module, input)`` returns the call to deliver the per-example gradients to when this
    call should be fused, else None (then this is the layer's own forward). Holds the source weakly; a deep
    copy of the model keeps a forward that finds its module unwatched (the plain forward), and pickling stores
    the class's own ``forward``.
    """

    def __init__(self, module: nn.Module, owner: Any) -> None:
        self.module = module
        self._owner = weakref.ref(owner)
        self._plain = functools.partial(type(module).forward, module)

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if len(args) + len(kwargs) != 1:
            return self._plain(*args, **kwargs)  # not the one-input call these layers take: torch says what is wrong
        input = args[0] if args else next(iter(kwargs.values()))  # lin(input=x), Conv1D's conv(x=h)
        module = self.module
        owner = self._owner()
        if owner is not None and owner.recording:
            call = owner.plan_fused(module, input)
            if call is not None:
                # Tokens flattened to (B*k, ...): regrouped to (B, k, ...) for the call, and back afterwards.
                examples = call.examples
                x = input if examples is None else input.reshape(examples, -1, *input.shape[1:])
                if isinstance(module, nn.Linear):
                    output = fused_linear(x, module.weight, module.bias, call)
                elif hf_conv1d_class(module) is not None:
                    weight, bias = module.weight, module.bias
                    assert isinstance(weight, Tensor) and isinstance(bias, (Tensor, type(None)))
                    output = fused_linear(x, weight, bias, call, in_out=True)
                else:
                    assert isinstance(module, nn.LayerNorm)
                    output = LayerNormWithPerExampleGrads.apply(
                        x, module.weight, module.bias, tuple(module.normalized_shape), module.eps, call
                    )
                if examples is not None:
                    output = output.reshape(*input.shape[:-1], output.shape[-1])
                owner.fused_output = output
                return output
        return self._plain(input)

    def __reduce__(self) -> tuple[Any, ...]:
        return (functools.partial, (type(self.module).forward, self.module))


def runs_class_forward(module: nn.Module, kinds: tuple[type[nn.Module], ...]) -> bool:
    """Whether ``module`` is one of ``kinds`` (or an HF Conv1D) running that class's own ``forward``.

    Not a subclass's ``forward``, nor one set on the instance by someone else: ours while attached, or the
    class's forward bound as a partial, as a model pickled while attached comes back (see FusableForward), are.
    """
    kind: Any = next((k for k in kinds if isinstance(module, k)), None) or hf_conv1d_class(module)
    if kind is None or type(module).forward is not kind.forward:
        return False
    replaced = vars(module).get("forward")
    if replaced is None or isinstance(replaced, FusableForward):
        return True
    return isinstance(replaced, functools.partial) and replaced.func is kind.forward and replaced.args == (module,)


def can_fuse(module: nn.Module) -> bool:
    """Whether ``module`` is a Linear, HF Conv1D or LayerNorm running its class's own forward (not a subclass's)."""
    return runs_class_forward(module, FUSABLE)
