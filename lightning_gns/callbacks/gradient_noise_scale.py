"""GradientNoiseScale: measure B_simple from the gradients training already computes."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gns.batch_size import BatchSizeFn, checked_batch_size, leading_dim_batch_size
from lightning_gns.metric import GradientNoiseScaleMetric, validate_beta
from lightning_gns.sources import DDPCommHookSource, GradNormSource, ParamHookSource

Mode = Literal["auto", "ddp", "microbatch"]
MODES: tuple[str, ...] = ("auto", "ddp", "microbatch")


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
    - ``mode="auto"`` (default): ``"ddp"`` with several processes, else ``"microbatch"``.

    Gradients are read before gradient clipping, with the AMP loss scale and the accumulation factor
    removed; no gradient is copied. Steps whose gradients are not finite (an overflowed fp16 step) are
    skipped and counted. Nothing is synchronised with the host except on logging steps.

    Logged (on logging steps, through ``LightningModule.log``, so any Lightning logger receives them):

    - ``gns/b_simple``: bias-corrected EMA of ``tr(Sigma)`` over that of ``|G|^2``, in batch-size units
      (examples by default, whatever ``batch_size_fn`` counts otherwise).
    - ``gns/grad_sq_norm``: EMA of the unbiased ``|G|^2`` estimate (squared gradient norm per unit).
    - ``gns/trace_cov``: EMA of the unbiased ``tr(Sigma)`` estimate (gradient variance per unit).
    - ``gns/b_small``, ``gns/b_big``: mean small-batch size and big-batch size of the last measured step.
    - ``gns/skipped_steps``: measured steps that could not be used (non-finite gradients, or fewer than
      two small batches).

    After each optimizer step, ``b_simple``, ``grad_sq_norm`` and ``trace_cov`` read as Python floats.

    Args:
        beta: EMA decay per measured optimizer step, in (0, 1).
        mode: ``"auto"``, ``"ddp"`` or ``"microbatch"``.
        batch_size_fn: ``batch -> int``, the examples (or tokens) in a micro-batch. The training loss must
            be the mean over these units. Default: the leading dimension of the first tensor in the batch.
        prog_bar: show ``gns/b_simple`` in the progress bar.
        measure_every_n_steps: measure every n-th optimizer step (the EMA then spans about
            ``n / (1 - beta)`` steps). 1 measures every step.

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
    ) -> None:
        self.beta = validate_beta(beta)
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}. Choose one of {', '.join(repr(m) for m in MODES)}.")
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
        self.metric = GradientNoiseScaleMetric(beta=self.beta)

        self._comm_hook_source: DDPCommHookSource | None = None
        self._param_hook_source = ParamHookSource()
        self._active_source: GradNormSource | None = None
        self._params: list[nn.Parameter] = []
        # This rank's share of the parameters for the big-batch norm (the all-reduce sums the shares).
        self._big_norm_params: list[nn.Parameter] = []
        self._big_norm_is_partial = False
        self._measuring = False
        self._accumulation = 1
        self._micro_batch_size = 0
        # One entry per small batch of the current optimizer step on this rank.
        self._small_norms: list[Tensor] = []
        self._small_sizes: list[int] = []

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
    def source(self) -> str | None:
        """Name of the source that fed the last measured step (``"ddp_comm_hook"`` or ``"param_hooks"``)."""
        return self._active_source.name if self._active_source is not None else None

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
        self.metric.to(trainer.strategy.root_device)
        if trainer.strategy.root_device.type == "mps":  # MPS has no float64
            self.metric.set_dtype(torch.float32)

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
            if several_processes:
                return "ddp"
            if max_accumulation > 1:
                return "microbatch"
            raise MisconfigurationException(
                "GradientNoiseScale(mode='auto') needs at least two small batches per optimizer step, and this run"
                " has one process without gradient accumulation. Either set Trainer(accumulate_grad_batches=2)"
                " or more (mode='microbatch': each micro-batch is a small batch), or train on several devices"
                " with strategy='ddp' (mode='ddp': each rank's batch is a small batch)."
            )
        if mode == "ddp" and not several_processes:
            raise MisconfigurationException(
                f"GradientNoiseScale(mode='ddp') needs DDP with more than one process, got {type(strategy).__name__}"
                f" with world_size={trainer.world_size}. Use Trainer(devices=N, strategy='ddp') with N >= 2, or"
                " mode='microbatch' with accumulate_grad_batches >= 2."
            )
        if mode == "microbatch" and max_accumulation < 2:
            raise MisconfigurationException(
                "GradientNoiseScale(mode='microbatch') needs gradient accumulation: set"
                " Trainer(accumulate_grad_batches=2) or more, or use mode='ddp' on several devices."
            )
        return mode

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Optimizers and the DDP wrapper exist from here on, and no backward has run yet.
        self._params = _optimized_params(trainer.optimizers)
        world_size, rank = trainer.world_size, trainer.global_rank
        self._big_norm_is_partial = world_size > 1
        self._big_norm_params = _balanced_share(self._params, world_size, rank)
        self._comm_hook_source = None
        if self.mode == "ddp":
            self._comm_hook_source = self._try_comm_hook(trainer)

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
        self._param_hook_source.detach()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._param_hook_source.detach()
        self._small_norms, self._small_sizes = [], []

    # ------------------------------------------------------------------ per micro-batch
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._accumulation = trainer.accumulate_grad_batches
        self._measuring = trainer.global_step % self.measure_every_n_steps == 0
        self._micro_batch_size = checked_batch_size(self.batch_size_fn, batch) if self._measuring else 0
        source = self._source_for(self._accumulation)
        for candidate in (self._comm_hook_source, self._param_hook_source):
            if candidate is not None:
                candidate.recording = self._measuring and candidate is source
        self._active_source = source

    def _source_for(self, accumulation: int) -> GradNormSource:
        # The comm hook sees per-rank gradients only when every backward synchronizes.
        if self._comm_hook_source is not None and accumulation == 1:
            return self._comm_hook_source
        if not self._param_hook_source._handles:
            self._param_hook_source.attach(self._params)
        return self._param_hook_source

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._measuring or self._active_source is None:
            return
        norm = self._active_source.pop_norm()
        if norm is not None:
            self._small_norms.append(norm)
            self._small_sizes.append(self._micro_batch_size)

    # ------------------------------------------------------------------ per optimizer step
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        # Gradients here are accumulated, all-reduced and unscaled, and not yet clipped.
        if self._measuring:
            self._measure_step(trainer)
        if (trainer.loggers or self.prog_bar) and trainer._logger_connector.should_update_logs:
            self._log(pl_module)

    def _measure_step(self, trainer: Trainer) -> None:
        device = self.metric.grad_sq_norm_ema.device
        k = self._accumulation
        num_micro_batches = len(self._small_norms)
        # Each backward saw the gradient of (micro-batch mean loss) / k, times the AMP loss scale.
        loss_factor = torch.tensor(1.0 / k, dtype=torch.float64, device=device)
        scale = _amp_loss_scale(trainer)
        if scale is not None:
            loss_factor = loss_factor * scale.to(device=device, dtype=torch.float64)
        if num_micro_batches:
            raw_norms = torch.stack(self._small_norms).to(device=device, dtype=torch.float64)
        else:
            raw_norms = torch.zeros(0, dtype=torch.float64, device=device)
        small_sq_norms = (raw_norms / loss_factor).square()
        sizes = torch.tensor(self._small_sizes, dtype=torch.float64, device=device)
        # .grad = sum over (rank, micro-batch) of g / (world_size * k); the equal-weight mean over the
        # step's small batches is .grad * k / (micro-batches per rank), which is also right for a short
        # last window of the epoch.
        big_sq_norm = _sq_norm(self._big_norm_params, device) * (k / max(num_micro_batches, 1)) ** 2
        self.metric.update(
            small_sq_norms,
            sizes,
            big_sq_norm,
            small_weights=torch.ones_like(sizes),
            big_sq_norm_is_partial=self._big_norm_is_partial,
        )
        self._small_norms, self._small_sizes = [], []

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
        states = {name: getattr(self.metric, name).detach().cpu().clone() for name in self.metric._defaults}
        return {"metric": states, "beta": self.beta}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # copy_ keeps each state on the metric's device, whether this runs before or after setup().
        for name, value in state_dict["metric"].items():
            getattr(self.metric, name).copy_(value)


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


def _sq_norm(params: list[nn.Parameter], device: torch.device) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    # One fused pass; half-precision gradients are accumulated in float32.
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms))
    return total.to(device=device, dtype=torch.float64).square()


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
