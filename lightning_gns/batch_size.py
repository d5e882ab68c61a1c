"""How many examples (or tokens) a batch holds."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

BatchSizeFn = Callable[[Any], int]


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


def checked_batch_size(batch_size_fn: BatchSizeFn, batch: Any) -> int:
    """Call ``batch_size_fn`` and insist on a positive integer."""
    value: Any = batch_size_fn(batch)
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
            f"batch_size_fn must return a positive int (examples or tokens in the batch), got {value!r} of type"
            f" {type(value).__name__}. Return e.g. int(mask.sum()) for a token count."
        ) from None
    if size <= 0:
        raise ValueError(
            f"batch_size_fn must return a positive int (examples or tokens in the batch), got {size}."
            " An empty batch cannot be measured: filter empty batches out of the dataloader."
        )
    return size
