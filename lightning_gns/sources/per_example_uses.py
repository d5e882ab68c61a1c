"""Finds watched parameters that the forward (or the loss) uses outside the layers the per-example source hooks.

The per-example norms of a parameter come from the calls of the layers that own it. A use anywhere else (an
output layer tied by a functional call, ``h @ embedding.weight.T``; a penalty on the weights added to the
loss) adds to its gradient a part no hook sees: the big batch's norm would hold it and the examples' norms
not, and ``B_simple`` would be silently wrong.

:class:`UseCheck` reads the autograd graph of one micro-batch's loss, before its backward pass. Every edge into a
watched parameter's gradient accumulator must come from a node that one of the parameter's own layer calls
created (found by walking back from the call's outputs to its inputs); any other edge is a use outside. Only
uses the loss's gradient flows through are found (a weight norm computed for logging is none), and the check
reads the graph only: it cannot change what the step computes. A graph with compiled regions (whose inner calls
no hook sees) is not judged. The source checks each loss graph whose structure (:func:`graph_signature`) it has
not checked before: a penalty added to the loss after a warm-up, or a branch that starts using a weight
functionally, is found on the first micro-batch it appears in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from torch import Tensor
from torch.utils._pytree import tree_flatten

from lightning_gns.sources.per_example_coupling import RowOrders, coupled_outputs
from lightning_gns.sources.per_example_order import Order, agree, is_batch_order

Node = Any  # torch.autograd.graph.Node


def graph_signature(root: Node, param_index: dict[int, int]) -> int:
    """A hash of the structure of the graph below ``root``: its operations (the multiset of node names) and how
    many edges reach each watched parameter (``param_index``: ``id(parameter)`` -> index).

    Shapes and values do not enter it, so the same model on another batch gives the same signature; any new use
    of a watched parameter adds an edge to its gradient accumulator and changes it. One walk over the nodes, no
    check of what they compute (about 0.1 ms for a small GPT's few hundred nodes).
    """
    names: list[str] = []
    uses: list[int] = []
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        names.append(node.name())
        for following, _ in node.next_functions:
            if following is None:
                continue
            variable = getattr(following, "variable", None)  # a gradient accumulator: a leaf tensor
            if variable is not None:
                index = param_index.get(id(variable))
                if index is not None:
                    uses.append(index)
            elif following not in seen:
                seen.add(following)
                stack.append(following)
    return hash((tuple(sorted(names)), tuple(sorted(uses))))


class _Call(NamedTuple):
    """A hooked layer call: the grad_fns of its outputs (those whose leading dimension is the batch apart), of its
    inputs, and its watched parameters' indices."""

    roots: list[Node]
    stops: set[Node]
    indices: list[int]
    batch_first: list[Node]
    reads_layout: bool  # the layer finds the batch in its inputs itself (batch_first=False, an RNN's hx)


class UseCheck:
    """One micro-batch's hooked layer calls, then the uses of watched parameters outside them, and the layers whose
    gradients an operation that pairs examples couples (:mod:`~lightning_gns.sources.per_example_coupling`).

    Args:
        param_index: ``id(parameter)`` -> its index among the watched parameters.
        examples: the micro-batch's examples (the leading dimension of a batch-first output), if known.
    """

    def __init__(self, param_index: dict[int, int], examples: int | None = None) -> None:
        self._param_index = param_index
        self._examples = examples
        self._calls: list[_Call] = []
        self.compiled_region: str | None = None  # the name of a compiled region outside_uses met: it saw no further
        # Set by coupled(): the name of an operation that reorders the examples where some layer call sees them in
        # another order than the batch's (None if every call sees the batch's order), whether the judged micro-batch
        # may hide a reordering (a sort of a batch already in order), and the parameters whose calls see the
        # examples in different orders.
        self.reordered: str | None = None
        self.reorder_uncertain = False
        self.misaligned_params: set[int] = set()

    def record_call(self, outputs: Any, inputs: Any, indices: list[int], reads_layout: bool = False) -> None:
        """A hooked layer call: its outputs, its inputs (args and kwargs), its watched parameters' indices, and
        whether it reads where the batch is in its inputs itself (else every input leads with the batch)."""
        tensors = [t for t in tree_flatten(outputs)[0] if isinstance(t, Tensor) and t.grad_fn is not None]
        if tensors and indices:
            stops = {t.grad_fn for t in tree_flatten(inputs)[0] if isinstance(t, Tensor) and t.grad_fn is not None}
            batch_first = [t.grad_fn for t in tensors if t.dim() > 0 and t.shape[0] == self._examples]
            self._calls.append(_Call([t.grad_fn for t in tensors], stops, indices, batch_first, reads_layout))

    def outside_uses(self, loss: Tensor) -> dict[int, str]:
        """Watched parameter index -> the kind of graph node that uses it outside its layers (e.g. ``MmBackward0``)."""
        if loss.grad_fn is None:
            return {}
        allowed: set[tuple[Node, int]] = set()
        for roots, stops, indices, _, _ in self._calls:
            wanted = set(indices)
            allowed.update((node, i) for node, i in self._param_edges(roots, stops) if i in wanted)
        outside: dict[int, str] = {}
        for node, index in self._param_edges([loss.grad_fn], set()):
            if "CompiledFunction" in node.name():
                self.compiled_region = node.name()
                return {}  # compiled regions call layers no hook sees: no judgement
            if index >= 0 and (node, index) not in allowed:
                outside.setdefault(index, node.name())
        return outside

    def coupled(
        self, loss: Tensor, excluded: set[int] | frozenset[int] = frozenset(), doubtful: set[Node] | None = None
    ) -> dict[int, str]:
        """Watched parameter index -> the operation that pairs examples and so couples its layer's gradient (e.g.
        ``MmBackward0``). The outputs of layers all of whose parameters are in ``excluded`` (left out, e.g. for
        holding positions as many as the examples) and the ``doubtful`` ones (grad_fns) are not taken to hold
        examples."""
        if loss.grad_fn is None or self._examples is None:
            return {}
        outputs = {r for call in self._calls for r in call.roots}
        doubtful = doubtful or set()
        batch_first = {
            node: frozenset(call.stops)
            for call in self._calls
            if not set(call.indices) <= excluded  # left out, e.g. for holding positions
            for node in call.batch_first
            if node not in doubtful
        }
        leading = {
            node: batch_first[node]
            for call in self._calls
            if not call.reads_layout
            for node in call.batch_first
            if node in batch_first
        }
        found, opaque_below, rows = coupled_outputs(loss.grad_fn, outputs, batch_first, self._examples, leading)
        self._judge_orders(rows, excluded)
        coupled: dict[int, str] = {}
        for roots, _, indices, _, _ in self._calls:
            node = next((found[r] for r in roots if r in found), None)
            if node is not None:
                coupled.update((i, node) for i in indices)
        if opaque_below is not None:  # a compiled or reentrant-checkpointed region below: any layer may be in it
            coupled.update((i, opaque_below) for i in self._param_index.values() if i not in coupled)
        return coupled

    def _judge_orders(self, rows: RowOrders, excluded: set[int] | frozenset[int]) -> None:
        self.reorder_uncertain = rows.uncertain
        if rows.first_reorder is None:
            return
        orders_by_param: dict[int, list[Order]] = defaultdict(list)
        for call in self._calls:
            if set(call.indices) <= excluded:
                continue  # a layer left out (an LSTM on a sorted PackedSequence) measures nothing
            order = rows.of_inputs(call.stops)
            if not is_batch_order(order):
                self.reordered = rows.first_reorder
            for i in set(call.indices):
                orders_by_param[i].append(order)
        self.misaligned_params = {
            i for i, orders in orders_by_param.items() if len(orders) > 1 and isinstance(agree(orders), str)
        }

    def _param_edges(self, roots: Iterable[Node], stops: set[Node]) -> Iterator[tuple[Node, int]]:
        """(node, index) for every edge into a watched parameter from a node reachable from ``roots``, not
        walking through ``stops``; every visited node once (as ``(node, -1)`` when it has no such edge)."""
        seen: set[Node] = set()
        stack = [r for r in roots if r not in stops]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            yield node, -1
            for following, _ in node.next_functions:
                if following is None:
                    continue
                variable = getattr(following, "variable", None)  # a gradient accumulator: a leaf tensor
                if variable is not None:
                    index = self._param_index.get(id(variable))
                    if index is not None:
                        yield node, index
                elif following not in stops:
                    stack.append(following)
