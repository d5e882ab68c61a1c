"""What every source of small-batch gradient norms provides."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gns.estimators import COUNT_FIELDS, StepSums
from lightning_gns.sources.sharded import balanced_share, param_sq_norms

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


def fp32_norm(tensor: Tensor) -> Tensor:
    """L2 norm accumulated in at least float32 (half-precision gradients would lose the sum)."""
    return torch.linalg.vector_norm(tensor, dtype=reduction_dtype(tensor.dtype))


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

    def detach(self) -> None:
        """Remove whatever the source attached to the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._piece_norms = []


class StepBookkeeping:
    """How the tracker packs an optimizer step for its one all-reduce, and what the estimate covers.

    This base serves sources whose small batches are whole gradients: one part, packed as ``[A, this rank's
    share of |G_big|^2]``, covering every measured parameter. The per-example source keeps one part per
    watched parameter (:class:`~lightning_gns.sources.per_example_bookkeeping.PerExampleBookkeeping`).
    """

    def __init__(
        self, params: list[nn.Parameter], world_size: int, rank: int, device: torch.device, sharded: bool = False
    ) -> None:
        self.params = params
        self.sharded = sharded
        # This rank's share of the big-batch norm (the all-reduce adds the shares); FSDP2 shards already split
        # the work: every rank norms its own shards of all parameters.
        self.share = balanced_share(params, 1 if sharded else world_size, rank)
        self.size = 2  # floats packed before the step's counts
        self._packed: Tensor | None = None

    def buffer(self, device: torch.device) -> Tensor:
        """The float64 buffer a step packs into (:attr:`size` floats, then the counts), reused from step to step.

        Nothing keeps a reference to it past the step (the metric copies what it keeps), so one allocation
        serves the whole run.
        """
        buffer = self._packed
        if buffer is None or buffer.device != device:
            buffer = self._packed = torch.zeros(self.size + COUNT_FIELDS, dtype=torch.float64, device=device)
        return buffer

    def pack(self, out: Tensor, sums: StepSums, unscale_sq: Tensor | float) -> None:
        """This rank's ``A`` (the loss factors removed by ``unscale_sq``) and share of ``|G_big|^2`` into ``out``."""
        share_sq_norms = param_sq_norms(self.share, out.device, self.sharded)
        total = sums.size_weighted_sq_norm_sum
        if total is None or sums.failed is not None:
            out[:1].fill_(float("nan"))
        else:
            torch.mul(total.to(out.device), unscale_sq, out=out[:1])
        torch.sum(share_sq_norms, dim=0, out=out[1])

    def unpack(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """``A`` and ``|G_big|^2`` of the covered parameters from :meth:`pack`'s ``out`` summed over processes."""
        return out[0], out[1]

    def layer_sums(self) -> list[tuple[str, Tensor, Tensor]]:
        """Per measured layer: ``A`` and ``|G_big|^2`` of the last unpacked step."""
        return []

    def covered_fraction(self, total: float) -> Tensor | None:
        """Covered share of ``total`` elements as a device tensor (no sync), or None when everything is covered."""
        return None

    def covered_elements(self) -> int:
        """Elements of the parameters the estimate covers (may read the device)."""
        return sum(p.numel() for p in self.params)

    def left_out(self) -> dict[int, str]:
        """Parameter id -> why the estimate leaves it out (may read the device)."""
        return {}

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move the bookkeeping's tensors to where the statistics live."""
        self._packed = None
