"""Losses (and models) that compare the examples of a batch with each other, found in the autograd graph.

Per-example gradients are samples of the gradient noise only when the loss is a sum of one term per example.
A contrastive loss with in-batch negatives is not: CLIP's and SimCLR's similarity matrix (``a @ b.T``), Barlow
Twins' and VICReg's correlations over the batch (``a.T @ b``), a triplet loss that mines negatives with
``torch.cdist``. The gradient that reaches example ``i``'s activations then depends on the other examples, the
per-example split is of no independent samples, and ``B_simple`` would be silently wrong.

:func:`coupled_outputs` reads the graph of one micro-batch's loss before its backward pass. A matrix product
(or distance) of two operands that both carry examples' data pairs examples: an operand carries them when the
graph below it reaches a hooked layer's batch-first output, an input that needs a gradient, or a lookup of the
examples' tokens or labels in a raw parameter (:func:`_looks_up_examples`); a parameter does not, nor a layer
output whose input provably holds no examples, such as a positional table as long as the batch
(per_example_tables). A batched matrix product whose batch holds the examples (attention's ``(B * heads, T, T)``
scores) pairs positions within each example and is no coupling. Reported: every hooked layer output below a
pairing operation, after it in the forward (its input depends on several examples), or on a branch that joins
the path from it to the loss where the gradient depends on it (:func:`_coupled_branches`).
Two operands that are slices of the same example (a loop over the examples, ``x[i] @ x[i].T``) pair nothing;
one example's slice combined by any operation with another example's, or with a tensor computed from the
examples that is no one example's slice, pairs them (:func:`_slice_tags`): a recurrence over ``x[t]`` (an
``nn.LSTMCell`` loop, or the char-RNN tutorial's ``cat([x_t, h], 1)``, over a time-major batch counted by its
first dimension), unless the result is a scalar or the operation only puts the slices back together along the
batch (``torch.stack``, ``out[i] = ...``).
Examples are also coupled by broadcasting: an elementwise operation whose output leads with the batch and one
of whose operands, computed from the examples, has no dimension of its own for them (leading size one, or
fewer dimensions): a batch statistic (``z - z.mean(0)``, ``z / z.std(0)``, VICReg's variance term) or a view
moved off the batch (``z[:, None] - z[None]``, ``F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1)``).
A reduction along the batch dimension that leaves more than a scalar couples the examples too: a standard
deviation, norm or softmax over the batch always (VICReg's variance term ``relu(1 - z.std(0))``), a sum or mean
only where an operation whose derivative depends on its result follows (:func:`_reduces_over_examples`). A
statistic of the whole batch reduced to a scalar first (``z.std()``) is not found; a function of the scalar loss
(``sqrt(mse)``) scales every example's gradient alike and is no coupling.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gns.sources.per_example_axes import example_axis, moves_examples_off_the_batch
from lightning_gns.sources.per_example_order import Order, agree, is_batch_order, reordered, row_index
from lightning_gns.sources.per_example_rows import (
    ORDER_KEEPING,
    RESHAPES,
    dim_index,
    keeps_examples_apart,
    operand_shape,
)
from lightning_gns.sources.per_example_tables import ExampleFreeInputs, consecutive_positions

Node = Any  # torch.autograd.graph.Node
# Lookups and the saved index (or indices) each keeps: how data that needs no gradient (tokens, labels) shows.
_LOOKUPS = {
    "EmbeddingBackward0": "_saved_indices", "IndexBackward0": "_saved_indices",
    "IndexSelectBackward0": "_saved_index", "GatherBackward0": "_saved_index",
}  # fmt: skip

# Backward node name -> the positions in next_functions of its two matrix operands.
_PAIRING = {
    "MmBackward0": (0, 1),
    "AddmmBackward0": (1, 2),
    "BmmBackward0": (0, 1),
    "BaddbmmBackward0": (1, 2),
    "CdistBackward0": (0, 1),
}
# Batched products: the output's leading dimension is the product's batch.
_BATCHED = frozenset({"BmmBackward0", "BaddbmmBackward0"})
# Elementwise operations (they broadcast their operands) and expand.
_BROADCASTING = (ORDER_KEEPING - RESHAPES) | {"ExpandBackward0", "MaximumBackward0", "MinimumBackward0"}
# Reductions that take a dimension: over the batch's, a linear one (sum, mean) couples the examples only when an
# operation whose derivative depends on its result follows; the others (a standard deviation, a softmax) always.
_LINEAR_REDUCTIONS = frozenset({"SumBackward1", "MeanBackward1"})
_REDUCTIONS = _LINEAR_REDUCTIONS | {
    "StdBackward0", "VarBackward0", "StdMeanBackward0", "VarMeanBackward0", "LogsumexpBackward0", "SoftmaxBackward0",
    "LogSoftmaxBackward0", "LinalgVectorNormBackward0", "NormBackward1", "AmaxBackward0", "AminBackward0",
    "MaxBackward0", "MinBackward0", "CumsumBackward0", "CumprodBackward0",
}  # fmt: skip
# Batch normalisation in training mode normalises with statistics over the batch dimension (instance norm runs it
# on a (1, B * C, ...) view: its leading size is no batch of examples).
_BATCH_NORMS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"})
# Operations that only change how one tensor is viewed or laid out.
_VIEWS = RESHAPES | {
    "PermuteBackward0", "TBackward0", "TransposeBackward0", "ExpandBackward0", "CloneBackward0", "AliasBackward0",
    "ToCopyBackward0",
}  # fmt: skip
# Operations whose derivative does not depend on their inputs: views, sums, differences, selections, and the
# negative log-likelihood (a sum of chosen entries).
_LINEAR = _VIEWS | {
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1", "NegBackward0",
    "SumBackward0", "SumBackward1", "MeanBackward0", "MeanBackward1", "MulBackward1", "DivBackward1",
    "SelectBackward0", "SliceBackward0", "IndexBackward0", "CatBackward0", "StackBackward0", "SplitBackward0",
    "SplitWithSizesBackward0", "UnbindBackward0", "NarrowBackward0", "NllLossBackward0", "NllLoss2DBackward0",
}  # fmt: skip
# Operations that put examples' slices back side by side (``out[i] = f(x[i])``; a stack or cat along the batch).
_REASSEMBLY = frozenset({"torch::autograd::CopySlices", "IndexPutBackward0"})
_MAX_WALK = 256  # nodes a walk back to the batch visits before it gives up (no batch found)
# What coupled_outputs names for a layer whose input holds the examples in a dimension other than the first.
MOVED_INPUT = "examples moved off the first dimension of the input"
# A reentrant checkpoint: the layers run inside it are recorded by no forward hook before the backward.
_REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"


def _post_order(root: Node) -> list[Node]:
    """Every node below ``root`` (itself included), each after all the nodes it leads to."""
    order: list[Node] = []
    done: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in done:
            continue
        if expanded:
            done.add(node)
            order.append(node)
            continue
        stack.append((node, True))
        stack.extend((f, False) for f, _ in node.next_functions if f is not None and f not in done)
    return order


def _carries_examples(
    node: Node,
    batch_first: dict[Node, frozenset[Node]],
    carries: dict[Node, bool],
    tables: ExampleFreeInputs,
    outputs: set[Node],
    examples: int,
) -> bool:
    inputs = batch_first.get(node)
    if inputs is not None:
        # A layer's batch-first output holds examples unless its inputs provably hold none (per_example_tables: a
        # positional table as long as the batch is; a lookup of data in a raw parameter is no such table).
        return not inputs or any(carries.get(i, False) or not tables.node_holds_none(i) for i in inputs)
    if _opaque(node):  # a compiled region: its outputs' shapes are all the graph shows
        return any(len(m.shape) > 0 and m.shape[0] == examples for m in node._input_metadata)
    if node not in outputs and _looks_up_examples(node, examples):
        return True
    variable = getattr(node, "variable", None)  # a gradient accumulator: a leaf tensor
    if variable is None or isinstance(variable, nn.Parameter):
        return False
    return variable.dim() > 0 and variable.shape[0] == examples  # an input that needs a gradient


def _looks_up_examples(node: Node, examples: int) -> bool:
    """A lookup outside the hooked layers (``F.embedding(tokens, table)``, ``table[labels]``) whose index leads with
    the batch's size and is no run of consecutive positions: the examples' tokens or labels, which need no
    gradient and so show in the graph only as the index the node saved."""
    saved = getattr(node, _LOOKUPS.get(node.name(), ""), None)
    indices = saved if isinstance(saved, tuple) else (saved,)
    return any(
        isinstance(i, Tensor) and i.dim() > 0 and i.shape[0] == examples and not consecutive_positions(i)
        for i in indices
    )


def _opaque(node: Node) -> bool:
    """A region whose layer calls no forward hook recorded before the backward: compiled, or reentrant-checkpointed."""
    name = node.name()
    return "CompiledFunction" in name or name == _REENTRANT_CHECKPOINT


def _pairs_examples(
    node: Node, carries: dict[Node, bool], axes: dict[Node, int | None], tags: dict[Node, int | None], examples: int
) -> bool:
    operands = _PAIRING.get(node.name())
    if operands is None:
        return False
    following = node.next_functions
    if max(operands) >= len(following):
        return False
    first, second = following[operands[0]][0], following[operands[1]][0]
    if first is None or second is None or not (carries.get(first) and carries.get(second)):
        return False
    # Both operands one example's slice, or computed from it alone (x[i] @ x[i].T, or q and k of x[i], in a loop
    # over the examples): within that example.
    one, other = (_one_example(e) for e in (following[operands[0]], following[operands[1]]))
    one = tags.get(first) if one is None else one
    other = tags.get(second) if other is None else other
    if one is not None and one == other:
        return False
    if node.name() in _BATCHED:
        moved = moves_examples_off_the_batch(node, axes, carries)
        if moved is not None:
            return moved  # followed: in the product's batch (within each example), or in its rows or columns
        metadata = node._input_metadata
        shape = tuple(metadata[0].shape) if metadata else ()
        if shape and shape[0] % examples == 0:
            return False  # the batch of the product holds the examples (B, or B * heads): within each example
    return True


def _pairs_with_constant(node: Node, carries: dict[Node, bool], tags: dict[Node, int | None], examples: int) -> bool:
    """A (B, B) product of the examples with a tensor outside the graph as long as the batch (MoCo v3's keys of
    the same batch under no_grad, a frozen tower's embeddings: in-batch negatives whose other side needs no
    gradient). The graph cannot show where that tensor comes from; one that is as long as the batch is taken to
    hold its examples (a queue of another length, or a frozen parameter, is not)."""
    if node.name() not in ("MmBackward0", "BmmBackward0") or len(node.next_functions) < 2 or examples < 2:
        return False
    metadata = node._input_metadata
    shape = tuple(metadata[0].shape) if metadata else ()
    if len(shape) < 2 or shape[-1] != examples or shape[-2] != examples:
        return False
    first, second = node.next_functions[0][0], node.next_functions[1][0]
    graded = first if second is None else second if first is None else None
    if graded is None or not carries.get(graded) or tags.get(graded) is not None:
        return False
    try:
        constant = node._saved_mat2 if second is None else node._saved_self
    except RuntimeError:  # freed with the graph
        return False
    if not isinstance(constant, Tensor):
        return False
    return not isinstance(constant, nn.Parameter) and not isinstance(constant._base, nn.Parameter)


def _moves_examples(node: Node, carries: dict[Node, bool], uses: dict[Node, int], examples: int) -> bool:
    """Whether ``node`` moves the rows of a tensor computed from the examples to other examples' places (``roll``
    or ``flip`` along the batch, ``h[perm]``) while the tensor is also used where it was: manifold mixup's
    ``0.7 * h + 0.3 * h.roll(1, 0)`` mixes two examples in each row. A reordering alone (a sort for packing) keeps
    each row one example's and pairs nothing (but see :func:`_reorders_examples`)."""
    source = node.next_functions[0][0] if node.next_functions else None
    if uses.get(source, 0) < 2 or not _reorders_examples(node, carries, examples):
        return False
    # A filter that keeps every example in its place (h[keep] with keep == arange here) mixes nothing in this batch;
    # the graph is judged again on later ones (RowOrders.uncertain).
    index = row_index(node, examples)
    return index is None or not is_batch_order(index)


class RowOrders:
    """The order of the examples in the rows of each node's output that carries examples (per_example_order), the
    name of the first node that reorders them, and whether one of those orders was the batch's own in the judged
    micro-batch (a sort of a batch already sorted: another batch may be reordered)."""

    def __init__(self) -> None:
        self.orders: dict[Node, Order] = {}
        self.first_reorder: str | None = None
        self.uncertain = False

    def follow(self, node: Node, carries: dict[Node, bool], reorders: bool, examples: int) -> None:
        if not carries.get(node):
            return
        inputs = agree(self.orders.get(f) for f, _ in node.next_functions if f is not None and carries.get(f))
        if reorders:
            self.first_reorder = self.first_reorder or node.name()
            index = row_index(node, examples)
            self.uncertain = self.uncertain or (index is not None and is_batch_order(index))
            inputs = reordered(node, inputs, examples)
        self.orders[node] = inputs

    def of_inputs(self, inputs: Iterable[Node]) -> Order:
        """The order of the examples in a layer call's input rows (its inputs' grad_fns)."""
        return agree(self.orders.get(i) for i in inputs)


def _reorders_examples(node: Node, carries: dict[Node, bool], examples: int) -> bool:
    """Whether ``node`` puts the rows of a tensor computed from the examples in another order (``h[order]`` of a
    sort by length, ``roll`` or ``flip`` along the batch). The layers before and after it then hold the examples
    in different orders: each layer's per-example norms are still exact, but matching them to the examples (their
    own token counts, the other uses of a tied weight) is not."""
    moved = _MOVES.get(node.name())
    if moved is None or not node.next_functions:
        return False
    source = node.next_functions[0][0]
    if source is None or not carries.get(source):
        return False
    metadata = node._input_metadata
    if len(metadata) != 1 or len(metadata[0].shape) == 0 or metadata[0].shape[0] != examples:
        return False
    return moved(node)


def _moves_rows(index: Any, node: Node, alone: bool = True) -> bool:
    """Whether an index along the batch sends rows elsewhere (``h[torch.arange(B), last]``'s does not; nor a mask;
    nor one that picks rows of a tensor whose rows are not the examples, as tokens routed to an expert).

    ``alone``: the only index (``h[order]``, ``index_select``). Such an index is taken to reorder even where it is
    ``arange(B)`` in this batch: a sort's order is, for a batch already in order, and the graph is judged once.
    """
    if not isinstance(index, Tensor) or index.dtype == torch.bool:
        return False
    if int(node._saved_self_sym_sizes[0]) != index.shape[0]:
        return False  # rows picked from more (or fewer) rows than it gives: no reordering of the batch
    if alone or index.dim() != 1:
        return True
    return not torch.equal(index, torch.arange(index.shape[0], device=index.device, dtype=index.dtype))


def _along_batch(node: Node, dims: Any) -> bool:
    """Whether the dimensions an op saved include the first one of its output (its rank read from the graph)."""
    rank = len(node._input_metadata[0].shape) if node._input_metadata else 0
    saved = dims if isinstance(dims, (tuple, list)) else (dims,)
    return rank > 0 and any(dim_index(d, rank) == 0 for d in saved)


_MOVES = {
    "RollBackward0": lambda node: not node._saved_dims or _along_batch(node, node._saved_dims),
    "FlipBackward0": lambda node: _along_batch(node, node._saved_dims),
    "IndexBackward0": lambda node: (
        bool(node._saved_indices)
        and _moves_rows(node._saved_indices[0], node, alone=sum(i is not None for i in node._saved_indices) == 1)
    ),
    "IndexSelectBackward0": lambda node: _along_batch(node, node._saved_dim) and _moves_rows(node._saved_index, node),
}


def _one_example(edge: tuple[Node, int]) -> int | None:
    """The example an operand is a slice of (``x[i]``, or ``i``-th of ``x.unbind(0)`` as ``for xi in x`` takes
    them), seen through views; None if it is not one example's slice."""
    node, output = edge
    while node is not None and node.name() in _VIEWS and len(node.next_functions) == 1:
        node, output = node.next_functions[0]
    if node is None:
        return None
    name = node.name()
    if name == "SelectBackward0" and dim_index(node._saved_dim, len(node._saved_self_sym_sizes)) == 0:
        index = int(node._saved_index)
        index = index - (1 << 64) if index >= 1 << 63 else index  # a negative index reads as unsigned
        return index % int(node._saved_self_sym_sizes[0])
    if name == "UnbindBackward0" and _unbinds_batch(node):
        return int(output)
    return None


def _unbinds_batch(node: Node) -> bool:
    """Whether an unbind splits its input along the first dimension (its input has one more than its outputs)."""
    rank = len(node._input_metadata[0].shape) + 1 if node._input_metadata else 0
    return rank > 0 and dim_index(node._saved_dim, rank) == 0


def _slice_of(
    edge: tuple[Node, int], carries: dict[Node, bool], batch_first: dict[Node, frozenset[Node]], examples: int
) -> int | None:
    """The example whose slice along the batch an edge's tensor is (``h[i]``, or the ``i``-th of ``h.unbind(0)``)
    of a batch-first tensor that holds examples, else None."""
    node, output = edge
    name = node.name()
    if name not in ("SelectBackward0", "UnbindBackward0") or not node.next_functions:
        return None
    if name == "SelectBackward0" and dim_index(node._saved_dim, len(node._saved_self_sym_sizes)) != 0:
        return None
    if name == "UnbindBackward0" and not _unbinds_batch(node):
        return None
    source = node.next_functions[0][0]
    if source is None or not carries.get(source) or not _batch_leads(source, batch_first, examples):
        return None
    if name == "UnbindBackward0":
        return int(output) if len(node._input_metadata) == examples else None
    if int(node._saved_self_sym_sizes[0]) != examples:
        return None
    index = int(node._saved_index)
    index = index - (1 << 64) if index >= 1 << 63 else index  # a negative index reads as unsigned
    return index % examples


def _batch_leads(node: Node, batch_first: dict[Node, frozenset[Node]], examples: int) -> bool:
    """Whether ``node``'s output leads with the batch: it is a hooked layer's batch-first output or an input that
    needs a gradient, or is computed from one through operations that keep the first dimension where it is
    (elementwise ops, reshapes and permutations that leave it first). A leading dimension as long as the batch by
    chance (``nn.MultiheadAttention``'s stacked q, k, v at a batch of 3) is no batch."""
    stack, seen = [node], set[Node]()
    while stack and len(seen) < _MAX_WALK:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in batch_first:
            return True
        variable = getattr(current, "variable", None)
        if variable is not None:
            if not isinstance(variable, nn.Parameter) and variable.dim() > 0 and variable.shape[0] == examples:
                return True
            continue
        if current.name() in ORDER_KEEPING or keeps_examples_apart(current):
            for edge in current.next_functions:
                shape = None if edge[0] is None else operand_shape(edge)
                if shape and shape[0] == examples:
                    stack.append(edge[0])
    return False


def _slice_tags(
    node: Node,
    tags: dict[Node, int | None],
    carries: dict[Node, bool],
    batch_first: dict[Node, frozenset[Node]],
    examples: int,
) -> tuple[int | None, bool]:
    """The example ``node``'s output is computed from alone, if it is one example's slice's (None otherwise), and
    whether ``node`` combines slices of two examples into a result that is no scalar (a pairing)."""
    found: set[int | None] = set()  # None: a tensor computed from the examples that is no one example's slice
    for edge in node.next_functions:
        if edge[0] is not None and carries.get(edge[0]):
            one = _slice_of(edge, carries, batch_first, examples)
            found.add(one if one is not None else tags.get(edge[0]))
    if len(found) == 1:
        return found.pop(), False
    if found == {None} or not found or _reassembles(node):
        return None, False
    metadata = node._input_metadata
    return None, bool(metadata) and math.prod(metadata[0].shape) > 1


def _reassembles(node: Node) -> bool:
    """Whether ``node`` puts examples' slices back side by side along the batch (a stack or cat along the first
    dimension, ``out[i] = f(x[i])``); a cat along another (``cat([x_t, h], 1)``) combines them."""
    name = node.name()
    if name in _REASSEMBLY:
        return True
    if name not in ("StackBackward0", "CatBackward0"):
        return False
    metadata = node._input_metadata
    rank = len(metadata[0].shape) if metadata else 0
    return rank > 0 and dim_index(node._saved_dim, rank) == 0


def _broadcasts_over_examples(node: Node, carries: dict[Node, bool], examples: int) -> bool:
    """Whether an elementwise op (or expand) broadcasts a tensor computed from the examples, but without a
    dimension of its own for them (a statistic over the batch, ``z.unsqueeze(0)``), over the batch."""
    if node.name() not in _BROADCASTING:
        return False
    metadata = node._input_metadata
    if len(metadata) != 1:
        return False
    out = tuple(metadata[0].shape)
    if not out or out[0] != examples:
        return False
    for edge in node.next_functions:
        if edge[0] is None or not carries.get(edge[0]):
            continue
        shape = operand_shape(edge)
        if shape is not None and len(shape) <= len(out) and ((1,) * (len(out) - len(shape)) + shape)[0] == 1:
            return True
    return False


def _reduces_over_examples(node: Node, carries: dict[Node, bool], examples: int) -> bool:
    """Whether ``node`` reduces (or normalises, or accumulates) a batch-first tensor that holds examples along its
    batch dimension, leaving a result that is not a scalar (a scalar is the loss's own mean: ``sqrt(mse)`` scales
    every example's gradient alike)."""
    if node.name() not in _REDUCTIONS or not node.next_functions:
        return False
    edge = node.next_functions[0]
    if edge[0] is None or not carries.get(edge[0]):
        return False
    shape = operand_shape(edge)
    metadata = node._input_metadata
    if shape is None or len(shape) < 1 or shape[0] != examples or not metadata or len(metadata[0].shape) == 0:
        return False
    dims = getattr(node, "_saved_dim", None)
    if dims is None:
        return False  # over every dimension: a scalar
    rank = len(shape)
    unsigned = dims if isinstance(dims, (tuple, list)) else (dims,)
    return any(dim_index(d, rank) == 0 for d in unsigned)


def _normalises_over_examples(
    node: Node, carries: dict[Node, bool], axes: dict[Node, int | None], tags: dict[Node, int | None]
) -> bool:
    """A batch norm in training mode (``F.batch_norm(training=True)`` in a module of one's own; BatchNorm modules
    are refused at setup) on a tensor that holds several examples anywhere but on its channel dimension: its
    statistics run over dimension 0 and the positions, so over the examples, whatever the leading size is (B, or
    B * T rows flattened, or a ghost batch's chunk). Instance norm runs it on a ``(1, B * C, ...)`` view."""
    if node.name() not in _BATCH_NORMS or getattr(node, "_saved_training", False) is not True:
        return False
    edge = node.next_functions[0] if node.next_functions else (None, 0)
    if edge[0] is None or not carries.get(edge[0]) or tags.get(edge[0]) is not None:
        return False  # holds no examples, or one example's slice
    shape = operand_shape(edge)
    return shape is not None and len(shape) >= 2 and shape[0] > 1 and axes.get(edge[0]) != 1


def _linear(node: Node, carries: dict[Node, bool]) -> bool:
    """Whether ``node``'s derivative with respect to each input is the same whatever its other inputs hold."""
    name = node.name()
    if name in _LINEAR:
        return True
    if name in ("MulBackward0", "DivBackward0"):  # a product with a constant (no example's data in it)
        return sum(1 for f, _ in node.next_functions if f is not None and carries.get(f)) <= 1
    return False


def _coupled_branches(
    order: list[Node], pairing: list[Node], carries: dict[Node, bool], conditional: set[Node]
) -> tuple[list[Node], set[Node], list[Node]]:
    """The nodes whose whole subgraphs get a gradient that depends on several examples through ``pairing``, the
    operations above it (between it and the loss, whose inputs depend on several examples), and the pairing
    operations that do couple.

    Below a pairing operation, everything. Above it, a branch that joins the path where the gradient already
    depends on the pairing, or through an operation whose derivative depends on it (a product, a softmax), gets
    such a gradient too; a branch added to the loss beside it (a classifier's cross entropy plus a contrastive
    term) does not. A ``conditional`` pairing (a sum or mean over the batch) couples only where the gradient
    reaching it depends on its result.
    """
    consumers: dict[Node, list[Node]] = defaultdict(list)
    for node in order:
        for following, _ in node.next_functions:
            if following is not None:
                consumers[following].append(node)
    above: set[Node] = set()  # the pairing operations and every operation between them and the loss
    stack = list(pairing)
    while stack:
        node = stack.pop()
        if node not in above:
            above.add(node)
            stack.extend(consumers[node])
    branches = [p for p in pairing if p not in conditional]
    couplers = list(branches)
    gradient_depends: dict[Node, bool] = {}
    for node in reversed(order):  # each node after all its consumers
        if node not in above:
            continue
        gradient_depends[node] = any(
            gradient_depends[c] or not _linear(c, carries) for c in consumers[node] if c in above
        )
        if node in conditional:
            if gradient_depends[node]:
                branches.append(node)
                couplers.append(node)
        elif gradient_depends[node] or not _linear(node, carries):
            branches.extend(f for f, _ in node.next_functions if f is not None and f not in above and carries.get(f))
    return branches, above, couplers


def coupled_outputs(
    root: Node,
    outputs: set[Node],
    batch_first: dict[Node, frozenset[Node]],
    examples: int,
    leading: dict[Node, frozenset[Node]] | None = None,
) -> tuple[dict[Node, str], str | None, RowOrders]:
    """The hooked layer outputs whose gradient or input an operation that pairs the examples of the batch makes
    depend on several examples (a layer after a statistic over the batch in the model, as after a BatchNorm), each
    with that operation's name; the name of a pairing operation with a compiled or reentrant-checkpointed
    region so coupled (whose layers are none of ``outputs``: any layer may be in it), or None; and the order of the
    examples in every node's rows (:mod:`~lightning_gns.sources.per_example_order`).

    ``outputs``: the grad_fns of the hooked layer calls' outputs; ``batch_first``: those whose leading dimension is
    the batch, each with the grad_fns of its call's inputs; ``leading``: those of layers that take every input
    batch-first (not an RNN's ``hx``, not ``batch_first=False``), named :data:`MOVED_INPUT` where an input's examples
    are followed to another dimension.
    """
    rows = RowOrders()
    if examples < 2:
        return {}, None, rows
    carries: dict[Node, bool] = {}
    tables = ExampleFreeInputs()
    pairing: list[Node] = []
    conditional: set[Node] = set()
    order = _post_order(root)
    uses: dict[Node, int] = defaultdict(int)  # how many operations take each node's output
    for node in order:
        for following, _ in node.next_functions:
            if following is not None:
                uses[following] += 1
    tags: dict[Node, int | None] = {}  # the one example a node's output is computed from, where it is a slice's
    axes: dict[Node, int | None] = {}  # the dimension of a node's output that holds the examples (per_example_axes)
    roots = set(batch_first)
    for node in order:
        carries[node] = _carries_examples(node, batch_first, carries, tables, outputs, examples) or any(
            carries.get(f, False) for f, _ in node.next_functions if f is not None
        )
        tags[node], combines = _slice_tags(node, tags, carries, batch_first, examples)
        axes[node] = example_axis(node, roots, axes, carries, examples)
        rows.follow(node, carries, _reorders_examples(node, carries, examples), examples)
        if combines:
            pairing.append(node)
            if _linear(node, carries):  # a sum of two examples' slices couples only where a nonlinearity follows
                conditional.add(node)
        elif (
            _pairs_examples(node, carries, axes, tags, examples)
            or _pairs_with_constant(node, carries, tags, examples)
            or _broadcasts_over_examples(node, carries, examples)
            or _moves_examples(node, carries, uses, examples)
        ):
            pairing.append(node)
        elif _reduces_over_examples(node, carries, examples):
            pairing.append(node)
            if node.name() in _LINEAR_REDUCTIONS:
                conditional.add(node)
        elif _normalises_over_examples(node, carries, axes, tags):
            pairing.append(node)
    # A layer whose input holds the examples in another dimension (``h.transpose(0, 1)`` of a batch-first ``h``, as
    # Longformer's attention takes it) has the sequence first: at T == B its output looks batch-first.
    moved = {
        r: MOVED_INPUT for r, inputs in (leading or {}).items() if any(axes.get(i) not in (None, 0) for i in inputs)
    }
    if not pairing:
        return moved, None, rows
    found: dict[Node, str] = {}
    opaque_below: str | None = None
    seen: set[Node] = set()
    stack, above, couplers = _coupled_branches(order, pairing, carries, conditional)
    if not couplers:
        return moved, None, rows  # only sums over the batch that reach the loss linearly
    name = couplers[0].name()
    if name in _BATCHED and moves_examples_off_the_batch(couplers[0], axes, carries):
        name += (
            " along the first dimension of a layer's output, moved off the product's batch: attention over the"
            " positions of a model that is time-major inside (T, B, ...) at T == B, whose first dimension is the"
            " sequence (use a batch size other than the sequence length), or"
        )
    found.update((node, name) for node in above if node in outputs)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in outputs:
            found.setdefault(node, name)
        if opaque_below is None and _opaque(node):
            opaque_below = name
        stack.extend(f for f, _ in node.next_functions if f is not None and f not in seen)
    found.update(moved)
    return found, opaque_below, rows
