"""Which order the examples have in the rows each hooked layer sees, read from one micro-batch's autograd graph.

A model may reorder its examples between layers (``h[order]`` of a sort by length, put back with
``h[argsort(order)]`` after a layer). Each layer's per-example norms are exact, but they hold the examples in the
order that layer saw them. Where every layer sees the batch's own order nothing changes. Where one does not, two
things would be matched to the wrong examples: the per-example counts of ``batch_size_fn`` (in the batch's order),
and the cross terms of a weight used by two layer calls that see different orders.

The order of a node's output is tracked as ``None`` (the batch's own order), an index tensor ``o`` (row ``r``
holds example ``o[r]``), or :data:`UNKNOWN`. A reordering node (found by per_example_coupling) composes its
index onto the order of its input; any other node takes the order its inputs that carry examples agree on.
Orders are compared by value, on the judged micro-batch: a sort and its inverse compose to the batch's order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_gns.sources.per_example_rows import dim_index

Node = Any  # torch.autograd.graph.Node
UNKNOWN = "unknown order"
Order = Tensor | str | None


def agree(orders: Iterable[Order]) -> Order:
    """The order several inputs share; :data:`UNKNOWN` where they differ (rows of two orders combined)."""
    shared: Tensor | None = None
    batch_order = False
    for order in orders:
        if isinstance(order, str):
            return UNKNOWN
        if order is None or is_batch_order(order):
            batch_order = True
        elif shared is None:
            shared = order
        elif not torch.equal(shared, order):
            return UNKNOWN
    if shared is None:
        return None
    return UNKNOWN if batch_order else shared


def is_batch_order(order: Order) -> bool:
    """Whether ``order`` is the batch's own order (reads the index: on judged micro-batches only)."""
    if order is None:
        return True
    if isinstance(order, str):
        return False
    return torch.equal(order, torch.arange(order.numel(), device=order.device, dtype=order.dtype))


def reordered(node: Node, input_order: Order, examples: int) -> Order:
    """The order of the output of ``node``, a node that reorders the rows of its input along the batch."""
    index = row_index(node, examples)
    if index is None or isinstance(input_order, str):
        return UNKNOWN
    return index if input_order is None else input_order[index.to(input_order.device)]


def row_index(node: Node, examples: int) -> Tensor | None:
    """Which input row each output row of a reordering node takes (``out[r] = in[index[r]]``), or None if unknown."""
    name = node.name()
    index: Any = None
    if name == "IndexBackward0":
        index = node._saved_indices[0] if node._saved_indices else None
    elif name == "IndexSelectBackward0":
        index = node._saved_index
    elif name == "FlipBackward0":
        index = torch.arange(examples - 1, -1, -1)
    elif name == "RollBackward0" and node._saved_dims:
        rank = len(node._input_metadata[0].shape)
        dims = [dim_index(d, rank) for d in node._saved_dims]  # a negative dim is saved as unsigned 64-bit
        shift = next((_signed(s) for d, s in zip(dims, node._saved_shifts, strict=False) if d == 0), 0)
        index = (torch.arange(examples) - shift) % examples
    if not isinstance(index, Tensor) or index.dim() != 1 or index.numel() != examples or index.is_floating_point():
        return None
    return index.long()


def _signed(saved: Any) -> int:
    """A saved integer argument as signed (negative values read as unsigned 64-bit)."""
    value = int(saved)
    return value - (1 << 64) if value >= 1 << 63 else value
