"""Where the examples lie in each tensor of a loss's graph, followed from the layer outputs that lead with them.

per_example takes a layer output's first dimension for the batch when it is as long as the batch. At ``T == B`` a
model that is time-major inside (transformers' FSMT and XLNet, hand-written ``x.transpose(0, 1)`` code) has
``(T, B, d)`` layer outputs of that shape: their first dimension is the sequence. Its attention then multiplies
along that dimension: ``q.view(T, B * heads, d).transpose(0, 1)`` puts it in the rows of a batched product whose
batch is ``B * heads``, a multiple of the batch, which the shape alone takes for "within each example". Followed
through reshapes, transposes, permutations and elementwise operations, the first dimension ends up in the
product's rows: a product that pairs what per_example takes for examples, so the layers are left out.

:func:`example_axis` gives the dimension of a node's output whose index tells the example (as the outer factor
of that dimension: ``B * heads`` rows, ``b * heads + h``), or None where it is not followed: an operation not
listed, a reshape that splits the examples or makes them an inner factor (a batch-first tensor transposed and
flattened, as ``nn.MultiheadAttention`` does inside), or several operands that disagree.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from lightning_gns.sources.per_example_rows import ORDER_KEEPING, RESHAPES, dim_index, operand_shape

Node = Any  # torch.autograd.graph.Node

_ELEMENTWISE = (ORDER_KEEPING - RESHAPES) | {"ExpandBackward0", "MaximumBackward0", "MinimumBackward0"}
_SAME_AXIS = frozenset({"SliceBackward0", "NarrowBackward0", "SplitBackward0", "SplitWithSizesBackward0"})
# Matrix products: the positions in next_functions of their two operands.
_PRODUCTS = {"MmBackward0": (0, 1), "AddmmBackward0": (1, 2), "BmmBackward0": (0, 1), "BaddbmmBackward0": (1, 2)}


def example_axis(
    node: Node, roots: set[Node], axes: dict[Node, int | None], carries: dict[Node, bool], examples: int
) -> int | None:
    """The dimension of ``node``'s output that holds the examples; ``roots``: the layer outputs (and, through
    ``node.variable``, inputs needing a gradient) that lead with them; ``axes``: the answer for every node below."""
    if node in roots:
        return 0
    variable = getattr(node, "variable", None)
    if variable is not None:
        leading = not isinstance(variable, nn.Parameter) and variable.dim() > 0 and variable.shape[0] == examples
        return 0 if leading else None
    metadata = node._input_metadata
    if len(metadata) == 0:
        return None
    out = tuple(metadata[0].shape)
    name = node.name()
    if name in _PRODUCTS:
        axis = _product_axis(node, axes, carries)
    else:
        carrying = [e for e in node.next_functions if e[0] is not None and carries.get(e[0])]
        found = {_moved(node, name, axes.get(e[0]), operand_shape(e), out, examples) for e in carrying}
        axis = found.pop() if len(found) == 1 else None
    return axis if axis is not None and axis < len(out) and out[axis] % examples == 0 else None


def _moved(
    node: Node, name: str, axis: int | None, shape: tuple[int, ...] | None, out: tuple[int, ...], examples: int
) -> int | None:
    """Where an operand's example dimension ``axis`` (of ``shape``) lies in the output ``out`` of ``node``."""
    if axis is None or shape is None or axis >= len(shape):
        return None
    rank = len(shape)
    if name in _ELEMENTWISE:  # broadcasting aligns from the right
        return axis + len(out) - rank
    if name in RESHAPES:
        return _reshaped(shape, axis, out, examples)
    if name in _SAME_AXIS:
        return axis
    if name == "TransposeBackward0":
        first, second = dim_index(node._saved_dim0, rank), dim_index(node._saved_dim1, rank)
        return second if axis == first else first if axis == second else axis
    if name == "TBackward0":
        return rank - 1 - axis
    if name == "PermuteBackward0":
        dims = [dim_index(d, rank) for d in node._saved_dims]
        return dims.index(axis)
    if name in ("SelectBackward0", "UnbindBackward0"):
        dim = dim_index(node._saved_dim, rank)
        return None if dim == axis else axis - (dim < axis)  # one example's slice: per_example_coupling's tags
    # Slices of another dimension put back together (torch.stack(h.unbind(1)), a cat of h[:, t:t + 1], h[:, idx],
    # a gather along the positions): a time-major tensor built without a transpose.
    if name == "StackBackward0":
        dim = dim_index(node._saved_dim, rank + 1)
        return axis + (dim <= axis)
    if name == "CatBackward0":
        return None if dim_index(node._saved_dim, rank) == axis else axis
    if name == "GatherBackward0":
        return None if dim_index(node._saved_dim, rank) == axis else axis
    if name == "IndexBackward0":
        picked = [k for k, index in enumerate(node._saved_indices) if index is not None]
        # Index tensors next to each other, all after the examples' dimension: the dimensions before stay put.
        adjacent = bool(picked) and picked == list(range(picked[0], picked[0] + len(picked)))
        return axis if adjacent and picked[0] > axis else None
    return None


def _reshaped(shape: tuple[int, ...], axis: int, out: tuple[int, ...], examples: int) -> int | None:
    """The output dimension whose outer factor the examples are after a reshape: the one that starts where the
    examples' dimension started in the flat order, its size a multiple of theirs (else they were made an inner
    factor, or split)."""
    before = math.prod(shape[:axis])
    prefix = 1
    for k, size in enumerate(out):
        if prefix == before and size % examples == 0:
            return k
        if prefix > before:
            return None
        prefix *= size
    return None


def _product_axis(node: Node, axes: dict[Node, int | None], carries: dict[Node, bool]) -> int | None:
    """A matrix product's output dimension that holds the examples, where one operand carries them: the batch
    or the rows of the first, the columns of the second (both carrying: a pairing, judged elsewhere)."""
    left, right = (node.next_functions[i] for i in _PRODUCTS[node.name()])
    batched = node.name() in ("BmmBackward0", "BaddbmmBackward0")
    left_axis = axes.get(left[0]) if left[0] is not None and carries.get(left[0]) else None
    right_axis = axes.get(right[0]) if right[0] is not None and carries.get(right[0]) else None
    if left_axis is not None and right_axis is None:
        return left_axis if left_axis < 1 + batched else None
    if right_axis is not None and left_axis is None:
        return right_axis if right_axis == 1 + batched or (batched and right_axis == 0) else None
    if batched and left_axis == right_axis == 0:
        return 0
    return None


def moves_examples_off_the_batch(node: Node, axes: dict[Node, int | None], carries: dict[Node, bool]) -> bool | None:
    """For a batched product of two operands that carry examples: whether an operand's examples are followed to
    a dimension other than the product's batch (True: it pairs them), to the batch in both (False), or not
    followed (None: the caller decides on the shape)."""
    left, right = (node.next_functions[i][0] for i in _PRODUCTS[node.name()])
    found = [axes.get(n) for n in (left, right) if n is not None and carries.get(n)]
    known = [a for a in found if a is not None]
    if not known:
        return None
    return any(a != 0 for a in known)
