"""Gradient norms of parameters that may be sharded (FSDP2 DTensors), and the work of one norm split over ranks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gns.sources.base import norm_values, reduction_dtype

try:  # public since torch 2.5; FSDP2's parameters and gradients are DTensors
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - older torch, or built without distributed
    _DTensor = None  # type: ignore[assignment,misc]


def balanced_share(params: list[nn.Parameter], world_size: int, rank: int) -> list[nn.Parameter]:
    """This rank's parameters when the work of one norm is split evenly by size (same on every rank)."""
    if world_size <= 1:
        return list(params)
    loads = [0] * world_size
    share: list[nn.Parameter] = []
    for index in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        loads[owner] += params[index].numel()
        if owner == rank:
            share.append(params[index])
    return share


def param_sq_norms(params: list[nn.Parameter], device: torch.device, sharded: bool = True) -> Tensor:
    """Squared gradient norm of each parameter (0 where there is no gradient), float64, shape (len(params),).

    ``sharded=False`` promises no DTensor gradients (their local shards are then not looked up).
    """
    # A DTensor gradient's local shard: a norm of the DTensor itself would all-reduce once per parameter.
    grads = [p.grad for p in params if p.grad is not None]
    if sharded:
        grads = [local(g) for g in grads]
    if not grads:
        return torch.zeros(len(params), dtype=torch.float64, device=device)
    norms = fused_norms(grads)
    if len(grads) == len(params) and len({n.dtype for n in norms}) == 1:
        # One stack and one conversion instead of one conversion per parameter (the same float64 values).
        return torch.stack(norms).to(device=device, dtype=torch.float64).square()
    remaining = iter(norms)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    per_param = [next(remaining) if p.grad is not None else zero for p in params]
    return torch.stack([n.to(device=device, dtype=torch.float64) for n in per_param]).square()


def fused_norms(grads: list[Tensor]) -> list[Tensor]:
    """Each gradient's norm, one fused pass per dtype they are accumulated in (:func:`reduction_dtype`)."""
    grads = [norm_values(g) for g in grads]
    dtypes = [reduction_dtype(g.dtype) or g.dtype for g in grads]
    if len(set(dtypes)) == 1:
        return list(torch._foreach_norm(grads, 2, dtype=dtypes[0]))
    norms: list[Tensor] = list(grads)
    for dtype in set(dtypes):
        group = [i for i, d in enumerate(dtypes) if d == dtype]
        for i, norm in zip(group, torch._foreach_norm([grads[i] for i in group], 2, dtype=dtype), strict=True):
            norms[i] = norm
    return norms


def is_dtensor(tensor: Tensor) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
