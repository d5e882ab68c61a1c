"""What the tracker keeps per watched parameter in ``per_example`` mode, between and across its steps.

One part per watched parameter: each step packs ``A_p``, this rank's share of ``|G_big,p|^2``, whether the
parameter got per-example norms and whether a rank found it unmeasurable, for the tracker's one all-reduce.
Parameters found unmeasurable on any rank are excluded from both norms from then on, on every rank alike;
the coverage, the left-out reasons and the per-layer split are read from here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gns.estimators import StepSums
from lightning_gns.sources.left_out import unwatched_reasons
from lightning_gns.sources.per_example import Layers, PerExampleSource, batch_coupled_layers
from lightning_gns.sources.sharded import param_sq_norms
from lightning_gns.sources.step_bookkeeping import StepBookkeeping


def attach_per_example(model: nn.Module | None, params: list[nn.Parameter], layers: Layers) -> PerExampleSource:
    """A per-example source hooked to ``model``'s layers that own any of ``params``.

    Raises:
        ValueError: no model, or a model with batch-coupled layers (BatchNorm).
    """
    if model is None:
        raise ValueError("mode='per_example' needs the model: attach(params, 'per_example', model=model).")
    coupled = batch_coupled_layers(model)
    if coupled:
        raise ValueError(
            f"mode='per_example' cannot measure a model with batch-coupled layers ({', '.join(coupled[:3])}"
            f"{', ...' if len(coupled) > 3 else ''}): BatchNorm makes each example's gradient depend on the"
            " rest of the batch, so per-example gradients are not independent samples and their spread is"
            " not the gradient noise. Use mode='microbatch' with gradient accumulation (2 or more"
            " micro-batches per step), mode='ddp' on several processes, or replace BatchNorm by GroupNorm or"
            " LayerNorm."
        )
    source = PerExampleSource(layers)
    source.attach(model, params)
    return source


class PerExampleBookkeeping(StepBookkeeping):
    """The per-example source's step layout, exclusions (agreed by every rank), coverage and per-layer split.

    Args:
        source: the attached per-example source.
        model: the module it hooks (for why the parameters it does not watch are left out).
        params: the optimized parameters.
        layers: the source's ``layers`` option.
    """

    def __init__(
        self,
        source: PerExampleSource,
        model: nn.Module,
        params: list[nn.Parameter],
        layers: Layers,
        world_size: int,
        rank: int,
        device: torch.device,
        sharded: bool = False,
    ) -> None:
        super().__init__(source.params, world_size, rank, device, sharded)
        self.source = source
        n_params = len(source.params)
        self.size = 4 * n_params
        # Why each optimized parameter the source does not watch is left out, from the model's structure.
        watched = {id(p) for p in source.params}
        self.unwatched = unwatched_reasons(model, [p for p in params if id(p) not in watched], layers)
        index = {id(p): i for i, p in enumerate(source.params)}
        share = [index[id(p)] for p in self.share]
        self._share_index = torch.tensor(share, dtype=torch.long, device=device)
        self._share_is_all = share == list(range(n_params))  # this rank norms every watched parameter, in order
        # Watched parameters that cannot be measured (agreed by every rank), element counts, the layer of
        # each, and device copies of host flag tuples (the same tuple nearly every step).
        self._excluded = torch.zeros(n_params, dtype=torch.bool, device=device)
        self._numels = torch.tensor([p.numel() for p in source.params], dtype=torch.float64, device=device)
        # Layers left out whole at attach get no per-layer metric: their parameters go to a last, unread column.
        measurable = [n for i, n in enumerate(source.param_layers) if i not in source.excluded]
        self._layer_names = sorted(set(measurable))
        position = {name: i for i, name in enumerate(self._layer_names)}
        unread = len(self._layer_names)
        self._layer_index = torch.tensor(
            [position.get(n, unread) for n in source.param_layers], dtype=torch.long, device=device
        )
        self._flag_tensors: dict[tuple[bool, ...], Tensor] = {}
        self._bad_flags: tuple[int, Tensor] | None = None  # (len(source.excluded) it was built for, flags)
        self._last: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # A, big, measured, keep of the last step
        # Parameters whose norms entered a step so far, and those of them the last step left out: the averages
        # so far include them, and restart (coverage_shrank).
        self._contributed = torch.zeros(n_params, dtype=torch.bool, device=device)
        self._lost = torch.zeros(n_params, dtype=torch.bool, device=device)

    def _parts(self, out: Tensor) -> tuple[Tensor, ...]:
        n_params = len(self.source.params)
        return out.view(4, n_params).unbind()

    def pack(self, out: Tensor, sums: StepSums, unscale_sq: Tensor | float) -> None:
        """Per watched parameter: ``A_p``, this rank's share of ``|G_big,p|^2``, whether it got per-example
        norms, and whether it was found unmeasurable."""
        device = out.device
        share_sq_norms = param_sq_norms(self.share, device, self.sharded)
        a_part, big_part, measured_part, bad_part = self._parts(out)
        total = sums.size_weighted_sq_norm_sum
        if sums.failed is not None or total is None:
            a_part.fill_(float("nan"))
            measured_part.fill_(1.0)  # no inference about unmeasured parameters from a failed step
        else:
            torch.mul(total.to(device), unscale_sq, out=a_part)
            measured_part.copy_(self._flags(sums.measured, device))
        if self.sharded or self._share_is_all:
            big_part.copy_(share_sq_norms)
        else:
            big_part.zero_().index_copy_(0, self._share_index, share_sq_norms)
        bad_part.copy_(self._bad_part_flags(device))

    def unpack(self, out: Tensor) -> tuple[Tensor, Tensor]:
        a_part, big_part, measured_part, bad_part = self._parts(out)
        # A parameter that some rank found unmeasurable, or that has a gradient nobody measured per example
        # (its layer never ran as a module), is left out of both norms from now on, on every rank alike.
        excluded = self._excluded | (bad_part > 0) | ((measured_part == 0) & (big_part > 0))
        self._lost = excluded & ~self._excluded & self._contributed
        self._excluded = excluded
        self._contributed |= ~excluded & (measured_part > 0) & torch.isfinite(a_part)
        keep = (~excluded).to(torch.float64)
        a_kept, big_kept = a_part * keep, big_part * keep
        self._last = (a_kept, big_kept, measured_part, keep)
        return a_kept.sum(), big_kept.sum()

    def coverage_shrank(self) -> Tensor:
        return self._lost.any()

    def contributed(self) -> list[int] | None:
        return self._contributed.nonzero().flatten().tolist()

    def restore_contributed(self, positions: list[int]) -> None:
        self._contributed.zero_()
        self._contributed[torch.tensor(positions, dtype=torch.long, device=self._contributed.device)] = True

    def layer_sums(self) -> list[tuple[str, Tensor, Tensor, Tensor]]:
        assert self._last is not None
        a_kept, big_kept, measured_part, keep = self._last
        n_layers = len(self._layer_names)
        by_layer = torch.zeros(4, n_layers + 1, dtype=torch.float64, device=a_kept.device)
        for row, values in enumerate((a_kept, big_kept, measured_part * keep, self._lost.to(torch.float64))):
            by_layer[row].index_add_(0, self._layer_index, values)
        # A layer that nothing measured in this step (unused everywhere, or excluded) skips it.
        a_layer = torch.where(by_layer[2] > 0, by_layer[0], torch.full_like(by_layer[0], float("nan")))
        lost = by_layer[3] > 0
        return [
            (name, a_layer[i], by_layer[1, i], lost[i])
            for i, name in enumerate(self._layer_names)
            if name not in self.source.left_out_layers()  # nothing in it can ever be measured: no metric
        ]

    def _bad_part_flags(self, device: torch.device) -> Tensor:
        # The source's exclusions only grow: rebuilt when their number changes, not per step.
        source = self.source
        n_excluded = len(source.excluded)
        if self._bad_flags is None or self._bad_flags[0] != n_excluded:
            flags = tuple(i in source.excluded for i in range(len(source.params)))
            self._bad_flags = (n_excluded, self._flags(flags, device))
        return self._bad_flags[1]

    def _flags(self, flags: tuple[bool, ...], device: torch.device) -> Tensor:
        # Cached per distinct tuple: a fresh host-to-device copy every step would cost more than the flags.
        tensor = self._flag_tensors.get(flags)
        if tensor is None:
            tensor = torch.tensor(flags, dtype=torch.float64, device=device)
            self._flag_tensors[flags] = tensor
        return tensor

    def covered_fraction(self, total: float) -> Tensor | None:
        covered = (self._numels * (~self._excluded).to(self._numels.dtype)).sum()
        return covered / total

    def covered_elements(self) -> int:
        self.read_exclusions()
        return sum(p.numel() for p in self.source.covered_params())

    def read_exclusions(self) -> None:
        """Copy the exclusions agreed on the device (with the reason) into the source's host-side record."""
        if not self._excluded.numel():
            return
        for index in self._excluded.nonzero().flatten().tolist():
            self.source.exclude(
                index,
                "received a gradient without its layer's per-example hooks firing (a weight used outside its"
                " module's forward, as nn.MultiheadAttention does with out_proj, or by a functional call), or"
                " another process found it unmeasurable",
            )

    def left_out(self) -> dict[int, str]:
        self.read_exclusions()
        reasons = dict(self.unwatched)
        for i, reason in self.source.excluded.items():
            reasons[id(self.source.params[i])] = reason
        return reasons

    def to(self, device: torch.device, dtype: torch.dtype) -> None:
        super().to(device, dtype)
        self._excluded = self._excluded.to(device)
        self._contributed, self._lost = self._contributed.to(device), self._lost.to(device)
        self._numels = self._numels.to(device=device, dtype=dtype)
        self._share_index = self._share_index.to(device)
        self._layer_index = self._layer_index.to(device)
        self._flag_tensors, self._bad_flags = {}, None
        self._last = None
