"""Small batches from a DDP communication hook: each rank's local gradient before the all-reduce."""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at run time.
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from lightning_gns.sources.base import GradNormSource, fp32_norm


class DDPCommHookSource(GradNormSource):
    """Norm of each rank's local gradient, read from DDP's gradient buckets before they are all-reduced.

    The hook records the norm of each flat bucket (a handful of large reductions instead of one per
    parameter) and then runs torch's default all-reduce hook, so training is unchanged. DDP calls comm
    hooks only on backward passes that synchronize; under ``no_sync`` (gradient accumulation) the bucket
    would hold a whole window's local sum, so the caller uses :class:`ParamHookSource` for those steps.

    DDP accepts one comm hook per model: :meth:`attach` raises ``RuntimeError`` when the user (or a DDP
    mixed-precision setting) already registered one, and the caller falls back to parameter hooks.
    """

    name = "ddp_comm_hook"

    def __init__(self) -> None:
        super().__init__()
        self.process_group: Optional[dist.ProcessGroup] = None  # noqa: UP045
        # False when DDP's buckets hold other parameters than the measured ones: the hook keeps all-reducing,
        # and the caller takes per-rank norms from parameter hooks instead.
        self.usable = True

    def attach(self, ddp_model: DistributedDataParallel) -> None:
        self.process_group = ddp_model.process_group
        ddp_model.register_comm_hook(state=self, hook=_record_then_allreduce)


def _record_then_allreduce(source: "DDPCommHookSource", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # The norm must be taken before allreduce_hook divides the buffer in place and sends it.
    source.record(fp32_norm(bucket.buffer()))
    return allreduce_hook(source.process_group, bucket)  # type: ignore[arg-type]


def register_comm_hook(
    ddp_model: DistributedDataParallel, announce: Callable[[str], None]
) -> "DDPCommHookSource | None":
    """A source recording from a comm hook on ``ddp_model``; None, announced, where DDP keeps its own or refuses."""
    if getattr(ddp_model, "_comm_hooks", None):
        announce(
            "GradientNoiseScale: the DDP model already has a communication hook (yours, or DDP mixed"
            " precision's), and DDP allows only one, so per-rank gradient norms come from parameter hooks"
            " (source 'param_hooks'): same numbers, one norm per parameter instead of per bucket."
        )
        return None
    source = DDPCommHookSource()
    try:
        source.attach(ddp_model)
    except RuntimeError as error:
        announce(
            f"GradientNoiseScale: could not register its DDP communication hook ({error}); per-rank"
            " gradient norms come from parameter hooks (source 'param_hooks') instead."
        )
        return None
    return source
