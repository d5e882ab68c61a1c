"""What every source of small-batch gradient norms provides."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

# Half-precision gradients are reduced (norms, sums, Gram products) in float32: summed in their own dtype they
# lose the small contributions. The one place that says so; float32 and float64 are reduced as they are.
HALF_PRECISION = (torch.float16, torch.bfloat16)


def reduction_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The ``dtype=`` to pass a norm or a sum over a tensor of ``dtype``: float32 for half precision, else None.

    Example:
        >>> reduction_dtype(torch.bfloat16), reduction_dtype(torch.float64)
        (torch.float32, None)
    """
    return torch.float32 if dtype in HALF_PRECISION else None


def upcast_half(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 if it is half precision; float32 and float64 tensors are returned as they are."""
    return tensor.float() if tensor.dtype in HALF_PRECISION else tensor


def norm_values(tensor: Tensor) -> Tensor:
    """What a norm of ``tensor`` reads: a sparse gradient's coalesced values (``nn.Embedding(sparse=True)``, whose
    repeated ids leave duplicate entries that must be summed first), else ``tensor`` itself."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor


def fp32_norm(tensor: Tensor) -> Tensor:
    """L2 norm accumulated in at least float32 (half-precision gradients would lose the sum); sparse tensors too."""
    return torch.linalg.vector_norm(norm_values(tensor), dtype=reduction_dtype(tensor.dtype))


@dataclass
class BackwardNorms:
    """What one backward pass gave a source: the record every source hands the tracker."""

    sq_norms: Tensor
    """(P, S): squared norm of the gradient each of S small batches gave each of P parts of the watched
    parameters (a whole-gradient source: P = S = 1), still carrying the loss's factors."""
    measured: tuple[bool, ...] = (True,)
    """Which of the P parts received a norm in this backward."""
    by_example: bool = False
    """The S columns are the micro-batch's examples (else the one column is the whole micro-batch)."""
    failed: str | None = None
    """Why the whole backward cannot be measured (a double backward, ...), or None."""


class GradNormSource:
    """Records the norms of gradient pieces during one backward pass and combines them afterwards.

    A source sees the gradient of one backward pass as it is produced (as bucket buffers, parameter
    gradients, or per-example pieces) while :attr:`recording` is true. After the backward pass,
    :meth:`pop_backward` returns the squared norm of each small batch that backward held: one for the whole
    micro-batch (DDP buckets, parameter hooks) or one per example and watched parameter. The norms still
    carry whatever factor the loss had (``1 / accumulate_grad_batches``, the AMP loss scale, each example's
    share of a mean): the caller removes those, so sources stay independent of the training loop.
    """

    name = "base"
    # Why a recording backward that gave this source nothing cannot be measured; None: it held no small batch.
    nothing_recorded: str | None = None

    def __init__(self) -> None:
        self.recording = False
        self.expected_examples: int | None = None  # examples in the micro-batch (for sources that split it)
        self._piece_norms: list[Tensor] = []
        self._handles: list[RemovableHandle] = []  # hooks to remove on detach (a DDP comm hook has none)
        self.notes: list[str] = []  # what the user should hear (once each): the tracker announces and clears them

    def record(self, piece_norm: Tensor) -> None:
        if self.recording:
            self._piece_norms.append(piece_norm)

    def pop_backward(self) -> BackwardNorms | None:
        """The squared norm of the gradient recorded since the last call, as a (1, 1) record; None if none."""
        if not self._piece_norms:
            return None
        norm = torch.linalg.vector_norm(torch.stack(self._piece_norms))
        self._piece_norms = []
        return BackwardNorms(norm.double().square().reshape(1, 1))

    @property
    def attached(self) -> bool:
        """Whether any removable hook is registered."""
        return bool(self._handles)

    def begin_record(self) -> None:
        """A micro-batch this source records begins (before its forward pass)."""

    def before_backward(self, loss: Tensor) -> None:
        """The recorded micro-batch's loss, before its backward pass (its graph intact)."""

    def end_record(self) -> None:
        """Recording stops (after the micro-batch's backward pass)."""

    def detach(self) -> None:
        """Remove whatever the source attached to the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._piece_norms = []
