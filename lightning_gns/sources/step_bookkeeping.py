"""The tracker's step layout for sources whose small batches are whole gradients; the base of per-example's."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gns.estimators import COUNT_FIELDS, StepSums
from lightning_gns.sources.sharded import balanced_share, param_sq_norms


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

    def layer_sums(self) -> list[tuple[str, Tensor, Tensor, Tensor]]:
        """Per measured layer: ``A`` and ``|G_big|^2`` of the last unpacked step, and whether its averages must
        restart (:meth:`coverage_shrank`, for that layer's parameters)."""
        return []

    def coverage_shrank(self) -> Tensor | None:
        """Whether the last unpacked step left out a parameter that earlier folded steps measured (a 0-d bool
        tensor, the same on every rank), or None where the coverage never changes."""
        return None

    def contributed(self) -> list[int] | None:
        """Positions (in ``params``) of the parameters whose norms entered the averages so far, for a checkpoint
        (reads the device); None where every step covers every parameter."""
        return None

    def restore_contributed(self, positions: list[int]) -> None:
        """Take :meth:`contributed` from a checkpoint: leaving one of those out later restarts the averages."""

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
