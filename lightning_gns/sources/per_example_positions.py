"""Layer outputs of shape ``(B, B, ...)``: is the first dimension the batch, or positions that equal it in number?

A layer called on something shared by the batch and indexed by position (T5's relative attention bias embeds a
``(T, T)`` matrix of position buckets, then broadcasts the result over the batch) has an output whose first
dimension is a position. At ``T != B`` its shape says so and the layer is left out; at ``T == B`` the shape is
that of a batch, and splitting it per example would be silently wrong. What the model then does with the output
tells: such a tensor is broadcast over the batch (T5: ``values.permute(2, 0, 1).unsqueeze(0)`` added to scores of
shape ``(B, H, T, T)``), which a batch never is.

:func:`broadcast_outputs` reads the autograd graph of a micro-batch's loss before its backward pass (or, for a
layer first run in a reentrant checkpoint's recomputation inside the backward, the graph of the recomputed
layers' outputs, before the layer's gradient arrives). For each
suspect output it follows the operations that consume it (elementwise ones, permutes, transposes, unsqueezes,
``repeat``),
tracking where the suspect's first dimension goes (each node's output shape is in its metadata), also through
reshapes that only add or drop leading axes of size one, and reports those that an elementwise operation,
``repeat`` or ``expand`` broadcasts along a leading dimension of ``B`` while their own first dimension sits
elsewhere. Any other operation ends the search without a verdict: an output is left out only on
that evidence. (A transpose of a batch alone is no evidence: ``nn.MultiheadAttention`` with ``batch_first=True``
transposes its inputs to sequence-first.) An output consumed by a ``torch.compile``d region cannot be judged:
the caller says so once.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lightning_gns.sources.per_example_rows import ORDER_KEEPING, RESHAPES, dim_index

Node = Any  # torch.autograd.graph.Node

# Elementwise ops the search follows (reshapes end it: their output shape is not in the graph).
_ELEMENTWISE = ORDER_KEEPING - RESHAPES


Step = tuple[int, tuple[int, ...]]  # where the suspect's first dimension is, and the tensor's shape


def _follow(node: Node, step: Step, examples: int) -> tuple[bool, Step | None]:
    """(broadcast over the batch here?, the step after ``node``, or None to stop) for a consumer ``node``."""
    metadata = node._input_metadata
    if len(metadata) != 1:
        return False, None
    pos, shape = step
    out = tuple(metadata[0].shape)
    name = node.name()
    # repeat or expand over a new leading batch: WavLM's bias, T5-style biases expanded before a baddbmm
    if name in _ELEMENTWISE or name in ("RepeatBackward0", "ExpandBackward0"):
        offset = len(out) - len(shape)
        if offset < 0:
            return False, None
        aligned = (1,) * offset + shape
        broadcast = pos + offset != 0 and aligned[0] == 1 and out[0] == examples
        return broadcast, (pos + offset, out)
    rank = len(out)
    if name == "PermuteBackward0":
        dims = [dim_index(d, rank) for d in node._saved_dims]
        return False, (dims.index(pos), out)
    if name == "TransposeBackward0":
        first, second = dim_index(node._saved_dim0, rank), dim_index(node._saved_dim1, rank)
        return False, ((second if pos == first else first if pos == second else pos), out)
    if name == "UnsqueezeBackward0":
        return False, ((pos + 1 if dim_index(node._saved_dim, rank) <= pos else pos), out)
    if name in RESHAPES:
        # Only a reshape that adds or drops leading axes of size one (bias.view(1, H, T, T), an einops
        # rearrange to "1 h i j") keeps the dimension findable; any other ends the search.
        added = len(out) - len(shape)
        if added >= 0 and out == (1,) * added + shape:
            return False, (pos + added, out)
        if added < 0 and shape == (1,) * -added + out and pos >= -added:
            return False, (pos + added, out)
    return False, None


def broadcast_outputs(
    roots: list[Node], suspects: dict[Node, tuple[Any, tuple[int, ...]]]
) -> tuple[dict[Any, str], list[Any]]:
    """``{key: the op}`` for the suspect outputs (grad_fn -> (key, output shape)) that the graph below ``roots``
    (the loss's grad_fn) broadcasts over the batch, and the keys of those consumed by a compiled region
    (``torch.compile``), whose operations the graph does not show: those cannot be judged."""
    if not roots or not suspects:
        return {}, []
    consumers: dict[Node, list[Node]] = defaultdict(list)
    seen: set[Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for following, _ in node.next_functions:
            if following is not None:
                consumers[following].append(node)
                stack.append(following)
    found: dict[Any, str] = {}
    unjudged: list[Any] = []
    for suspect, (key, shape) in suspects.items():
        examples = shape[0]
        frontier: list[tuple[Node, Step]] = [(c, (0, shape)) for c in consumers.get(suspect, ())]
        visited: set[Node] = set()
        while frontier and key not in found:
            node, step = frontier.pop()
            if node in visited:
                continue
            visited.add(node)
            if "CompiledFunction" in node.name():
                unjudged.append(key)
                break
            try:
                broadcast, after = _follow(node, step, examples)
            except (AttributeError, ValueError, ZeroDivisionError):  # metadata this torch does not expose
                continue
            if broadcast:
                found[key] = node.name()
            elif after is not None:
                frontier.extend((c, after) for c in consumers.get(node, ()))
    return found, unjudged
