"""GradientNoiseScaleTracker: the measurement loop without any training framework.

It wires a gradient-norm source to the model, collects each micro-batch's small-batch norms, and at each
optimizer step turns them and the accumulated gradient into small/big-batch statistics for
:class:`~lightning_gns.GradientNoiseScaleMetric` (one all-reduce across processes). The Lightning callback
is glue around it; plain PyTorch and Fabric loops call it directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gns.estimators import SmallBatchSummary
from lightning_gns.metric import GradientNoiseScaleMetric, validate_beta
from lightning_gns.sources import DDPCommHookSource, GradNormSource, ParamHookSource, PerExampleSource
from lightning_gns.sources.per_example import Layers

try:  # public since torch 2.5; FSDP2's parameters and gradients are DTensors
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover - older torch, or built without distributed
    _DTensor = None  # type: ignore[assignment,misc]

SourceMode = Literal["ddp", "microbatch", "per_example"]
SOURCE_MODES: tuple[str, ...] = ("ddp", "microbatch", "per_example")


class GradientNoiseScaleTracker:
    """Measure the gradient noise scale in any training loop.

    Small batches come from the source picked by ``mode``: ``"microbatch"`` (each micro-batch of an
    accumulation window), ``"ddp"`` (each rank's local gradient, per micro-batch when accumulating), or
    ``"per_example"`` (each example, computed in the supported layers). The loss of each micro-batch must
    be its mean over the units passed to :meth:`start_micro_batch`, divided by the accumulation factor,
    as usual for gradient accumulation.

    Args:
        beta: EMA decay per measured optimizer step, in (0, 1).
        layers: ``per_example`` only: ``"all"`` supported layers or ``"norm"`` layers only.
        per_layer: ``per_example`` only: keep one metric per layer in :attr:`layer_metrics`.

    Example (plain PyTorch, one device, 2 micro-batches per step):
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(4, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> tracker = GradientNoiseScaleTracker(beta=0.9)
        >>> tracker.attach(model.parameters(), mode="microbatch")
        >>> for step in range(20):
        ...     for _ in range(2):
        ...         x, y = torch.randn(8, 4), torch.randn(8, 1)
        ...         tracker.start_micro_batch(units=len(x), accumulation=2)
        ...         (nn.functional.mse_loss(model(x), y) / 2).backward()
        ...         tracker.end_micro_batch()
        ...     measured = tracker.measure_step()  # after unscale_, before clipping and optimizer.step()
        ...     optimizer.step()
        ...     optimizer.zero_grad()
        >>> tracker.b_simple > 0
        True
    """

    def __init__(self, beta: float = 0.99, layers: Layers = "all", per_layer: bool = False) -> None:
        self.metric = GradientNoiseScaleMetric(beta=validate_beta(beta), all_reduce=False)
        self.layer_metrics: dict[str, GradientNoiseScaleMetric] = {}
        self.layers: Layers = layers
        self.per_layer = per_layer
        self.mode: str | None = None
        self._comm_hook_source: DDPCommHookSource | None = None
        self._param_hook_source = ParamHookSource()
        self._per_example_source: PerExampleSource | None = None
        self._active_source: GradNormSource | None = None
        self._params: list[nn.Parameter] = []
        self._process_group: Any = None
        self._world_size, self._rank = 1, 0
        # This rank's share of the measured parameters for the big-batch norm (the all-reduce adds the
        # shares), cached for the parameter count it was computed for.
        self._big_norm_share: list[nn.Parameter] = []
        self._big_norm_share_of = -1
        # FSDP2 (fully_shard): parameters and gradients are DTensors, each rank holding a shard, so every rank
        # norms its own shards of all parameters and the all-reduce adds them up.
        self._sharded = False
        self._measuring_step = False
        self._accumulation = 1
        self._micro_batch_units = 0
        self._layer_names: list[str] = []
        self._layer_index_of_share = torch.zeros(0, dtype=torch.long)
        # Running sums of the current optimizer step on this rank (see end_micro_batch).
        self._weighted_sq_sum: Tensor | None = None
        self._num_small = self._units = self._num_backward = 0
        self._inv_units = 0.0
        self._layer_sums: dict[str, Tensor] = {}
        self._layer_backward_counts: dict[str, int] = {}

    # ------------------------------------------------------------------ wiring
    def attach(
        self,
        params: Iterable[nn.Parameter],
        mode: SourceMode,
        model: nn.Module | None = None,
        ddp_model: nn.parallel.DistributedDataParallel | None = None,
        process_group: Any = None,
    ) -> None:
        """Wire the source for ``mode`` to the parameters the optimizer steps.

        Args:
            params: the optimized parameters; the big-batch norm is taken over them (or over the covered
                ones in ``per_example`` mode).
            mode: ``"microbatch"``, ``"ddp"`` or ``"per_example"``.
            model: the module whose layers ``per_example`` hooks (default: ``ddp_model.module``).
            ddp_model: the ``DistributedDataParallel`` wrapper; ``"ddp"`` mode registers its comm hook there
                (falling back to parameter hooks if the model already has one).
            process_group: the group to all-reduce over (default: the whole world when initialized).
        """
        if mode not in SOURCE_MODES:
            raise ValueError(f"Unknown mode {mode!r}. Choose one of {', '.join(repr(m) for m in SOURCE_MODES)}.")
        self.detach()
        self._per_example_source = None
        self._comm_hook_source = None
        self.mode = mode
        self._params = _unique_trainable(params)
        self._process_group = process_group
        distributed = dist.is_available() and dist.is_initialized()
        self._world_size = dist.get_world_size(process_group) if distributed else 1
        self._rank = dist.get_rank(process_group) if distributed else 0
        self._big_norm_share_of = -1
        self._sharded = any(_is_dtensor(p) for p in self._params)
        if self._sharded and mode != "per_example":
            raise ValueError(
                f"Sharded parameters (FSDP2 fully_shard) are supported with mode='per_example' only, got mode={mode!r}:"
                " per-rank and per-micro-batch gradients are never materialised unsharded."
            )
        if mode == "ddp" and ddp_model is not None:
            self._comm_hook_source = _try_comm_hook(ddp_model, self._params)
        elif mode == "per_example":
            module = model if model is not None else getattr(ddp_model, "module", None)
            if module is None:
                raise ValueError("mode='per_example' needs the model: attach(params, 'per_example', model=model).")
            self._per_example_source = PerExampleSource(self.layers)
            self._per_example_source.attach(module, self._params)

    def detach(self) -> None:
        """Remove every hook this tracker registered (a DDP comm hook stays until the wrapper is gone).

        What was measured stays readable (:attr:`covered_fraction` included).
        """
        self._param_hook_source.detach()
        if self._per_example_source is not None:
            self._per_example_source.detach()
        self._clear_step()

    def to(self, device: torch.device | str) -> GradientNoiseScaleTracker:
        """Move the statistics to ``device`` (float32 on MPS, which has no float64)."""
        device = torch.device(device)
        for metric in (self.metric, *self.layer_metrics.values()):
            metric.to(device)
            if device.type == "mps":
                metric.set_dtype(torch.float32)
        return self

    # ------------------------------------------------------------------ readouts
    @property
    def b_simple(self) -> float:
        """``B_simple`` in batch-size units; NaN before the first estimate."""
        return float(self.metric.b_simple)

    @property
    def grad_sq_norm(self) -> float:
        """Bias-corrected EMA of the unbiased ``|G|^2`` estimates."""
        return float(self.metric.grad_sq_norm)

    @property
    def trace_cov(self) -> float:
        """Bias-corrected EMA of the unbiased ``tr(Sigma)`` estimates."""
        return float(self.metric.trace_cov)

    @property
    def source(self) -> str | None:
        """Source that fed the last micro-batch: ``"ddp_comm_hook"``, ``"param_hooks"`` or ``"per_example"``."""
        return self._active_source.name if self._active_source is not None else None

    @property
    def has_per_example_layers(self) -> bool:
        """Whether ``per_example`` mode found at least one supported layer owning an optimized parameter."""
        return self._per_example_source is not None and self._per_example_source.attached

    @property
    def covered_fraction(self) -> float:
        """Fraction of the optimized parameters (by element count) that the estimate covers."""
        total = sum(p.numel() for p in self._params)
        return sum(p.numel() for p in self._measured_params()) / total if total else float("nan")

    # ------------------------------------------------------------------ per micro-batch
    def start_micro_batch(self, units: int, accumulation: int = 1, measure: bool = True) -> None:
        """Call before a micro-batch's forward pass.

        Args:
            units: examples (or tokens) in the micro-batch; its loss is the mean over them.
            accumulation: micro-batches per optimizer step (the loss is divided by it).
            measure: whether this optimizer step is measured (the same for all its micro-batches).
        """
        self._accumulation = accumulation
        self._measuring_step = measure
        self._micro_batch_units = units
        source = self._source_for(accumulation)
        for candidate in (self._comm_hook_source, self._param_hook_source, self._per_example_source):
            if candidate is not None:
                candidate.recording = measure and candidate is source
        self._active_source = source

    def _source_for(self, accumulation: int) -> GradNormSource:
        if self._per_example_source is not None:
            return self._per_example_source
        # The comm hook sees per-rank gradients only when every backward synchronizes.
        if self._comm_hook_source is not None and accumulation == 1:
            return self._comm_hook_source
        if not self._param_hook_source.attached:
            self._param_hook_source.attach(self._params)
        return self._param_hook_source

    def end_micro_batch(self) -> None:
        """Call after a micro-batch's backward pass."""
        if not self._measuring_step or self._active_source is None:
            return
        norms = self._active_source.pop_norms()
        if norms is None:
            return
        # A backward that held n small batches (n = 1, or the examples in per_example mode) saw each one's
        # mean-loss gradient g times its share 1/n of the micro-batch mean (times the loss factor, removed at
        # the step). With size u/n each, its term of A = sum_i b_i |g_i|^2 is u * n * sum_i |raw_i|^2.
        units, n = self._micro_batch_units, norms.numel()
        weight = float(units * n)
        self._weighted_sq_sum = self._accumulate(self._weighted_sq_sum, norms.double().square().sum() * weight)
        self._num_small += n
        self._units += units
        self._inv_units += 1.0 / units
        self._num_backward += 1
        if self.per_layer and self._per_example_source is not None:
            for name, sq in self._per_example_source.last_layer_sq_norms.items():
                self._layer_sums[name] = self._accumulate(self._layer_sums.get(name), sq.double().sum() * weight)
                self._layer_backward_counts[name] = self._layer_backward_counts.get(name, 0) + 1

    @staticmethod
    def _accumulate(total: Tensor | None, term: Tensor) -> Tensor:
        return term if total is None else total + term

    # ------------------------------------------------------------------ per optimizer step
    def measure_step(self, loss_scale: Tensor | float | None = None) -> bool:
        """Fold the optimizer step whose micro-batches were recorded; call before ``optimizer.step()``.

        Call it where ``.grad`` holds the accumulated (and, under DDP, all-reduced) gradient with the AMP
        loss scale removed (after ``scaler.unscale_(optimizer)``) and before gradient clipping. ``loss_scale``
        is the scale the backward passes used (``scaler.get_scale()``, or its tensor to avoid a host sync).
        In a distributed run, call it on every process: it performs one small all-reduce.

        No host synchronisation and no host-to-device copy happen here: the counts known on the host enter
        the packed statistics as scalar fills.

        Returns:
            True if this step was measured (folded into the metric, or counted as skipped there), False if
            it fell between measurements (``measure=False`` at :meth:`start_micro_batch`).
        """
        if not self._measuring_step:
            self._clear_step()
            return False
        device = self.metric.grad_sq_norm_ema.device
        k, m = self._accumulation, self._num_backward
        # Undo the loss factor k / scale of every recorded norm (squared).
        unscale_sq: Tensor | float = float(k * k)
        if loss_scale is not None:
            unscale_sq = k * k / torch.as_tensor(loss_scale).to(device=device, dtype=torch.float64).square()
        nan = torch.full((), float("nan"), dtype=torch.float64, device=device)
        whole = self._weighted_sq_sum if self._weighted_sq_sum is not None else nan
        # .grad = sum over (rank, backward, small batch) of share * g / (world_size * k): the share-weighted
        # mean over the step's small batches is .grad * k / (backward passes per rank), which is also right
        # for a short last window of the epoch.
        params = self._big_norm_params()
        param_sq_norms = _param_sq_norms(params, device)
        sums = [whole.to(device)]
        bigs = [param_sq_norms.sum()]
        layer_metrics: list[GradientNoiseScaleMetric] = []
        if self.per_layer and self._per_example_source is not None:
            big_by_layer = torch.zeros(len(self._layer_names), dtype=torch.float64, device=device)
            big_by_layer.index_add_(0, self._layer_index_of_share, param_sq_norms)
            for i, name in enumerate(self._layer_names):
                complete = self._layer_backward_counts.get(name, 0) == m
                # A layer without a gradient in some backward pass is skipped (NaN) in this step; every rank
                # still sends a row for it, so the all-reduce has the same length everywhere.
                sums.append(self._layer_sums[name].to(device) if complete else nan)
                bigs.append(big_by_layer[i])
                layer_metrics.append(self.layer_metric(name))
        packed = torch.zeros(len(sums), len(SmallBatchSummary._fields) + 1, dtype=torch.float64, device=device)
        packed[:, 0] = torch.stack(sums) * unscale_sq
        packed[:, 1] = float(self._num_small)
        packed[:, 2] = float(self._units)
        packed[:, 3] = float(m)  # sum of shares: 1 per backward pass
        packed[:, 4] = self._inv_units  # sum of share^2 / size: 1 / units per backward pass
        packed[:, 5] = torch.stack(bigs)
        if self._world_size > 1:
            dist.all_reduce(packed, group=self._process_group)
        big_factor = (k / max(m, 1)) ** 2
        for metric, row in zip([self.metric, *layer_metrics], packed, strict=True):
            metric.fold(SmallBatchSummary.from_stacked(row[:-1]), row[-1] * big_factor)
        self._clear_step()
        return True

    def layer_metric(self, name: str) -> GradientNoiseScaleMetric:
        """The metric of one layer (created on first use, on the main metric's device)."""
        if name not in self.layer_metrics:
            metric = GradientNoiseScaleMetric(beta=self.metric.beta, all_reduce=False)
            self.layer_metrics[name] = metric.to(self.metric.grad_sq_norm_ema.device)
        return self.layer_metrics[name]

    def _measured_params(self) -> list[nn.Parameter]:
        if self._per_example_source is not None:
            return self._per_example_source.covered_params()
        return self._params

    def _big_norm_params(self) -> list[nn.Parameter]:
        measured = self._measured_params()
        if len(measured) != self._big_norm_share_of:
            world_size = 1 if self._sharded else self._world_size  # shards already split the work
            self._big_norm_share = _balanced_share(measured, world_size, self._rank)
            self._big_norm_share_of = len(measured)
            if self._per_example_source is not None:
                # Every rank folds the same layers in the same order, whatever its share holds.
                owner = self._per_example_source.owner
                self._layer_names = sorted({owner(p) for p in measured})
                position = {name: i for i, name in enumerate(self._layer_names)}
                device = self.metric.grad_sq_norm_ema.device
                # Built once per change of the covered set, not per step (a host-to-device copy).
                self._layer_index_of_share = torch.tensor(
                    [position[owner(p)] for p in self._big_norm_share], dtype=torch.long, device=device
                )
        return self._big_norm_share

    def _clear_step(self) -> None:
        self._weighted_sq_sum = None
        self._num_small = self._units = self._num_backward = 0
        self._inv_units = 0.0
        self._layer_sums = {}
        self._layer_backward_counts = {}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": _metric_states(self.metric),
            "layer_metrics": {name: _metric_states(m) for name, m in self.layer_metrics.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # copy_ keeps each state on the metric's device, whether this runs before or after .to(device).
        _load_metric_states(self.metric, state_dict["metric"])
        for name, states in state_dict.get("layer_metrics", {}).items():
            _load_metric_states(self.layer_metric(name), states)


def _unique_trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    unique: list[nn.Parameter] = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def _try_comm_hook(
    ddp_model: nn.parallel.DistributedDataParallel, params: list[nn.Parameter]
) -> DDPCommHookSource | None:
    if {id(p) for p in ddp_model.parameters() if p.requires_grad} != {id(p) for p in params}:
        # The buckets would mix in parameters the optimizer does not step (or miss some).
        return None
    source = DDPCommHookSource()
    try:
        source.attach(ddp_model)
    except RuntimeError:
        # Only one comm hook per DDP model: the user's (or DDP mixed precision's) wins.
        return None
    return source


def _metric_states(metric: GradientNoiseScaleMetric) -> dict[str, Tensor]:
    return {name: getattr(metric, name).detach().cpu().clone() for name in metric._defaults}


def _load_metric_states(metric: GradientNoiseScaleMetric, states: dict[str, Tensor]) -> None:
    for name, value in states.items():
        getattr(metric, name).copy_(value)


def _balanced_share(params: list[nn.Parameter], world_size: int, rank: int) -> list[nn.Parameter]:
    """This rank's parameters when the work of one norm is split evenly by size (same on every rank)."""
    if world_size <= 1:
        return list(params)
    loads = [0] * world_size
    share: list[nn.Parameter] = []
    for index in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        loads[owner] += params[index].numel()
        if owner == rank:
            share.append(params[index])
    return share


def _param_sq_norms(params: list[nn.Parameter], device: torch.device) -> Tensor:
    """Squared gradient norm of each parameter (0 where there is no gradient), float64, shape (len(params),)."""
    # A DTensor gradient's local shard: a norm of the DTensor itself would all-reduce once per parameter.
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(len(params), dtype=torch.float64, device=device)
    # One fused pass; half-precision gradients are accumulated in float32.
    norms = iter(torch._foreach_norm(grads, 2, dtype=torch.float32))
    zero = torch.zeros((), dtype=torch.float32, device=device)
    per_param = [next(norms) if p.grad is not None else zero for p in params]
    return torch.stack(per_param).to(device=device, dtype=torch.float64).square()


def _is_dtensor(tensor: Tensor) -> bool:
    return _DTensor is not None and isinstance(tensor, _DTensor)


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined,no-any-return]
