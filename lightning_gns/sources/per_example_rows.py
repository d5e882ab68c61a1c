"""Tokens flattened to ``(B*T, d)``: whether each example's rows stay together, read off the autograd graph.

A layer called on ``h.reshape(-1, d)`` (OPT's decoder layers do this before ``fc1``, ``fc2`` and
``final_layer_norm``) sees ``B*T`` rows, not ``B`` examples. Its gradient splits per example only if rows
``b*T ... (b+1)*T - 1`` all come from example ``b``. That holds when the tensor was reshaped, in row-major
order, from one whose leading dimension is the batch, and nothing on the way moved data across that order:
a reshape keeps the flat order, an elementwise op keeps every element where it was, and a permutation that
leaves the batch dimension first (Swin's window partition) moves elements only within each example's block.
It fails for a flatten of a sequence-first tensor (``h.transpose(0, 1).reshape(-1, d)``), whose rows are
grouped by position, and the shape alone cannot tell the two apart (at ``T == B`` not even the sizes differ).

:class:`FlattenedRows` therefore walks back from the layer's input through the autograd graph: every path must
pass only through reshapes and elementwise ops and end at an output of a hooked layer that had the batch
leading (or at a parameter, or a tensor that needs no gradient). Every such output must hold as many elements
as the input: elementwise ops never shrink a tensor, so an equal count also rules out a broadcast that spread
one example's elements over others. Anything else (a transpose, a gather, a reduction, an op not listed)
leaves the layer out, as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

Node = Any  # torch.autograd.graph.Node

# Backward nodes of reshapes: a tensor's elements in the same flat order, its shape changed (not in the graph).
RESHAPES = frozenset(
    {
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0", "SqueezeBackward0",
        "SqueezeBackward1", "SqueezeBackward2",
    }
)  # fmt: skip
# Backward nodes of ops that keep every element at its flat (row-major) position: reshapes, and elementwise
# ops (with a scalar, a parameter, or a tensor that needs no gradient, such as a dropout mask).
ORDER_KEEPING = RESHAPES | frozenset(
    {
        # copies
        "CloneBackward0", "ToCopyBackward0", "AliasBackward0",
        # elementwise arithmetic
        "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1",
        "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1", "DivBackward2", "NegBackward0",
        "PowBackward0", "SqrtBackward0", "RsqrtBackward0", "ExpBackward0", "LogBackward0", "AbsBackward0",
        # activations and dropout
        "ReluBackward0", "GeluBackward0", "SiluBackward0", "TanhBackward0", "SigmoidBackward0", "EluBackward0",
        "LeakyReluBackward0", "HardtanhBackward0", "HardswishBackward0", "HardsigmoidBackward0", "MishBackward0",
        "SoftplusBackward0", "ErfBackward0", "NativeDropoutBackward0", "ThresholdBackward0", "ClampBackward1",
        "ClampMinBackward0", "ClampMaxBackward0", "WhereBackward0", "MaskedFillBackward0",
    }
)  # fmt: skip
_ACCUMULATOR = "torch::autograd::AccumulateGrad"


def operand_shape(edge: tuple[Node, int]) -> tuple[int, ...] | None:
    """The shape of the tensor an edge of the graph carries (a leaf's, or the output's its node records)."""
    node, output = edge
    variable = getattr(node, "variable", None)
    if variable is not None:
        return tuple(variable.shape)
    metadata = node._input_metadata
    return tuple(metadata[output].shape) if output < len(metadata) else None


def dim_index(saved: Any, rank: int) -> int:
    """A dimension an autograd node saved (``_saved_dim``, ``_saved_dims``), in ``range(rank)``: a negative one
    (``transpose(-1, -2)``) reads as unsigned 64-bit, which ``% rank`` alone would map to a wrong dimension."""
    value = int(saved)
    return (value - (1 << 64) if value >= 1 << 63 else value) % rank


_MAX_NODES = 4096  # a walk this long is given up (the layer is left out): no model path needs it


class FlattenedRows:
    """One micro-batch's tensors whose leading dimension holds the examples in order, and the walk above.

    ``note_output`` records a hooked layer call's output (leading dimension the batch, or itself grouped);
    ``rows_per_example`` answers for a layer input of ``B*k`` rows. Cleared with :meth:`clear` after each
    backward pass.
    """

    def __init__(self) -> None:
        # grad_fn of a tensor known to hold the examples in order (batch-first, or grouped rows) -> its element count
        self._known: dict[Node, int] = {}
        # The same nodes -> the layers (ids) whose outputs that knowledge rests on: a layer later found to take its
        # examples in another dimension (at T == B a transposed (T, B, d) looks batch-first) takes its dependants
        # down with it.
        self._owners: dict[Node, frozenset[int]] = {}
        self.last_owners: frozenset[int] = frozenset()
        """The layers whose outputs the last successful :meth:`rows_per_example` walk ended at."""

    def clear(self) -> None:
        self._known.clear()
        self._owners.clear()
        self.last_owners = frozenset()

    def note_output(self, output: Tensor, owner: int | None = None, via: frozenset[int] = frozenset()) -> None:
        """A hooked layer call's output whose leading dimension is the batch, or whose rows were found grouped;
        ``owner``: the id of the layer that gave it, ``via``: the layers its own rows were traced to, if any."""
        node = output.grad_fn
        if node is not None:
            self._known[node] = output.numel()
            self._owners[node] = via if owner is None else via | {owner}

    def rows_per_example(self, inp: Tensor, examples: int) -> int | None:
        """``k`` if ``inp`` (leading dimension ``examples * k``, ``k > 1``) holds example ``b`` in rows
        ``b*k ... b*k + k - 1``, found through the graph; None if that cannot be shown."""
        rows = inp.shape[0] if inp.dim() > 1 else 0
        if rows <= examples or rows % examples or inp.grad_fn is None:
            return None
        count = inp.numel()
        if self._grouped(inp.grad_fn, count, examples):
            return rows // examples
        return None

    def _grouped(self, start: Node, count: int, examples: int) -> bool:
        """Whether every path back from ``start`` keeps the flat order and ends at a tensor known to hold the
        examples in order (and ``count`` elements), a parameter or nothing; at least one at an example's data."""
        state: dict[Node, int] = {}
        owners: set[int] = set()
        stack: list[tuple[Node, bool]] = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in state:
                continue
            if not expanded:
                leaf = self._leaf_state(node, count, examples)
                if leaf == _FAILS:
                    return False
                if leaf == _GROUPED:
                    owners.update(self._owners.get(node, ()))
                if leaf is not None:
                    state[node] = leaf
                    continue
                if len(state) + len(stack) > _MAX_NODES:
                    return False
                stack.append((node, True))
                stack.extend((f, False) for f, _ in node.next_functions if f is not None and f not in state)
                continue
            inputs = [state[f] for f, _ in node.next_functions if f is not None]
            state[node] = _GROUPED if _GROUPED in inputs else _CONSTANT
        if state[start] != _GROUPED:
            return False  # computed from parameters alone: no example's data to split
        # Each node that carries example data held ``count`` elements: no order-keeping op shrinks a tensor, and
        # the input holds ``count``. Later layers' walks stop there.
        found = frozenset(owners)
        for node, value in state.items():
            if value == _GROUPED:
                self._known.setdefault(node, count)
                self._owners.setdefault(node, found)
        self.last_owners = found
        return True

    def _leaf_state(self, node: Node, count: int, examples: int) -> int | None:
        """The state of a node the walk stops at, or None for an order-keeping op to walk through."""
        known = self._known.get(node)
        if known is not None:
            return _GROUPED if known == count else _FAILS
        name = node.name()
        if name == _ACCUMULATOR:
            variable = node.variable
            if isinstance(variable, nn.Parameter):
                return _CONSTANT  # a parameter holds no example's data
            # An input that needs a gradient: batch-first, as every layer input is taken to be.
            batch_first = variable.dim() > 0 and variable.shape[0] == examples and variable.numel() == count
            return _GROUPED if batch_first else _FAILS
        return None if name in ORDER_KEEPING or keeps_examples_apart(node) else _FAILS


_GROUPED, _CONSTANT, _FAILS = 1, 2, 3


def keeps_examples_apart(node: Node) -> bool:
    """A permutation that leaves the first dimension first (Swin's window partition, ``x.view(B, h, w, W, w, C)
    .permute(0, 1, 3, 2, 4, 5)``; a ``transpose`` or ``roll`` of other dimensions): it moves elements within each
    example's block of the flat order, never across blocks, so rows flattened afterwards stay grouped by example.
    Also a pad of nothing (a copy)."""
    name = node.name()
    if name == "ConstantPadNdBackward0":  # Swin pads to whole windows; a pad of nothing is a copy
        return not any(int(p) for p in node._saved_pad)
    if name not in ("PermuteBackward0", "TransposeBackward0", "RollBackward0"):
        return False
    metadata = node._input_metadata
    rank = len(metadata[0].shape) if len(metadata) == 1 else 0
    if rank == 0:
        return False
    if name == "PermuteBackward0":
        return dim_index(node._saved_dims[0], rank) == 0
    if name == "TransposeBackward0":
        return dim_index(node._saved_dim0, rank) != 0 and dim_index(node._saved_dim1, rank) != 0
    dims = node._saved_dims
    return bool(dims) and all(dim_index(d, rank) != 0 for d in dims)


def rows_selected_from(inp: Tensor, examples: int) -> tuple[int, ...] | None:
    """The shape of the tensor whose rows ``inp`` picked, if its ``examples`` rows are a selection from one whose
    leading dimension is not the batch's (tokens routed to a mixture-of-experts expert, ``flat[sel]`` of the
    ``B*T`` tokens; ``h[mask]`` of a ``(B, T)`` token mask), found through reshapes and elementwise ops; else None.

    As many rows as examples there is a coincidence: the rows are tokens (or table rows), not the examples. Pooling
    one row per example (``h[torch.arange(B), last]``) picks from a batch-first tensor and is no such selection.
    The walk follows the input's rows back through the ops that keep them rows (see :func:`_operand_rows`):
    capacity padding (``F.pad``, ``cat`` with zeros, ``buf[:n] = picked``, ``index_copy``), a chunk of a sorted
    dispatch (``split``, slices), ``unsqueeze``/``view`` of later axes, transposes that put them back.
    """
    for node, row_dim in _row_walk(inp):
        if row_dim != _new_axes(node):
            continue  # the rows here are not the pick's rows
        source = _selected_source(node)
        if source is None or _looks_up_a_table(node):
            continue
        if source[:1] != (examples,) or _token_mask(node):
            return source
    return None


# Ops whose operands' rows are (a subset of) the output's rows, in the same dimension: pads, concatenations, slices
# and chunks, and copies into a buffer (capacity padding of a mixture-of-experts dispatch).
_ROWS_KEPT = frozenset(
    {
        "ConstantPadNdBackward0", "CatBackward0", "SliceBackward0", "NarrowBackward0", "SplitBackward0",
        "SplitWithSizesBackward0", "IndexCopyBackward0", "torch::autograd::CopySlices",
        "torch::autograd::CopyBackwards",
    }
)  # fmt: skip


def _row_walk(inp: Tensor) -> Iterator[tuple[Node, int]]:
    """The nodes ``inp``'s rows come from, each with the dimension of its output that holds them, up to a bounded
    number."""
    start = inp.grad_fn
    # (node, which of its outputs, the dimension of that output holding the rows)
    stack: list[tuple[Node, int, int]] = [(start, inp.output_nr, 0)] if start is not None and inp.dim() > 0 else []
    seen: set[tuple[Node, int, int]] = set()
    while stack and len(seen) < _MAX_SELECTION_WALK:
        node, output, row_dim = stack.pop()
        if (node, output, row_dim) in seen:
            continue
        seen.add((node, output, row_dim))
        yield node, row_dim
        metadata = node._input_metadata
        if output >= len(metadata):
            continue
        out = tuple(metadata[output].shape)
        for edge in node.next_functions:
            if edge[0] is None:
                continue
            shape = operand_shape(edge)
            found = None if shape is None else _operand_rows(node, row_dim, out, shape)
            if found is not None:
                stack.append((edge[0], edge[1], found))


def _operand_rows(node: Node, row_dim: int, out: tuple[int, ...], shape: tuple[int, ...]) -> int | None:
    """The dimension of an operand (of ``shape``) that gives the rows in ``row_dim`` of ``node``'s output ``out``,
    or None where they are not rows of it (a broadcast, a reduction, an op not listed)."""
    name = node.name()
    if row_dim >= len(out):
        return None
    if name in ORDER_KEEPING - RESHAPES:  # elementwise: broadcasting aligns from the right
        dim = row_dim - (len(out) - len(shape))
        return dim if dim >= 0 and shape[dim] == out[row_dim] else None
    if name in RESHAPES:  # the rows stay a dimension of their own where the sizes before them match
        before, prefix = math.prod(out[:row_dim]), 1
        for k, size in enumerate(shape):
            if prefix == before and size == out[row_dim]:
                return k
            prefix *= size
        return None
    if name in _ROWS_KEPT:
        return row_dim if len(shape) == len(out) else None
    rank = len(out)
    if name == "TBackward0" and rank == 2:
        return 1 - row_dim
    if name == "TransposeBackward0":
        first, second = dim_index(node._saved_dim0, rank), dim_index(node._saved_dim1, rank)
        return second if row_dim == first else first if row_dim == second else row_dim
    if name == "PermuteBackward0":
        return dim_index(node._saved_dims[row_dim], rank)
    return None


def _looks_up_a_table(node: Node) -> bool:
    """Whether a pick reads rows of a parameter (through casts) with ids that are the same in every row: positions
    repeated for each example (``weight[position_ids]`` with ids of shape ``(B, T)``, as transformers' Whisper
    repeats them), which give every example the same rows, as a broadcast would. Ids that differ from row to row
    may be tokens picked for an expert (expert-choice routing with as many experts as examples): their rows are
    no examples, and the pick still counts as a selection. Reads the ids (judged once per layer)."""
    following = node.next_functions[0][0] if node.next_functions else None
    while following is not None and following.name() == "ToCopyBackward0":
        following = following.next_functions[0][0]
    if following is None or not hasattr(following, "variable"):
        return False
    ids = _picking_index(node)
    return ids is not None and ids.dim() > 1 and bool((ids == ids[:1]).all())


def _picking_index(node: Node) -> Tensor | None:
    """The index a row pick (IndexBackward0, IndexSelectBackward0, GatherBackward0) used along its first dimension."""
    name = node.name()
    if name == "IndexBackward0":
        indices, skipped = node._saved_indices, _new_axes(node)
        index = indices[skipped] if skipped < len(indices) else None
        return index if isinstance(index, Tensor) else None
    if name == "IndexSelectBackward0":
        return node._saved_index
    if name == "GatherBackward0":
        return node._saved_index
    return None


_MAX_SELECTION_WALK = 64  # a layer's input is a few reshapes and elementwise ops from a selection, if any


def _walk_back(inp: Tensor) -> Iterator[Node]:
    """The nodes ``inp`` is computed from through reshapes and elementwise ops, each once (and the first other op
    on each path), up to a bounded number."""
    start = inp.grad_fn
    stack: list[Node] = [start] if start is not None else []
    seen: set[Node] = set()
    while stack and len(seen) < _MAX_SELECTION_WALK:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        if node.name() in ORDER_KEEPING:
            stack.extend(f for f, _ in node.next_functions if f is not None)


def rows_reached(inp: Tensor, examples: int, rowless: dict[Node, str]) -> str | None:
    """Where ``inp``'s rows come from, if not from the examples, found through reshapes and elementwise ops: from
    one example's slice (``f(h[i])`` in a loop over the examples, whose rows are that example's positions, as many
    as the examples at ``T == B``; ``h.unbind(0)``) of a tensor led by them: ``"one example's slice"``; from the
    output of a layer whose rows are no examples (a second layer of an expert given picked tokens): the reason
    ``rowless`` keeps for that output's node; else None."""
    for node in _walk_back(inp):
        # As many dimensions as the input: the rows themselves, not a table or a slice broadcast over them.
        same_rank = bool(node._input_metadata) and len(node._input_metadata[0].shape) == inp.dim()
        if node in rowless and same_rank:
            return rowless[node]
        if same_rank and _one_example_slice(node, examples):
            return "one example's slice"
    return None


def _one_example_slice(node: Node, examples: int) -> bool:
    """A ``select`` or ``unbind`` along the first dimension of a tensor with as many rows as examples."""
    name = node.name()
    if name == "SelectBackward0":
        sizes = tuple(node._saved_self_sym_sizes)
        return len(sizes) > 1 and sizes[0] == examples and dim_index(node._saved_dim, len(sizes)) == 0
    if name == "UnbindBackward0":
        metadata = node._input_metadata
        rank = len(metadata[0].shape) + 1 if metadata else 0
        return len(metadata) == examples and rank > 1 and dim_index(node._saved_dim, rank) == 0
    return False


def _selected_source(node: Node) -> tuple[int, ...] | None:
    """The shape a row-picking op (along the first dimension) picked from, or None for any other op."""
    name = node.name()
    if name == "IndexBackward0":
        indices, skipped = node._saved_indices, _new_axes(node)
        picked = skipped < len(indices) and isinstance(indices[skipped], Tensor)
        return tuple(node._saved_self_sym_sizes)[skipped:] if picked else None
    if name == "IndexSelectBackward0" and dim_index(node._saved_dim, len(node._saved_self_sym_sizes)) == 0:
        return tuple(node._saved_self_sym_sizes)
    if name == "GatherBackward0" and dim_index(node._saved_dim, node._saved_self.dim()) == 0:
        return tuple(node._saved_self.shape)
    return None


def _new_axes(node: Node) -> int:
    """How many leading axes of size one an index added before the one that picks (``flat[None, idx]``, as
    transformers' Switch Transformers routes tokens to an expert: torch unsqueezes, then indexes past them)."""
    if node.name() != "IndexBackward0":
        return 0
    sizes, count = tuple(node._saved_self_sym_sizes), 0
    for index in node._saved_indices:
        if index is not None or count >= len(sizes) or sizes[count] != 1:
            break
        count += 1
    return count


def _token_mask(node: Node) -> bool:
    """A boolean mask over more than the batch dimension (``h[mask]`` with ``mask`` of shape ``(B, T)``)."""
    if node.name() != "IndexBackward0":
        return False
    indices, skipped = node._saved_indices, _new_axes(node)
    first = indices[skipped] if skipped < len(indices) else None
    return isinstance(first, Tensor) and first.dtype == torch.bool and first.dim() > 1
