"""Small batches from a DDP communication hook: each rank's local gradient before the all-reduce."""

# No `from __future__ import annotations` here: DDP checks the hook's annotations at run time.
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from lightning_gns.sources.base import GradNormSource, fp32_norm
from lightning_gns.sources.left_out import callable_name


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


# torch's comm hooks whose all-reduced gradient is not the mean of the ranks' gradients: a low-rank approximation
# with error feedback (PowerSGD), quantised values, or no all-reduce on most steps (local SGD).
LOSSY_HOOK_MODULES = ("powerSGD_hook", "quantization_hooks", "post_localSGD_hook")
# torch's hooks that all-reduce the gradients rounded to 16 bits: the mean to about 1e-3.
ROUNDING_HOOKS = ("fp16_compress_hook", "bf16_compress_hook", "fp16_compress_wrapper", "bf16_compress_wrapper")


def register_comm_hook(
    ddp_model: DistributedDataParallel, announce: Callable[[str], None]
) -> "DDPCommHookSource | None":
    """A source recording from a comm hook on ``ddp_model``; None, announced, where DDP keeps its own or refuses.

    Raises:
        ValueError: the model's hook is one of torch's lossy ones (PowerSGD, quantisation, local SGD): the
            all-reduced gradient, the big batch, is then not the mean of the ranks' gradients.
    """
    hooks = getattr(ddp_model, "_comm_hooks", None)
    if hooks:
        names = [callable_name(hook) for hook, _ in hooks]
        lossy = [n for n in names if any(f".{module}." in f".{n}" for module in LOSSY_HOOK_MODULES)]
        if lossy:
            raise ValueError(
                f"GradientNoiseScale cannot measure with the DDP communication hook {lossy[0]}: the gradient it"
                " leaves in .grad (the big batch) is a compressed or local approximation, not the mean of the"
                " ranks' gradients, and B_simple would be wrong (about half the truth with PowerSGD). Measure in a"
                " run without that hook (the default all-reduce or fp16_compress_hook), or remove the callback."
            )
        rounding = any(any(r in n for r in ROUNDING_HOOKS) for n in names)
        known = all(n.endswith("default_hooks.allreduce_hook") for n in names)
        what = (
            "same numbers"
            if known
            else "the gradients rounded to 16 bits by it move .grad by about 1e-3 and a step's tr(Sigma) by up to ~1%"
            if rounding
            else "right if the hook leaves the mean of the ranks' gradients in .grad, as DDP's all-reduce does; a"
            " hook that compresses them (low-rank, quantised) makes B_simple wrong"
        )
        announce(
            f"GradientNoiseScale: the DDP model already has a communication hook ({', '.join(names)}: yours, or DDP"
            " mixed precision's), and DDP allows only one, so per-rank gradient norms come from parameter hooks"
            f" (source 'param_hooks'), one norm per parameter instead of per bucket: {what}."
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
