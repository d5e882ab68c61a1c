"""The sources a tracker wires for its mode, and which of them records each micro-batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from lightning_gns.sources.base import GradNormSource
from lightning_gns.sources.ddp_averaged import bucketed_params
from lightning_gns.sources.ddp_comm_hook import DDPCommHookSource, register_comm_hook
from lightning_gns.sources.param_hooks import ParamHookSource
from lightning_gns.sources.per_example import PerExampleSource


class SourceSet:
    """A DDP comm hook (``ddp`` mode), parameter hooks (attached on first use) and the per-example source.

    Args:
        announce: how fallbacks are told to the user (once per message).
    """

    def __init__(self, announce: Callable[[str], None]) -> None:
        self._announce = announce
        self.comm_hook: DDPCommHookSource | None = None
        self._comm_hook_model: nn.Module | None = None
        self.param_hooks = ParamHookSource()
        self.per_example: PerExampleSource | None = None
        self.active: GradNormSource | None = None  # the source that fed the last micro-batch

    def all(self) -> list[GradNormSource]:
        return [s for s in (self.comm_hook, self.param_hooks, self.per_example) if s is not None]

    def use_comm_hook(self, ddp_model: nn.parallel.DistributedDataParallel, params: list[nn.Parameter]) -> None:
        """Take per-rank norms from a communication hook on ``ddp_model`` where its buckets hold ``params``."""
        if self._comm_hook_model is not ddp_model:
            self._comm_hook_model = ddp_model
            self.comm_hook = register_comm_hook(ddp_model, self._announce)
        if self.comm_hook is not None:
            # Ignored parameters (delay_all_reduce_named_params among them) are all-reduced outside the buckets,
            # if at all: the hook would not see their per-rank gradients.
            self.comm_hook.usable = bucketed_params(ddp_model) == {id(p) for p in params}
            if not self.comm_hook.usable:
                self._announce(
                    "GradientNoiseScale: DDP's gradient buckets hold other parameters than the optimizer steps"
                    " (frozen, unfrozen or unoptimized parameters), so per-rank gradient norms come from parameter"
                    " hooks on the optimized parameters (source 'param_hooks')."
                )

    def pick(
        self, params: list[nn.Parameter], accumulation: int, names: Mapping[int, str] | None = None
    ) -> GradNormSource:
        """The source for a micro-batch of a step of ``accumulation`` micro-batches (``names``: id -> name)."""
        if self.per_example is not None:
            return self.per_example
        # The comm hook sees per-rank gradients only when every backward synchronizes.
        comm = self.comm_hook
        if comm is not None and comm.usable and accumulation == 1:
            return comm
        if not self.param_hooks.attached:
            self.param_hooks.attach(params, names)
        return self.param_hooks

    def start(self, source: GradNormSource, measure: bool, examples: int | None) -> None:
        """Let ``source`` alone record the micro-batch (none when not ``measure``), of ``examples`` examples."""
        for candidate in self.all():
            candidate.recording = measure and candidate is source
        source.expected_examples = examples
        self.active = source
        if measure:
            source.begin_record()

    def stop(self) -> None:
        """Record nothing more (gradients outside the training backward are not recorded)."""
        for source in self.all():
            source.recording = False
            source.end_record()

    def drop(self) -> None:
        """Forget whatever the sources recorded since their last record was taken."""
        for source in self.all():
            source.pop_backward()

    def detach(self) -> None:
        """Remove every hook registered (a DDP comm hook stays until the wrapper is gone)."""
        for source in self.all():
            if source is not self.comm_hook:
                source.detach()
            source.recording = False
