"""Which parameters DDP averages: the big batch exists only for those.

DDP builds its reducer from the parameters that needed a gradient when it wrapped the model, less those it was
told to ignore (``_ddp_params_and_buffers_to_ignore``); ``delay_all_reduce_named_params`` are all-reduced after
the backward instead. A parameter outside both (a backbone frozen when DDP wrapped the model and unfrozen since,
as BackboneFinetuning does; an ignored one) trains on each process's own gradient, never averaged, and the
processes' copies drift apart in torch itself: its ``.grad`` is no big batch, in any mode and with any comm hook.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn


def bucketed_params(ddp_model: nn.parallel.DistributedDataParallel) -> set[int]:
    """Ids of the parameters ``ddp_model``'s gradient buckets would hold if it wrapped the model now: those that need
    a gradient, less the ignored ones (``delay_all_reduce_named_params`` among them)."""
    ignored = set(getattr(ddp_model, "parameters_to_ignore", ()))
    return {id(p) for n, p in ddp_model.module.named_parameters() if p.requires_grad and n not in ignored}


def _bytes(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _listed(params: list[nn.Parameter], names: Mapping[int, str]) -> str:
    shown = ", ".join(names.get(id(p), "?") for p in params[:8]) + (", ..." if len(params) > 8 else "")
    return f"{sum(p.numel() for p in params):,} elements ({shown})"


@dataclass(frozen=True)
class DDPAveraged:
    """The parameters a DDP wrapper averages, read when the wrapper is first seen (before any training batch).

    ``bucketed`` is a snapshot of what needed a gradient then; DDP's own count of its reducer's bytes, where
    torch exposes it, confirms it. If the two disagree (something changed ``requires_grad`` between the wrap and
    the snapshot), only the count is trusted and the check compares sizes instead of parameters.
    """

    module_params: frozenset[int]  # ids of every parameter of the wrapped module
    bucketed: frozenset[int]  # ids in DDP's gradient buckets (comm hooks see these)
    delayed: frozenset[int]  # ids all-reduced after the backward (delay_all_reduce_named_params)
    reducer_bytes: int | None  # DDP's own count of its buckets' parameters, None where torch does not say
    snapshot_confirmed: bool  # the snapshot holds no more than DDP's count (or torch gives no count)

    @classmethod
    def of(cls, ddp_model: nn.parallel.DistributedDataParallel) -> DDPAveraged:
        named = list(ddp_model.module.named_parameters())
        bucketed = frozenset(bucketed_params(ddp_model))
        delayed = frozenset(id(p) for p in getattr(ddp_model, "_delay_all_reduce_params", ()))
        reducer_bytes: int | None
        try:  # a private method, in torch since 1.9: confirmation only
            reducer_bytes = int(ddp_model._get_ddp_logging_data()["total_parameter_size_bytes"])
        except Exception:  # absent or changed in this torch: the snapshot alone decides
            reducer_bytes = None
        bucketed_bytes = _bytes(p for _, p in named if id(p) in bucketed and id(p) not in delayed)
        confirmed = reducer_bytes is None or reducer_bytes >= bucketed_bytes
        return cls(frozenset(id(p) for _, p in named), bucketed - delayed, delayed, reducer_bytes, confirmed)

    def not_averaged(self, params: Iterable[nn.Parameter], names: Mapping[int, str]) -> str | None:
        """Why some of ``params`` (the optimized trainable ones) have no all-reduced gradient, or None."""
        own = [p for p in params if id(p) in self.module_params]
        delayed = [p for p in own if id(p) in self.delayed]
        if delayed:
            return (
                f"GradientNoiseScale: DDP all-reduces {_listed(delayed, names)} after the backward, asynchronously"
                " (delay_all_reduce_named_params), where no hook of this callback can read their per-process"
                " gradients: these steps are skipped. Measure in a run without delay_all_reduce_named_params."
            )
        if self.snapshot_confirmed or self.reducer_bytes is None:
            missing = [p for p in own if id(p) not in self.bucketed]
            if not missing:
                return None
            what = f"{_listed(missing, names)} of the {sum(p.numel() for p in own):,} optimized elements"
        else:
            unaveraged = _bytes(own) - self.reducer_bytes  # may miss some: a size, not a set
            if unaveraged <= 0:
                return None
            what = f"{unaveraged:,} of the {_bytes(own):,} bytes of optimized parameters"
        return (
            f"GradientNoiseScale: DDP does not average {what}: DDP averages only the parameters that needed a"
            " gradient when it wrapped the model (and were not in _ddp_params_and_buffers_to_ignore), so"
            " parameters unfrozen since (BackboneFinetuning, a manual unfreeze) train on each process's own"
            " gradient and their copies drift apart (in torch itself). There is no big batch to measure: these"
            " steps are skipped. Unfreeze those parameters before Trainer.fit wraps the model (and freeze them by"
            " their learning rate instead), or train them on one process."
        )
