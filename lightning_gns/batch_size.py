"""How many examples (or tokens) a batch holds."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

BatchSizeFn = Callable[[Any], "int | Tensor"]


def leading_dim_batch_size(batch: Any) -> int:
    """Length of the leading dimension of the first tensor found in ``batch`` (depth first).

    Handles a tensor, and (nested) lists, tuples, dicts and dataclass-like objects of tensors.

    Example:
        >>> import torch
        >>> leading_dim_batch_size({"x": torch.zeros(32, 5), "y": torch.zeros(32)})
        32
    """
    size = _first_leading_dim(batch)
    if size is None:
        raise ValueError(
            f"GradientNoiseScale could not find the batch size: no tensor with a leading dimension in a batch of"
            f" type {type(batch).__name__}. Pass batch_size_fn=..., a function that returns the number of"
            " examples (or tokens) in a batch, e.g. GradientNoiseScale(batch_size_fn=lambda batch: len(batch['ids']))."
        )
    return size


def _first_leading_dim(obj: Any) -> int | None:
    if isinstance(obj, Tensor):
        return int(obj.shape[0]) if obj.dim() > 0 else None
    if isinstance(obj, Mapping):
        children: Any = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = vars(obj).values()
    else:
        return None
    for child in children:
        size = _first_leading_dim(child)
        if size is not None:
            return size
    return None


def checked_batch_size(batch_size_fn: BatchSizeFn, batch: Any) -> int | Tensor:
    """Call ``batch_size_fn`` and insist on a positive integer, or an integer tensor of counts.

    A 1-D integer tensor holds one count per example (e.g. ``attention_mask.sum(dim=1)``); a 0-d integer
    tensor is the micro-batch's count. Tensors are returned as they are (reading them would synchronise
    with the device on every step).
    """
    value: Any = batch_size_fn(batch)
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"batch_size_fn returned a tensor of shape {tuple(value.shape)} and dtype {value.dtype}; return an"
                " int, a 0-d integer tensor (the micro-batch's examples or tokens), or a 1-D integer tensor with one"
                " count per example, e.g. attention_mask.sum(dim=1)."
            )
        if value.dim() == 1 and value.numel() == 0:
            raise ValueError(
                "batch_size_fn returned an empty tensor of counts: filter empty batches out of the dataloader."
            )
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, float):
            if not value.is_integer():
                raise TypeError
            size = int(value)
        else:
            size = operator.index(value)
    except TypeError:
        raise ValueError(
            f"batch_size_fn must return a positive int (examples or tokens in the batch) or an integer tensor of"
            f" counts, got {value!r} of type {type(value).__name__}. Return e.g. int(mask.sum()) for a token count,"
            " or mask.sum(dim=1) for one count per example."
        ) from None
    if size <= 0:
        raise ValueError(
            f"batch_size_fn must return a positive int (examples or tokens in the batch), got {size}."
            " An empty batch cannot be measured: filter empty batches out of the dataloader."
        )
    return size


def units_as_int(units: int | Tensor) -> int:
    """The micro-batch's total units as an int (reads a tensor: call it on steps that synchronise anyway)."""
    return int(units.sum()) if isinstance(units, Tensor) else units
