"""Gradient norms of parameters that may be sharded (FSDP2 DTensors), and the work of one norm split over ranks."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
    """One fused norm pass per dtype; half-precision gradients are accumulated in float32, float64 kept."""
    wide = [g.dtype == torch.float64 for g in grads]
    if not any(wide):
        return list(torch._foreach_norm(grads, 2, dtype=torch.float32))
    if all(wide):
        return list(torch._foreach_norm(grads, 2))
    narrow_norms = iter(
        torch._foreach_norm([g for g, w in zip(grads, wide, strict=True) if not w], 2, dtype=torch.float32)
    )
    wide_norms = iter(torch._foreach_norm([g for g, w in zip(grads, wide, strict=True) if w], 2))
    return [next(wide_norms) if w else next(narrow_norms) for w in wide]


def is_dtensor(tensor: Tensor) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
