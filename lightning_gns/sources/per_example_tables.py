"""Layer inputs that hold no examples: a table of positions as long as the batch.

A layer called on something computed from the model's own state, ``pos_proj(wpe(arange(T)))`` or
``pos_proj(pos_table[:T])``, gives an output whose first dimension holds positions (table rows) shared by every
example. At ``T != B`` the shape says so and the layer is left out; at ``T == B`` the shape is a batch's, and the
broadcast judge (per_example_positions) sees only the output that is itself broadcast over the batch, not a
layer whose output feeds another layer first. Split per example, such a layer's gradient is silently wrong.

The layer's input tells: :class:`ExampleFreeInputs` proves that it holds no examples. An input holds none when it
is a parameter; a tensor sharing storage with the model's parameters or buffers (a slice of a frozen or sinusoidal
table, class prompts' token ids kept in a buffer); an integer index of consecutive values (``arange(k, k + n)``,
``n >= 3``: class labels are not consecutive; positions are); or computed from those alone through operations that
take no other tensor (reductions and softmax included). The proof walks the
autograd graph below the input: data that needs no gradient leaves an empty edge, an index hides inside
``EmbeddingBackward0`` (read from its saved indices), a mask inside ``where``/``masked_fill``, any other op is
unknown: each of those ends the proof with "holds examples" (the layer stays measured, as before). Operations that
create a dimension of the batch's size from a smaller one (``expand``, ``repeat``, ``cat``/``stack`` of copies) are
not followed: a class token expanded over the batch holds one copy per example, and its layer splits per example
correctly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gns.sources.per_example_rows import ORDER_KEEPING

Node = Any  # torch.autograd.graph.Node

# Ops whose every tensor input shows as an edge of the graph (a mask of where/masked_fill does not), that keep or
# drop dimensions but never make the batch's from a smaller one.
_FOLLOWED = (ORDER_KEEPING - {"WhereBackward0", "MaskedFillBackward0"}) | frozenset(
    {
        "SliceBackward0", "SelectBackward0", "NarrowBackward0", "TransposeBackward0", "PermuteBackward0", "TBackward0",
        "MmBackward0", "AddmmBackward0", "NativeLayerNormBackward0", "EmbeddingBackward0",
        # reductions and normalisations of one tensor (class prompts' token embeddings averaged, a bank softmaxed)
        "MeanBackward0", "MeanBackward1", "SumBackward0", "SumBackward1", "SoftmaxBackward0", "LogSoftmaxBackward0",
        "LinalgVectorNormBackward0", "AmaxBackward0", "AminBackward0",
        # this package's fused Linear and LayerNorm (per_example_fused): their tensors are edges too
        "LinearWithPerExampleGradsBackward", "LayerNormWithPerExampleGradsBackward",
    }
)  # fmt: skip
# Products whose operand that needs no gradient is saved (``_saved_self``, ``_saved_other``): a scalar, or a tensor of
# the model's state, holds no examples (``table * 2.0``, ``table / scale_buffer``).
_SAVED_OPERANDS = {"MulBackward0": ("_saved_self", "_saved_other"), "DivBackward0": ("_saved_self", "_saved_other")}
_MAX_NODES = 4096  # a walk this long is given up ("holds examples"): a table is a few ops deep
_MIN_POSITIONS = 3  # two labels are consecutive too often to call them positions


def consecutive_positions(index: Tensor) -> bool:
    """Whether ``index`` is ``arange(k, k + n)`` with ``n >= 3`` (a host sync: called once per layer)."""
    if index.dim() != 1 or index.numel() < _MIN_POSITIONS or index.is_floating_point() or index.is_complex():
        return False
    return bool(torch.all(index.diff() == 1))


class ExampleFreeInputs:
    """One micro-batch's proofs that layer inputs hold no examples (a verdict per graph node, shared by its layers).

    The methods' ``model_state`` is the model's parameters and buffers (storage is compared, not values), read at
    the first tensor that needs it in a micro-batch: a set kept longer could hold addresses freed and reused by data
    (FSDP2 allocates unsharded parameters afresh each forward).
    """

    def __init__(self) -> None:
        self._verdicts: dict[Node, bool] = {}
        self._storages: set[int] | None = None

    def clear(self) -> None:
        self._verdicts = {}
        self._storages = None

    def hold_none(self, inputs: Iterable[Tensor], model_state: Iterable[Tensor]) -> bool:
        """Whether every one of ``inputs`` (at least one) provably holds no examples."""
        tensors = list(inputs)
        return bool(tensors) and all(self._holds_none(t, model_state) for t in tensors)

    def _holds_none(self, tensor: Tensor, model_state: Iterable[Tensor]) -> bool:
        if isinstance(tensor, nn.Parameter):
            return True
        node = tensor.grad_fn
        if node is not None:
            return self.node_holds_none(node, model_state)
        if tensor.requires_grad:
            return False  # a leaf that needs a gradient and is no parameter: an input of the model
        if not tensor.is_floating_point():
            # Ids kept in a buffer (class prompts' tokens, as CLIP-style zero-shot heads keep them) or positions.
            return self._is_model_state(tensor, model_state) or consecutive_positions(tensor)
        return self._is_model_state(tensor, model_state)

    def _is_model_state(self, tensor: Tensor, model_state: Iterable[Tensor]) -> bool:
        if self._storages is None:
            self._storages = {p for p in map(_storage, model_state) if p is not None}
        return _storage(tensor) in self._storages

    def _hidden_operands_hold_none(self, node: Node, model_state: Iterable[Tensor]) -> bool:
        """For a node with empty edges: whether what enters through them holds no examples (as far as it shows)."""
        saved = _SAVED_OPERANDS.get(node.name())
        if saved is None:
            return False  # data that needs no gradient enters here, unseen
        for (following, _), attribute in zip(node.next_functions, saved, strict=False):
            if following is None:
                operand = getattr(node, attribute, None)
                if not isinstance(operand, Tensor):
                    return False
                if operand.dim() > 0 and not self._is_model_state(operand, model_state):
                    return False
        return True

    def node_holds_none(self, root: Node, model_state: Iterable[Tensor] = ()) -> bool:
        """Whether the output of graph node ``root`` provably holds no examples (``model_state``: see above)."""
        verdicts = self._verdicts
        stack: list[tuple[Node, bool]] = [(root, False)]
        visited = 0
        while stack:
            node, expanded = stack.pop()
            if node in verdicts:
                continue
            visited += 1
            if visited > _MAX_NODES:
                return False
            below = [f for f, _ in node.next_functions]
            if expanded:
                verdicts[node] = all(verdicts.get(f, False) for f in below if f is not None)
                continue
            leaf = _leaf_verdict(node, lambda index: self._is_model_state(index, model_state))
            if leaf is not None:
                verdicts[node] = leaf
            elif any(verdicts.get(f) is False for f in below) or (
                None in below and not self._hidden_operands_hold_none(node, model_state)
            ):
                verdicts[node] = False  # holds examples below, or data that needs no gradient enters here
            else:
                stack.append((node, True))
                stack.extend((f, False) for f in below if f is not None and f not in verdicts)
        return verdicts[root]


def _storage(tensor: Tensor) -> int | None:
    """Where ``tensor``'s storage starts, or None where it has none to read (a sharded DTensor, a fake tensor)."""
    try:
        return int(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


def _leaf_verdict(node: Node, in_model_state: Callable[[Tensor], bool]) -> bool | None:
    """True/False where ``node`` alone decides, None where the nodes below it do (``in_model_state``: whether a
    tensor shares storage with the model's parameters or buffers)."""
    variable = getattr(node, "variable", None)  # a gradient accumulator: a leaf tensor
    if variable is not None:
        return isinstance(variable, nn.Parameter)
    name = node.name()
    if name == "ExpandBackward0" and node.next_functions:
        # Along later dimensions only (F.normalize expands a row's norm over its features); an expand of the first
        # dimension makes copies per example (a class token over the batch) and ends the proof.
        sizes, out = tuple(node._saved_self_sym_sizes), tuple(node._input_metadata[0].shape)
        return None if len(sizes) == len(out) > 0 and sizes[0] == out[0] else False
    if name not in _FOLLOWED or not node.next_functions:
        return False
    if name == "EmbeddingBackward0":
        index = getattr(node, "_saved_indices", None)
        table_rows = isinstance(index, Tensor) and (in_model_state(index) or consecutive_positions(index))
        return None if table_rows else False
    return None
