"""Small batches of one example: per-example gradient norms from layer inputs and output gradients."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns.sources.base import GradNormSource
from lightning_gns.sources.per_example_factors import (
    Dense,
    Factor,
    Materialized,
    OneHot,
    _f32,
    factor_inner,
    factor_sq_norm,
)

Layers = Literal["all", "norm"]
NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, *NORM_LAYERS)


def is_supported(module: nn.Module, layers: Layers = "all") -> bool:
    """Whether the per-example source can measure this module's parameters."""
    if layers == "norm":
        return isinstance(module, NORM_LAYERS)
    if isinstance(module, nn.Embedding):
        return not (module.sparse or module.max_norm is not None or module.scale_grad_by_freq)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros" and _conv_padding(module) is not None
    return isinstance(module, SUPPORTED_LAYERS)


def layer_factors(module: nn.Module, inp: Tensor, grad_out: Tensor) -> dict[str, Factor]:
    """Factored per-example gradients of ``module``'s parameters, keyed by parameter name."""
    batch = grad_out.shape[0]
    if isinstance(module, nn.Linear):
        delta = grad_out.reshape(batch, -1, grad_out.shape[-1])
        factors: dict[str, Factor] = {"weight": Dense(delta, inp.reshape(batch, -1, inp.shape[-1]))}
        if module.bias is not None:
            factors["bias"] = Materialized(delta.sum(dim=1))
        return factors
    if isinstance(module, nn.Embedding):
        index = inp.reshape(batch, -1)
        delta = grad_out.reshape(batch, index.shape[1], -1)
        if module.padding_idx is not None:  # the padding row receives no gradient
            delta = delta * (index != module.padding_idx).unsqueeze(-1)
        return {"weight": OneHot(index, delta)}
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return _norm_factors(module, inp, grad_out)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _conv_factors(module, inp, grad_out)
    raise TypeError(f"unsupported layer {type(module).__name__}")


def _norm_factors(module: nn.LayerNorm | nn.RMSNorm, inp: Tensor, grad_out: Tensor) -> dict[str, Factor]:
    dims = tuple(range(-len(module.normalized_shape), 0))
    x = _f32(inp)
    # The normalised input, recomputed by the same fused kernels the layer uses (torch.var_mean is several
    # times slower than the whole layer_norm kernel on CPU).
    if isinstance(module, nn.LayerNorm):
        normalized = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    else:
        eps = module.eps if module.eps is not None else torch.finfo(inp.dtype).eps
        normalized = F.rms_norm(x, module.normalized_shape, eps=eps)
    batch = grad_out.shape[0]
    width = normalized.shape[-len(dims) :].numel()
    delta = _f32(grad_out).reshape(batch, -1, width)
    factors: dict[str, Factor] = {}
    if module.weight is not None:
        factors["weight"] = Materialized((delta * normalized.reshape(batch, -1, width)).sum(dim=1))
    if getattr(module, "bias", None) is not None:
        factors["bias"] = Materialized(delta.sum(dim=1))
    return factors


def _conv_padding(module: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    if isinstance(module.padding, tuple):
        return module.padding
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    # "same": symmetric only when every dimension's total padding is even.
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    return tuple(p // 2 for p in total) if all(p % 2 == 0 for p in total) else None


def _conv_factors(module: nn.Conv1d | nn.Conv2d, inp: Tensor, grad_out: Tensor) -> dict[str, Factor]:
    padding = _conv_padding(module)
    assert padding is not None
    batch = grad_out.shape[0]
    kernel: tuple[int, ...] = module.kernel_size
    dilation: tuple[int, ...] = module.dilation
    stride: tuple[int, ...] = module.stride
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution of height 1
        inp, grad_out = inp.unsqueeze(-2), grad_out.unsqueeze(-2)
        kernel, dilation, padding, stride = (1, kernel[0]), (1, dilation[0]), (0, padding[0]), (1, stride[0])
    patches = F.unfold(inp, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C*k, L)
    delta = grad_out.reshape(batch, grad_out.shape[1], -1)  # (B, out, L)
    factors: dict[str, Factor] = {"weight": Dense(delta.transpose(1, 2), patches.transpose(1, 2))}
    if module.bias is not None:
        factors["bias"] = Materialized(delta.sum(dim=2))
    return factors


class PerExampleSource(GradNormSource):
    """Per-example gradient norms of the supported layers' parameters (``B_small = 1``).

    A forward hook on every supported layer (``nn.Linear`` on 2-D or sequence inputs, ``nn.Embedding``,
    ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.Conv1d``/``nn.Conv2d``) keeps a reference to the layer input and
    hooks the layer output; when the output's gradient arrives in backward, the per-example squared norms
    of the layer's parameter gradients are computed from input and output gradient, without forming
    ``.grad``-sized per-example tensors where the Gram form is cheaper. Parameters used more than once
    (tied embeddings, a module called twice) get exact cross terms. Gradients of the per-example *share*
    of the batch loss are reported; the caller rescales them to per-example losses.

    Parameters no supported layer produces are not covered; :meth:`covered_params` lists those that are,
    and the big-batch norm must be taken over the same parameters.
    """

    name = "per_example"

    def __init__(self, layers: Layers = "all") -> None:
        super().__init__()
        self.layers = layers
        self._param_owner: dict[int, str] = {}  # parameter id -> name of the first layer owning it
        # Module id -> its measured (name, parameter) pairs, as registered at attach. Looked up by module
        # rather than read from the module in forward: FSDP2 (fully_shard) swaps the registered sharded
        # parameters for unsharded tensors during forward, and the sharded ones are what .grad lives on.
        self._module_params: dict[int, list[tuple[str, nn.Parameter]]] = {}
        self._covered: dict[int, nn.Parameter] = {}
        # Per backward pass: per-example squared norms by parameter, pending uses and their factors.
        self._sq_norms: dict[int, Tensor] = {}
        self._pending_uses: dict[int, int] = defaultdict(int)
        self._stored_factors: dict[int, list[Factor]] = defaultdict(list)
        self.failed = False
        self.last_layer_sq_norms: dict[str, Tensor] = {}

    def attach(self, model: nn.Module, params: Iterable[nn.Parameter]) -> None:  # type: ignore[override]
        self.detach()
        wanted = {id(p) for p in params}
        for module_name, module in model.named_modules():
            if not is_supported(module, self.layers):
                continue
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) in wanted]
            if not own:
                continue
            for _, p in own:
                self._param_owner.setdefault(id(p), module_name or type(module).__name__)
            self._module_params[id(module)] = own
            self._handles.append(module.register_forward_hook(self._on_forward))

    def covered_params(self) -> list[nn.Parameter]:
        """Parameters that have received per-example norms so far."""
        return list(self._covered.values())

    def owner(self, param: nn.Parameter) -> str:
        """Name of the layer a covered parameter is reported under (its first owner for tied weights)."""
        return self._param_owner[id(param)]

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (self.recording and isinstance(output, Tensor) and output.requires_grad and args):
            return
        inp = args[0]
        params = self._module_params.get(id(module), [])
        for _, p in params:
            self._pending_uses[id(p)] += 1
        output.register_hook(partial(self._on_output_grad, module, inp.detach(), params))

    def _on_output_grad(
        self, module: nn.Module, inp: Tensor, params: list[tuple[str, nn.Parameter]], grad_out: Tensor
    ) -> None:
        try:
            factors = layer_factors(module, inp, grad_out.detach())
            for param_name, param in params:
                if param_name in factors:
                    self._add(param, factors[param_name])
        except (NotImplementedError, RuntimeError):
            # A combination we cannot measure exactly: report the step as unmeasurable, never a wrong value.
            self.failed = True

    def _add(self, param: nn.Parameter, factor: Factor) -> None:
        key = id(param)
        sq = factor_sq_norm(factor)
        for earlier in self._stored_factors[key]:
            sq = sq + 2 * factor_inner(earlier, factor)
        self._sq_norms[key] = self._sq_norms[key] + sq if key in self._sq_norms else sq
        self._covered.setdefault(key, param)
        self._pending_uses[key] -= 1
        if self._pending_uses[key] > 0:  # more uses of this parameter will arrive in this backward
            self._stored_factors[key].append(factor)
        else:
            self._stored_factors.pop(key, None)

    def pop_norms(self) -> Tensor | None:
        """Per-example norms over all covered parameters, shape (B,); NaN when the pass was unmeasurable.

        Also leaves the per-layer split in :attr:`last_layer_sq_norms` ({layer name: (B,)}).
        """
        sq_norms, failed = self._sq_norms, self.failed
        self._sq_norms, self.failed = {}, False
        self._pending_uses.clear()
        self._stored_factors.clear()
        self.last_layer_sq_norms = {}
        if not sq_norms:
            return None
        if failed or len({t.shape for t in sq_norms.values()}) != 1:
            # A use failed, or layers disagree on the batch dimension (a sequence-first layer).
            return torch.full((1,), float("nan"), device=next(iter(sq_norms.values())).device)
        for key, sq in sq_norms.items():
            name = self._param_owner[key]
            layer = self.last_layer_sq_norms
            layer[name] = layer[name] + sq if name in layer else sq
        return torch.stack(list(sq_norms.values())).sum(dim=0).sqrt()

    def detach(self) -> None:
        self._module_params = {}
        self._sq_norms = {}
        self._pending_uses.clear()
        self._stored_factors.clear()
        super().detach()
