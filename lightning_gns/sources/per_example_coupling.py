"""Losses that compare the examples of a batch with each other, found in the autograd graph.

Per-example gradients are samples of the gradient noise only when the loss is a sum of one term per example.
A contrastive loss with in-batch negatives is not: CLIP's and SimCLR's similarity matrix (``a @ b.T``), Barlow
Twins' and VICReg's correlations over the batch (``a.T @ b``), a triplet loss that mines negatives with
``torch.cdist``. The gradient that reaches example ``i``'s activations then depends on the other examples, the
per-example split is of no independent samples, and ``B_simple`` would be silently wrong.

:func:`coupled_outputs` reads the graph of one micro-batch's loss before its backward pass. A matrix product
(or distance) of two operands that both carry examples' data pairs examples: an operand carries them when the
graph below it reaches a hooked layer's batch-first output or an input that needs a gradient (a parameter,
or a tensor computed from parameters alone, does not). A batched matrix product whose batch holds the examples
(attention's ``(B * heads, T, T)`` scores) pairs positions within each example and is no coupling. Every hooked
layer output below a pairing product is reported: its layer's per-example gradients are not independent.
Two operands that are slices of the same example (a loop over the examples, ``x[i] @ x[i].T``) pair nothing.
Batch statistics computed without a matrix product (``z.std(dim=0)``, standardising over the batch) are not
found.
"""

from __future__ import annotations

from typing import Any

from torch import nn

Node = Any  # torch.autograd.graph.Node

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
# Operations that only change how one tensor is viewed or laid out.
_VIEWS = frozenset(
    {
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "PermuteBackward0", "TBackward0",
        "TransposeBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
        "ExpandBackward0", "CloneBackward0", "AliasBackward0", "ToCopyBackward0",
    }
)  # fmt: skip
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


def _carries_examples(node: Node, batch_first: set[Node], examples: int) -> bool:
    if node in batch_first:
        return True
    if _opaque(node):  # a compiled region: its outputs' shapes are all the graph shows
        return any(len(m.shape) > 0 and m.shape[0] == examples for m in node._input_metadata)
    variable = getattr(node, "variable", None)  # a gradient accumulator: a leaf tensor
    if variable is None or isinstance(variable, nn.Parameter):
        return False
    return variable.dim() > 0 and variable.shape[0] == examples  # an input that needs a gradient


def _opaque(node: Node) -> bool:
    """A region whose layer calls no forward hook recorded before the backward: compiled, or reentrant-checkpointed."""
    name = node.name()
    return "CompiledFunction" in name or name == _REENTRANT_CHECKPOINT


def _pairs_examples(node: Node, carries: dict[Node, bool], examples: int) -> bool:
    operands = _PAIRING.get(node.name())
    if operands is None:
        return False
    following = node.next_functions
    if max(operands) >= len(following):
        return False
    first, second = following[operands[0]][0], following[operands[1]][0]
    if first is None or second is None or not (carries.get(first) and carries.get(second)):
        return False
    one = _one_example(following[operands[0]])
    if one is not None and one == _one_example(following[operands[1]]):
        return False  # both operands are the same example's (a loop over the examples): within that example
    if node.name() in _BATCHED:
        metadata = node._input_metadata
        shape = tuple(metadata[0].shape) if metadata else ()
        if shape and shape[0] % examples == 0:
            return False  # the batch of the product holds the examples (B, or B * heads): within each example
    return True


def _one_example(edge: tuple[Node, int]) -> int | None:
    """The example an operand is a slice of (``x[i]``, or ``i``-th of ``x.unbind(0)`` as ``for xi in x`` takes
    them), seen through views; None if it is not one example's slice."""
    node, output = edge
    while node is not None and node.name() in _VIEWS and len(node.next_functions) == 1:
        node, output = node.next_functions[0]
    if node is None:
        return None
    name = node.name()
    if name == "SelectBackward0" and node._saved_dim == 0:
        index = int(node._saved_index)
        index = index - (1 << 64) if index >= 1 << 63 else index  # a negative index reads as unsigned
        return index % int(node._saved_self_sym_sizes[0])
    if name == "UnbindBackward0" and node._saved_dim == 0:
        return int(output)
    return None


def coupled_outputs(
    root: Node, outputs: set[Node], batch_first: set[Node], examples: int
) -> tuple[dict[Node, str], str | None]:
    """The hooked layer outputs (``outputs``: their grad_fns; ``batch_first``: those whose leading dimension is the
    batch) below an operation that pairs the examples of the batch, each with that operation's name; and the
    name of a pairing operation with a compiled or reentrant-checkpointed region below it (whose layers are none
    of ``outputs``: any layer may be in it), or None."""
    if examples < 2:
        return {}, None
    carries: dict[Node, bool] = {}
    pairing: list[Node] = []
    for node in _post_order(root):
        carries[node] = _carries_examples(node, batch_first, examples) or any(
            carries.get(f, False) for f, _ in node.next_functions if f is not None
        )
        if _pairs_examples(node, carries, examples):
            pairing.append(node)
    found: dict[Node, str] = {}
    opaque_below: str | None = None
    seen: set[Node] = set()
    for pair in pairing:
        stack = [pair]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in outputs:
                found.setdefault(node, pair.name())
            if opaque_below is None and _opaque(node):
                opaque_below = pair.name()
            stack.extend(f for f, _ in node.next_functions if f is not None and f not in seen)
    return found, opaque_below
