"""GradientNoiseScale: measure B_simple from the gradients training already computes."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gns.batch_size import BatchSizeFn, checked_batch_size, leading_dim_batch_size
from lightning_gns.estimators import SmallBatchSummary, summarize_small_batches
from lightning_gns.metric import GradientNoiseScaleMetric, validate_beta
from lightning_gns.sources import DDPCommHookSource, GradNormSource, ParamHookSource, PerExampleSource
from lightning_gns.sources.per_example import Layers

Mode = Literal["auto", "ddp", "microbatch", "per_example"]
MODES: tuple[str, ...] = ("auto", "ddp", "microbatch", "per_example")
LAYERS: tuple[str, ...] = ("all", "norm")


class GradientNoiseScale(Callback):
    r"""Measure the simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` during training.

    McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training") show that ``B_simple``
    estimates the largest batch size that still speeds training up. It is measured from gradient norms
    at two batch sizes that training computes anyway:

    - ``mode="ddp"``: each rank's local gradient (before the all-reduce) is a small batch, the
      all-reduced gradient is the big batch. With gradient accumulation, every (rank, micro-batch)
      gradient is a small batch.
    - ``mode="microbatch"``: with ``accumulate_grad_batches > 1``, each micro-batch's gradient is a small
      batch and the accumulated gradient is the big batch.
    - ``mode="per_example"``: each example's gradient is a small batch (``B_small = 1``, the most precise
      choice), computed inside the supported layers; works on one device without accumulation, with
      accumulation, and under DDP.
    - ``mode="auto"`` (default): ``"ddp"`` with several processes, ``"microbatch"`` with accumulation,
      else ``"per_example"``.

    Gradients are read before gradient clipping, with the AMP loss scale and the accumulation factor
    removed; no gradient is copied. Steps whose gradients are not finite (an overflowed fp16 step) are
    skipped and counted. Nothing is synchronised with the host except on logging steps.

    Logged (on logging steps, through ``LightningModule.log``, so any Lightning logger receives them):

    - ``gns/b_simple``: bias-corrected EMA of ``tr(Sigma)`` over that of ``|G|^2``, in batch-size units
      (examples by default, whatever ``batch_size_fn`` counts otherwise).
    - ``gns/grad_sq_norm``: EMA of the unbiased ``|G|^2`` estimate (squared gradient norm).
    - ``gns/trace_cov``: EMA of the unbiased ``tr(Sigma)`` estimate (per-unit gradient variance).
    - ``gns/b_small``, ``gns/b_big``: mean small-batch size and big-batch size of the last measured step.
    - ``gns/skipped_steps``: measured steps that could not be used (non-finite gradients, or fewer than
      two small batches).
    - ``gns/covered_fraction`` (``per_example``): fraction of the optimized parameters (by element count)
      the estimate covers; parameters of unsupported layers are left out of both batch sizes' norms.
    - ``gns/layer/<layer name>/b_simple`` (``per_layer=True``): B_simple of each layer's parameters.

    After each optimizer step, ``b_simple``, ``grad_sq_norm`` and ``trace_cov`` read as Python floats.

    Args:
        beta: EMA decay per measured optimizer step, in (0, 1).
        mode: ``"auto"``, ``"ddp"``, ``"microbatch"`` or ``"per_example"``.
        batch_size_fn: ``batch -> int``, the examples (or tokens) in a micro-batch. The training loss must
            be the mean over these units. Default: the leading dimension of the first tensor in the batch.
            In ``per_example`` mode each example counts ``batch_size_fn(batch) / len(batch)`` units.
        prog_bar: show ``gns/b_simple`` in the progress bar.
        measure_every_n_steps: measure every n-th optimizer step (the EMA then spans about
            ``n / (1 - beta)`` steps). 1 measures every step.
        layers: ``per_example`` only: ``"all"`` supported layers, or ``"norm"`` (LayerNorm/RMSNorm only,
            nearly free; Gray et al. 2024 find it tracks the whole-model noise scale).
        per_layer: ``per_example`` only: also log B_simple per layer.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gns import GradientNoiseScale

        gns = GradientNoiseScale()
        trainer = Trainer(accumulate_grad_batches=4, callbacks=[gns])
        trainer.fit(model)
        print(gns.b_simple)
    """

    def __init__(
        self,
        beta: float = 0.99,
        mode: Mode = "auto",
        batch_size_fn: BatchSizeFn | None = None,
        prog_bar: bool = False,
        measure_every_n_steps: int = 1,
        layers: Layers = "all",
        per_layer: bool = False,
    ) -> None:
        self.beta = validate_beta(beta)
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}. Choose one of {', '.join(repr(m) for m in MODES)}.")
        if layers not in LAYERS:
            raise ValueError(f"Unknown layers {layers!r}. Choose 'all' (every supported layer) or 'norm'.")
        if (layers != "all" or per_layer) and mode not in ("auto", "per_example"):
            raise ValueError(
                f"layers={layers!r} and per_layer={per_layer} need per-example gradients: use mode='per_example'"
                f" (got mode={mode!r})."
            )
        if (
            isinstance(measure_every_n_steps, bool)
            or not isinstance(measure_every_n_steps, int)
            or (measure_every_n_steps < 1)
        ):
            raise ValueError(f"measure_every_n_steps must be an int >= 1, got {measure_every_n_steps!r}.")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ValueError(f"batch_size_fn must be a callable batch -> int, got {batch_size_fn!r}.")
        self.requested_mode: str = mode
        self.mode: str | None = None
        self.batch_size_fn: BatchSizeFn = batch_size_fn or leading_dim_batch_size
        self.prog_bar = prog_bar
        self.measure_every_n_steps = measure_every_n_steps
        self.layers: Layers = layers
        self.per_layer = per_layer
        self.metric = GradientNoiseScaleMetric(beta=self.beta, all_reduce=False)
        self.layer_metrics: dict[str, GradientNoiseScaleMetric] = {}

        self._comm_hook_source: DDPCommHookSource | None = None
        self._param_hook_source = ParamHookSource()
        self._per_example_source: PerExampleSource | None = None
        self._active_source: GradNormSource | None = None
        self._params: list[nn.Parameter] = []
        self._world_size, self._rank = 1, 0
        # This rank's share of the measured parameters for the big-batch norm (the all-reduce adds the
        # shares), cached for the parameter count it was computed for.
        self._big_norm_share: list[nn.Parameter] = []
        self._big_norm_share_of = -1
        self._measuring = False
        self._accumulation = 1
        self._micro_batch_units = 0
        # One entry per backward pass of the current optimizer step on this rank: the norms of the small
        # batches it held, the units (examples or tokens) of the whole micro-batch, and per-layer splits.
        self._small_norms: list[Tensor] = []
        self._micro_batch_sizes: list[int] = []
        self._layer_sq_norms: list[dict[str, Tensor]] = []

    # ------------------------------------------------------------------ readouts
    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.requested_mode, beta=self.beta)

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
    def skipped_steps(self) -> int:
        """Measured optimizer steps that could not enter the averages."""
        return int(self.metric.skipped_steps)

    @property
    def layer_b_simple(self) -> dict[str, float]:
        """``per_layer=True``: B_simple of each layer's parameters, by layer name."""
        return {name: float(m.b_simple) for name, m in self.layer_metrics.items()}

    @property
    def source(self) -> str | None:
        """Source that fed the last measured step: ``"ddp_comm_hook"``, ``"param_hooks"`` or ``"per_example"``."""
        return self._active_source.name if self._active_source is not None else None

    @property
    def covered_fraction(self) -> float:
        """Fraction of the optimized parameters (by element count) that the estimate covers."""
        total = sum(p.numel() for p in self._params)
        return sum(p.numel() for p in self._measured_params()) / total if total else float("nan")

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "GradientNoiseScale supports automatic optimization only (LightningModule.automatic_optimization ="
                " True, with Trainer(accumulate_grad_batches=...) for accumulation). In a manual-optimization loop,"
                " feed lightning_gns.GradientNoiseScaleMetric yourself."
            )
        self.mode = self._resolve_mode(trainer)
        if (self.layers != "all" or self.per_layer) and self.mode != "per_example":
            raise MisconfigurationException(
                f"layers={self.layers!r} / per_layer=True need per-example gradients, but mode='auto' chose"
                f" {self.mode!r} for this run. Pass mode='per_example'."
            )
        device = trainer.strategy.root_device
        for metric in (self.metric, *self.layer_metrics.values()):
            metric.to(device)
            if device.type == "mps":  # MPS has no float64
                metric.set_dtype(torch.float32)

    def _resolve_mode(self, trainer: Trainer) -> str:
        strategy = trainer.strategy
        max_accumulation = _max_accumulation(trainer)
        is_ddp = isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
        if not (is_ddp or isinstance(strategy, SingleDeviceStrategy)):
            raise MisconfigurationException(
                f"GradientNoiseScale supports single-device training and DDP (strategy='ddp', 'ddp_spawn', ...),"
                f" not {type(strategy).__name__}. Use Trainer(strategy='ddp') or one device."
            )
        if is_ddp and max_accumulation > 1 and getattr(strategy, "_ddp_kwargs", {}).get("static_graph", False):
            raise MisconfigurationException(
                "DDP static_graph=True with accumulate_grad_batches > 1 crashes inside torch itself"
                " (pytorch/pytorch#143580), with or without GradientNoiseScale. Use DDPStrategy(static_graph=False)"
                " or accumulate_grad_batches=1."
            )
        several_processes = is_ddp and trainer.world_size > 1
        mode = self.requested_mode
        if mode == "auto":
            if self.layers != "all" or self.per_layer:
                return "per_example"
            if several_processes:
                return "ddp"
            return "microbatch" if max_accumulation > 1 else "per_example"
        if mode == "ddp" and not several_processes:
            raise MisconfigurationException(
                f"GradientNoiseScale(mode='ddp') needs DDP with more than one process, got {type(strategy).__name__}"
                f" with world_size={trainer.world_size}. Use Trainer(devices=N, strategy='ddp') with N >= 2,"
                " mode='microbatch' with accumulate_grad_batches >= 2, or mode='per_example'."
            )
        if mode == "microbatch" and max_accumulation < 2:
            raise MisconfigurationException(
                "GradientNoiseScale(mode='microbatch') needs gradient accumulation: set"
                " Trainer(accumulate_grad_batches=2) or more, or use mode='per_example' (works without"
                " accumulation) or mode='ddp' on several devices."
            )
        return mode

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Optimizers and the DDP wrapper exist from here on, and no backward has run yet.
        self._params = _optimized_params(trainer.optimizers)
        self._world_size, self._rank = trainer.world_size, trainer.global_rank
        self._big_norm_share_of = -1
        self._comm_hook_source = None
        self._per_example_source = None
        if self.mode == "ddp":
            self._comm_hook_source = self._try_comm_hook(trainer)
        elif self.mode == "per_example":
            self._per_example_source = PerExampleSource(self.layers)
            self._per_example_source.attach(pl_module, self._params)

    def _try_comm_hook(self, trainer: Trainer) -> DDPCommHookSource | None:
        ddp_model = trainer.strategy.model
        if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
            return None
        ddp_params = {id(p) for p in ddp_model.parameters() if p.requires_grad}
        if ddp_params != {id(p) for p in self._params}:
            # The buckets would mix in parameters the optimizer does not step (or miss some).
            return None
        source = DDPCommHookSource()
        try:
            source.attach(ddp_model)
        except RuntimeError:
            # Only one comm hook per DDP model: the user's (or DDP mixed precision's) wins.
            return None
        return source

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach_sources()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._detach_sources()
        self._clear_step()

    def _detach_sources(self) -> None:
        self._param_hook_source.detach()
        if self._per_example_source is not None:
            self._per_example_source.detach()

    # ------------------------------------------------------------------ per micro-batch
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._accumulation = trainer.accumulate_grad_batches
        self._measuring = trainer.global_step % self.measure_every_n_steps == 0
        self._micro_batch_units = checked_batch_size(self.batch_size_fn, batch) if self._measuring else 0
        source = self._source_for(self._accumulation)
        for candidate in (self._comm_hook_source, self._param_hook_source, self._per_example_source):
            if candidate is not None:
                candidate.recording = self._measuring and candidate is source
        self._active_source = source

    def _source_for(self, accumulation: int) -> GradNormSource:
        if self._per_example_source is not None:
            return self._per_example_source
        # The comm hook sees per-rank gradients only when every backward synchronizes.
        if self._comm_hook_source is not None and accumulation == 1:
            return self._comm_hook_source
        if not self._param_hook_source._handles:
            self._param_hook_source.attach(self._params)
        return self._param_hook_source

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._measuring or self._active_source is None:
            return
        norms = self._active_source.pop_norms()
        if norms is None:
            return
        self._small_norms.append(norms)
        self._micro_batch_sizes.append(self._micro_batch_units)
        if self.per_layer and self._per_example_source is not None:
            self._layer_sq_norms.append(self._per_example_source.last_layer_sq_norms)

    # ------------------------------------------------------------------ per optimizer step
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        # Gradients here are accumulated, all-reduced and unscaled, and not yet clipped.
        if self._measuring:
            self._measure_step(trainer)
        if (trainer.loggers or self.prog_bar) and trainer._logger_connector.should_update_logs:
            self._log(pl_module)

    def _measure_step(self, trainer: Trainer) -> None:
        """Turn the step's raw norms into small-batch statistics and fold them, with one all-reduce."""
        device = self.metric.grad_sq_norm_ema.device
        k = self._accumulation
        num_micro_batches = len(self._small_norms)
        # Each backward saw the gradient of (micro-batch mean loss) / k, times the AMP loss scale.
        loss_factor = torch.tensor(1.0 / k, dtype=torch.float64, device=device)
        scale = _amp_loss_scale(trainer)
        if scale is not None:
            loss_factor = loss_factor * scale.to(device=device, dtype=torch.float64)
        # A backward that held n small batches (n examples in per_example mode) saw each one's mean-loss
        # gradient times its share 1/n of the micro-batch mean, so its weight in the big batch is 1/n.
        counts = [norms.numel() for norms in self._small_norms]
        shares = torch.tensor([1.0 / n for n in counts for _ in range(n)], dtype=torch.float64, device=device)
        sizes = torch.tensor(
            [units / n for units, n in zip(self._micro_batch_sizes, counts, strict=True) for _ in range(n)],
            dtype=torch.float64,
            device=device,
        )
        if num_micro_batches:
            raw_norms = torch.cat(self._small_norms).to(device=device, dtype=torch.float64)
        else:
            raw_norms = torch.zeros(0, dtype=torch.float64, device=device)
        small_sq_norms = (raw_norms / (loss_factor * shares)).square()
        # .grad = sum over (rank, micro-batch, small batch) of share * g / (world_size * k): the share-weighted
        # mean over the step's small batches is .grad * k / (micro-batches per rank), which is also right for
        # a short last window of the epoch.
        big_factor = (k / max(num_micro_batches, 1)) ** 2
        params = self._big_norm_params()
        param_sq_norms = _param_sq_norms(params, device)
        entries = [(self.metric, summarize_small_batches(small_sq_norms, sizes, shares), param_sq_norms.sum())]
        if self.per_layer and self._per_example_source is not None:
            entries += self._layer_entries(params, param_sq_norms, loss_factor, sizes, shares, device)
        self._fold(entries, big_factor)
        self._clear_step()

    def _layer_entries(
        self,
        params: list[nn.Parameter],
        param_sq_norms: Tensor,
        loss_factor: Tensor,
        sizes: Tensor,
        shares: Tensor,
        device: torch.device,
    ) -> list[tuple[GradientNoiseScaleMetric, SmallBatchSummary, Tensor]]:
        assert self._per_example_source is not None
        big_by_layer: dict[str, Tensor] = {}
        for param, sq in zip(params, param_sq_norms.unbind(), strict=True):
            name = self._per_example_source.owner(param)
            big_by_layer[name] = big_by_layer[name] + sq if name in big_by_layer else sq
        # Every rank folds the same layers in the same order, whatever its share of the big-batch norm holds.
        names = sorted({self._per_example_source.owner(p) for p in self._measured_params()})
        entries = []
        missing = torch.zeros(0, dtype=torch.float64, device=device)
        for name in names:
            layer_sq = [per_layer.get(name) for per_layer in self._layer_sq_norms]
            if any(sq is None for sq in layer_sq) or not layer_sq:
                # The layer got no gradient in some micro-batch: NaN skips it, and keeps every rank's
                # all-reduce the same length.
                small = missing.new_full(sizes.shape, float("nan"))
            else:
                raw = torch.cat([sq for sq in layer_sq if sq is not None]).to(device=device, dtype=torch.float64)
                small = raw / (loss_factor * shares).square()
            big = big_by_layer.get(name, torch.zeros((), dtype=torch.float64, device=device))
            entries.append((self._layer_metric(name, device), summarize_small_batches(small, sizes, shares), big))
        return entries

    def _layer_metric(self, name: str, device: torch.device) -> GradientNoiseScaleMetric:
        if name not in self.layer_metrics:
            self.layer_metrics[name] = GradientNoiseScaleMetric(beta=self.beta, all_reduce=False).to(device)
        return self.layer_metrics[name]

    def _fold(
        self, entries: list[tuple[GradientNoiseScaleMetric, SmallBatchSummary, Tensor]], big_factor: float
    ) -> None:
        """Sum every metric's statistics (and big-norm shares) over ranks in one all-reduce, then fold."""
        packed = torch.stack([torch.cat([summary.stack(), big.reshape(1)]) for _, summary, big in entries])
        if self._world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed)
        for (metric, _, _), row in zip(entries, packed, strict=True):
            metric.fold(SmallBatchSummary.from_stacked(row[:-1]), row[-1] * big_factor)

    def _measured_params(self) -> list[nn.Parameter]:
        if self._per_example_source is not None:
            return self._per_example_source.covered_params()
        return self._params

    def _big_norm_params(self) -> list[nn.Parameter]:
        measured = self._measured_params()
        if len(measured) != self._big_norm_share_of:
            self._big_norm_share = _balanced_share(measured, self._world_size, self._rank)
            self._big_norm_share_of = len(measured)
        return self._big_norm_share

    def _clear_step(self) -> None:
        self._small_norms, self._micro_batch_sizes, self._layer_sq_norms = [], [], []

    def _log(self, pl_module: LightningModule) -> None:
        metric = self.metric
        values = {
            "gns/b_simple": metric.b_simple,
            "gns/grad_sq_norm": metric.grad_sq_norm,
            "gns/trace_cov": metric.trace_cov,
            "gns/b_small": metric.last_b_small,
            "gns/b_big": metric.last_b_big,
            "gns/skipped_steps": metric.skipped_steps,
        }
        if self._per_example_source is not None:
            values["gns/covered_fraction"] = torch.tensor(self.covered_fraction)
        for name, layer_metric in self.layer_metrics.items():
            values[f"gns/layer/{name}/b_simple"] = layer_metric.b_simple
        for name, value in values.items():
            pl_module.log(
                name,
                value.to(torch.float32),
                on_step=True,
                on_epoch=False,
                prog_bar=self.prog_bar and name == "gns/b_simple",
                batch_size=1,
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": _metric_states(self.metric),
            "layer_metrics": {name: _metric_states(m) for name, m in self.layer_metrics.items()},
            "beta": self.beta,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # copy_ keeps each state on the metric's device, whether this runs before or after setup().
        _load_metric_states(self.metric, state_dict["metric"])
        for name, states in state_dict.get("layer_metrics", {}).items():
            _load_metric_states(self._layer_metric(name, self.metric.grad_sq_norm_ema.device), states)


def _metric_states(metric: GradientNoiseScaleMetric) -> dict[str, Tensor]:
    return {name: getattr(metric, name).detach().cpu().clone() for name in metric._defaults}


def _load_metric_states(metric: GradientNoiseScaleMetric, states: dict[str, Tensor]) -> None:
    for name, value in states.items():
        getattr(metric, name).copy_(value)


def _max_accumulation(trainer: Trainer) -> int:
    values = [trainer.accumulate_grad_batches]
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, GradientAccumulationScheduler):
            values.extend(callback.scheduling.values())
    return max(values)


def _optimized_params(optimizers: list[Optimizer]) -> list[nn.Parameter]:
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params


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
    with_grad = [i for i, p in enumerate(params) if p.grad is not None]
    sq_norms = torch.zeros(len(params), dtype=torch.float64, device=device)
    if with_grad:
        # One fused pass; half-precision gradients are accumulated in float32.
        norms = torch._foreach_norm([params[i].grad for i in with_grad], 2, dtype=torch.float32)  # type: ignore[misc]
        values = torch.stack(norms).to(device=device, dtype=torch.float64).square()
        if len(with_grad) == len(params):
            return values
        sq_norms[torch.tensor(with_grad, device=device)] = values
    return sq_norms


def _amp_loss_scale(trainer: Trainer) -> Tensor | None:
    """The GradScaler scale the step's backward passes used, as a tensor (``get_scale()`` would sync)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, Tensor):
        return scale
    return torch.tensor(float(scaler.get_scale()))


__all__ = ["GradientNoiseScale"]
