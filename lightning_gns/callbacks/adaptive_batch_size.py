"""AdaptiveBatchSize: grow the effective batch with the measured noise scale through gradient accumulation.

The hooks live in :class:`AdaptiveBatchSizeBase`, which imports no Lightning namespace; the public
``AdaptiveBatchSize`` classes add the ``Callback`` base of ``lightning.pytorch`` or ``pytorch_lightning``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_gns import scalars
from lightning_gns._deprecation import warn_renamed
from lightning_gns.batch_schedule import (
    LR_SCALINGS,
    TARGETS,
    LrScaling,
    NoiseScaleStatistics,
    Target,
    TargetFn,
    interval_accumulation,
    is_safe_boundary,
    lr_factor,
    sqrt_schedule,
)
from lightning_gns.batch_size import checked_batch_size
from lightning_gns.callbacks._arguments import checked_int
from lightning_gns.callbacks._checkpoint import ADAPTIVE_RENAMED_KEYS, renamed_keys, validate_adaptive_state
from lightning_gns.callbacks._logging import log_scalars
from lightning_gns.callbacks._namespace import LightningNamespace
from lightning_gns.callbacks.gradient_noise_scale import GradientNoiseScaleBase, is_fitting

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer


def _same_number(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError, RuntimeError):
        return False


class AdaptiveBatchSizeBase(LightningNamespace):
    r"""Grow ``accumulate_grad_batches`` so that the effective batch follows the measured gradient noise scale.

    Reads the :class:`~lightning_gns.GradientNoiseScale` callback, which must be in the same ``Trainer``. The
    effective batch (micro-batch x accumulation x ranks, in the noise scale's units) follows ``target``,
    decided on a confidence interval of ``B_simple``; a change waits for a safe boundary of Lightning's
    accumulation windows and multiplies the learning rate by the ``lr_scaling`` factor, only while
    ``optimizer.step()`` runs (a learning rate set inside the step, e.g. in ``on_before_optimizer_step``, is kept
    without the factor, with a warning). ``history`` (changes)
    and ``decisions`` (every decision step) give the reasons; checkpoints carry the state. The rules, the
    defaults and the benchmark behind them: docs/adaptive.md.

    Logged on logging steps: ``gns/effective_batch_size``, ``gns/accumulation``, ``gns/lr_factor``.

    Args:
        target: ``"b_simple"`` (``calibration x B_simple``), ``"sqrt"`` (``sqrt(r * calibration * B_simple)``)
            or a function of :class:`~lightning_gns.batch_schedule.NoiseScaleStatistics` returning the wanted
            effective batch (in the noise scale's units), called on the global-zero rank.
        r: ``target="sqrt"`` only: the ``r`` of ``sqrt(r * B_simple)``, in batch units. Default: the starting
            effective batch.
        calibration: ``B_crit / B_simple``: the named targets use ``calibration x B_simple``. The default 0.25
            is the benchmark's: early in training the critical batch sits well below ``B_simple``.
        max_growth: largest factor by which one change may grow (or shrink) the effective batch; ``math.inf``
            for no limit.
        z: standard errors of the confidence bounds decisions are made on (0: on the estimate itself).
        min_samples: effective number of per-step estimates the noise-scale EMA must hold before a change.
        min_accumulation: smallest accumulation to use (the start is clamped into the bounds).
        max_accumulation: largest accumulation to use.
        warmup_steps: optimizer steps before the first change.
        min_steps_between_changes: optimizer steps from one change taking effect to the next decision (the first
            change waits for ``warmup_steps`` only).
        tolerance: relative band around the current effective batch inside which the target changes nothing.
        monotonic: only grow the batch.
        lr_scaling: the learning-rate factor for ``S`` = effective batch / starting one: ``"none"`` (1),
            ``"linear"`` (``S``), ``"sqrt"`` (``sqrt(S)``) or ``"adascale"`` (AdaScale's gain, 1 to ``S``).
        check_every_n_steps: look at the target every n optimizer steps.
        prog_bar: show ``gns/accumulation`` in the progress bar.

    Example::

        from lightning.pytorch import Trainer
        from lightning_gns import AdaptiveBatchSize, GradientNoiseScale

        trainer = Trainer(
            accumulate_grad_batches=1,  # the start, which the configured learning rate is taken to suit
            callbacks=[GradientNoiseScale(), AdaptiveBatchSize(max_accumulation=32)],
        )
        trainer.fit(model)
    """

    def __init__(
        self,
        target: Target | TargetFn = "b_simple",
        r: float | None = None,
        calibration: float = 0.25,
        max_growth: float = 2.0,
        z: float = 1.0,
        min_samples: float = 10.0,
        min_accumulation: int = 1,
        max_accumulation: int = 64,
        warmup_steps: int = 50,
        min_steps_between_changes: int = 50,
        tolerance: float = 0.25,
        monotonic: bool = True,
        lr_scaling: LrScaling = "sqrt",
        check_every_n_steps: int = 10,
        prog_bar: bool = False,
    ) -> None:
        if not callable(target) and target not in TARGETS:
            raise ValueError(
                f"Unknown target {target!r}. Choose {', '.join(repr(t) for t in TARGETS)}, or pass a function"
                " NoiseScaleStatistics -> wanted effective batch size."
            )
        if r is not None:
            if target != "sqrt":
                raise ValueError(
                    f"r is the r of target='sqrt' (sqrt(r * B_simple)); got r={r!r} with target={target!r}."
                )
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
                raise ValueError(f"r must be a positive finite number (a batch size), got {r!r}.")
        self.calibration = _positive("calibration", calibration, "a B_crit / B_simple ratio such as 0.5")
        self.max_growth = _positive("max_growth", max_growth, "2.0 doubles at most", minimum=1.0, infinite=True)
        if isinstance(min_samples, (int, float)) and min_samples == 0:
            min_samples = 0.0  # no check
        else:
            min_samples = _positive("min_samples", min_samples, "10 effective steps, or 0 for no check")
        self.min_samples = float(min_samples)
        if isinstance(z, bool) or not isinstance(z, (int, float)) or not (0 <= z < math.inf):
            raise ValueError(
                f"z must be a finite number >= 0 (standard errors of the confidence bound: 1.0, or 0 to decide"
                f" on the estimate itself), got {z!r}."
            )
        self.z = float(z)
        self.min_accumulation = checked_int("min_accumulation", min_accumulation, minimum=1)
        self.max_accumulation = checked_int("max_accumulation", max_accumulation, minimum=1)
        if self.max_accumulation < self.min_accumulation:
            raise ValueError(
                f"max_accumulation ({max_accumulation}) must be at least min_accumulation ({min_accumulation})."
            )
        self.warmup_steps = checked_int("warmup_steps", warmup_steps, minimum=0)
        self.min_steps_between_changes = checked_int("min_steps_between_changes", min_steps_between_changes, 1)
        self.check_every_n_steps = checked_int("check_every_n_steps", check_every_n_steps, minimum=1)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (0 <= tolerance < math.inf):
            raise ValueError(f"tolerance must be a finite number >= 0 (0.25: a 25% band), got {tolerance!r}.")
        if lr_scaling not in LR_SCALINGS:
            raise ValueError(
                f"Unknown lr_scaling {lr_scaling!r}. Choose one of {', '.join(repr(s) for s in LR_SCALINGS)}."
            )
        self.target = target
        self.r = None if r is None else float(r)
        self.tolerance = float(tolerance)
        self.monotonic = bool(monotonic)
        self.lr_scaling: LrScaling = lr_scaling
        self.prog_bar = prog_bar

        # Training state, saved in checkpoints.
        self.accumulation: int | None = None
        self.base_accumulation: int | None = None  # at the start: the learning rate is taken to be tuned for it
        self.lr_factor = 1.0
        self.pending: tuple[int, float] | None = None
        self.last_change_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.decisions: list[dict[str, Any]] = []
        self.pending_record: dict[str, Any] | None = None

        self._restored = False
        self._world_size: int | None = None  # the processes of this fit (saved: a resume on another count is said)
        self._saved_world_size: int | None = None
        self._skip_next_load = False  # the state Lightning restores for validate/test/predict(ckpt_path=...)
        # Units of every micro-batch of the epoch so far, and how many: their mean is the schedule's micro-batch. It
        # follows token counts that vary from batch to batch and a loader whose batch changes (reload_dataloaders_
        # every_n_epochs, a resume). Read on every micro-batch, not only on the optimizer steps': those would weigh
        # the epoch's short last micro-batch as one of len/k reads instead of one of len. A count that is a tensor
        # is added on its device, and read on logging and deciding steps only.
        self._epoch_units: int | float | Tensor = 0
        self._epoch_micro_batches: int | float = 0
        self._units_epoch: int | None = None  # the epoch the sums above belong to (checkpointed with them)
        # The sums of the epoch before (or the checkpoint's mean), for readouts before this epoch's first micro-batch.
        self._earlier_units: tuple[int | float | Tensor, int | float] | None = None
        # What load_state_dict needs beyond the callback's own state, gathered by on_load_checkpoint.
        self._resume_context: dict[str, Any] = {}
        self._gns: GradientNoiseScaleBase | None = None
        self._handles: list[RemovableHandle] = []
        # Optimizer id -> (each group's learning rate before the step, the scaled one set for the step).
        self._unscaled_lrs: dict[int, tuple[list[Any], list[Any]]] = {}
        # Optimizer id -> how many step() calls are open: torch runs the step hooks of a subclass whose step() calls
        # super().step() twice (once per patched class), and the factor must be applied once, by the outermost.
        self._step_depth: dict[int, int] = {}
        self._mid_window_said = False
        self._lr_overwrite_said = False

    # ------------------------------------------------------------------ readouts
    @property
    def reference_accumulation(self) -> int | None:
        """Deprecated name of ``base_accumulation`` (the accumulation the learning rate was tuned for)."""
        warn_renamed("AdaptiveBatchSize.reference_accumulation", "it is now called base_accumulation")
        return self.base_accumulation

    @property
    def gns(self) -> GradientNoiseScaleBase:
        """The ``GradientNoiseScale`` callback this one reads (found at setup)."""
        if self._gns is None:
            raise RuntimeError("AdaptiveBatchSize finds its GradientNoiseScale callback in Trainer.fit(); none yet.")
        return self._gns

    @property
    def micro_batch_size(self) -> float | None:
        """The mean micro-batch of the epoch so far, in the noise scale's units (None before the first one).

        Reads a count the ``batch_size_fn`` may keep on the device: the callback reads it on logging and
        deciding steps only.
        """
        units, count = (
            (self._epoch_units, self._epoch_micro_batches)
            if self._epoch_micro_batches
            else (self._earlier_units or (0, 0))
        )
        return max(1.0, float(units) / count) if count else None

    def effective_batch_size(self, world_size: int = 1) -> float:
        """Mean micro-batch x accumulation x ``world_size`` in the noise scale's units (NaN before the first step)."""
        micro = self.micro_batch_size
        if micro is None or self.accumulation is None:
            return math.nan
        return float(micro * self.accumulation * world_size)

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        why = "changes Trainer.accumulate_grad_batches, which exists in automatic optimization only"
        self._check_fit(trainer, pl_module, "AdaptiveBatchSize", why)
        scheduler = self._lightning("callbacks").GradientAccumulationScheduler
        if any(isinstance(callback, scheduler) for callback in trainer.callbacks):  # type: ignore[attr-defined]
            raise self._misconfiguration(
                "AdaptiveBatchSize and GradientAccumulationScheduler both set accumulate_grad_batches. Remove the"
                " GradientAccumulationScheduler from Trainer(callbacks=...) (bound the accumulation with"
                " AdaptiveBatchSize(min_accumulation=..., max_accumulation=...) instead)."
            )
        if trainer.strategy.handles_gradient_accumulation:
            raise self._misconfiguration(
                f"{type(trainer.strategy).__name__} accumulates gradients itself and ignores"
                " Trainer.accumulate_grad_batches, so AdaptiveBatchSize cannot change it. Use one device or"
                " strategy='ddp'."
            )
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None) or {}
        if self.max_accumulation > 1 and ddp_kwargs.get("static_graph", False):
            raise self._misconfiguration(
                "DDP static_graph=True with accumulate_grad_batches > 1 crashes inside torch itself"
                " (pytorch/pytorch#143580), and AdaptiveBatchSize may raise the accumulation up to"
                f" max_accumulation={self.max_accumulation}. Use DDPStrategy(static_graph=False)."
            )
        found = [cb for cb in trainer.callbacks if isinstance(cb, GradientNoiseScaleBase)]  # type: ignore[attr-defined]
        if not found:
            raise self._misconfiguration(
                "AdaptiveBatchSize reads the noise scale from a GradientNoiseScale callback, and Trainer(callbacks=...)"
                " has none. Add one: Trainer(callbacks=[GradientNoiseScale(), AdaptiveBatchSize(...)]) with"
                " `from lightning_gns import AdaptiveBatchSize, GradientNoiseScale`."
            )
        self._gns = found[0]
        self._gns.adaptive_batch_size_attached = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Every callback's setup has run by now, so the GradientNoiseScale mode is resolved whatever the order
        # of the callbacks; on one process the checkpoint state (if any) is loaded too.
        gns = self.gns
        if gns.mode != "microbatch" or trainer.world_size > 1:
            return  # under DDP every rank's micro-batch is a small batch: two or more per step at any accumulation
        lowest, why = self._lowest_accumulation(trainer)
        if lowest >= 2:
            return
        chosen = " (mode='auto' chose it for accumulate_grad_batches > 1)" if gns.requested_mode == "auto" else ""
        raise self._misconfiguration(
            f"AdaptiveBatchSize can lower the accumulation to {lowest} ({why}), but GradientNoiseScale measures in"
            f" mode='microbatch'{chosen} on one process, which needs at least 2 micro-batches per optimizer step:"
            " with 1, nothing is measured, the noise scale freezes and the schedule keeps deciding on a stale"
            " value. Use AdaptiveBatchSize(min_accumulation=2) or more, or AdaptiveBatchSize(monotonic=True) with"
            " a starting Trainer(accumulate_grad_batches=2) or more, or GradientNoiseScale(mode='per_example')"
            " (small batches of one example, at any accumulation)."
        )

    def _lowest_accumulation(self, trainer: Trainer) -> tuple[int, str]:
        """The smallest accumulation this callback may use from here on, and why."""
        if self._restored and self.accumulation is not None:
            # An out-of-bounds restored accumulation is already pending its clamped value (see load_state_dict).
            settled = self.pending[0] if self.pending is not None else self.accumulation
            start = f"the checkpoint's accumulation is {settled}"
        else:
            settled = min(max(trainer.accumulate_grad_batches, self.min_accumulation), self.max_accumulation)
            start = f"it starts at accumulate_grad_batches={settled}"
        if self.monotonic:
            return settled, start + " and monotonic=True never shrinks it"
        return self.min_accumulation, f"monotonic=False with min_accumulation={self.min_accumulation}"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Applied here rather than in load_state_dict: depending on the strategy, the checkpoint's callback
        # state arrives before or after on_fit_start, but always before the first training batch.
        self._world_size = trainer.world_size
        saved, self._saved_world_size = self._saved_world_size, None
        if saved is not None and saved != trainer.world_size and self.accumulation is not None:
            self._lightning("utilities.rank_zero").rank_zero_warn(
                f"AdaptiveBatchSize: the checkpoint was saved on {saved} process(es) and this fit runs on"
                f" {trainer.world_size}. Its accumulation ({self.accumulation}), learning-rate factor"
                f" ({self.lr_factor:g}) and any pending change were decided for the effective batch of {saved}"
                f" process(es); here the same accumulation makes a batch {trainer.world_size / saved:g}x as large,"
                " and the factor is kept as saved. Resume on the same number of processes to continue the schedule as"
                " decided."
            )
        continued = (
            self.accumulation is not None
            and trainer.global_step > 0
            and trainer.accumulate_grad_batches == self.accumulation
        )  # a second fit() of the same Trainer, which still holds the accumulation this callback set
        if not continued and (not self._restored or self.accumulation is None):
            start = trainer.accumulate_grad_batches
            self.accumulation = min(max(start, self.min_accumulation), self.max_accumulation)
            if self.accumulation != start:
                # The batch the learning rate was tuned for changes: say so rather than train another run quietly.
                self._lightning("utilities.rank_zero").rank_zero_warn(
                    f"AdaptiveBatchSize: Trainer(accumulate_grad_batches={start}) lies outside [min_accumulation="
                    f"{self.min_accumulation}, max_accumulation={self.max_accumulation}]: training starts at"
                    f" {self.accumulation} micro-batches per step, and lr_scaling takes the learning rate to be tuned"
                    f" for that. Set accumulate_grad_batches within the bounds, or widen them, to start where meant."
                )
            self.base_accumulation = self.accumulation
            self.lr_factor = 1.0
            self.pending = None
            self.last_change_step = None
            self.history = [{"step": trainer.global_step, "accumulation": self.accumulation, "lr_factor": 1.0}]
            self.decisions = []
            self.pending_record = None
        assert self.accumulation is not None
        trainer.accumulate_grad_batches = self.accumulation
        self._refuse_learning_rates_without_a_value(trainer)
        self._remove_hooks()
        self._step_depth = {}
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._scale_lr))
            self._handles.append(optimizer.register_step_post_hook(self._unscale_lr))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # An error (or Ctrl-C) inside optimizer.step() skips the post-hook: the optimizer would keep, and a
        # checkpoint written on the exception save, the scaled learning rate, to be scaled again on resume.
        for optimizer in trainer.optimizers:
            self._step_depth.pop(id(optimizer), None)  # whatever step() calls were open, none is now
            self._unscale_lr(optimizer, (), {})

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint written inside optimizer.step() (trainer.save_checkpoint in the closure) holds the scaled
        # learning rate: store the unscaled one, which the factor is applied to after a resume.
        states = checkpoint.get("optimizer_states")
        if self._unscaled_lrs and isinstance(states, list) and len(states) == len(trainer.optimizers):
            for optimizer, state in zip(trainer.optimizers, states, strict=True):
                saved = self._unscaled_lrs.get(id(optimizer))
                if saved is not None:
                    for group, unscaled in zip(state["param_groups"], saved[0], strict=True):
                        group["lr"] = unscaled
        if is_fitting(trainer) and _inside_a_window(trainer) and not self._mid_window_said:
            self._mid_window_said = True
            self._lightning("utilities.rank_zero").rank_zero_warn(
                f"AdaptiveBatchSize: a checkpoint is saved in the middle of an accumulation window (after"
                f" micro-batch {trainer.fit_loop.epoch_loop.batch_progress.current.ready} of the epoch, at"
                f" {trainer.accumulate_grad_batches} per step). Lightning does not save the window's gradient, so"
                " a run resumed from it takes its first step on part of a window and differs from the uninterrupted"
                " one from there (a val_check_interval counts micro-batches, and this callback changes how many"
                " make a step). Save with ModelCheckpoint(every_n_train_steps=...) or at epoch ends for exact resumes."
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ learning rate
    def _refuse_learning_rates_without_a_value(self, trainer: Trainer) -> None:
        if self.lr_scaling == "none":
            return
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                lr = group.get("lr")
                if not isinstance(lr, (int, float, Tensor)) or isinstance(lr, bool):
                    raise self._misconfiguration(
                        f"AdaptiveBatchSize(lr_scaling={self.lr_scaling!r}) multiplies each param group's learning"
                        f" rate, and {type(optimizer).__name__} has lr={lr!r} (an optimizer that sets its own step"
                        " size, such as transformers' Adafactor(lr=None, relative_step=True)). Pass"
                        " lr_scaling='none', or give the optimizer a learning rate."
                    )

    def _scale_lr(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        depth = self._step_depth.get(key, 0)
        self._step_depth[key] = depth + 1
        if depth or self.lr_factor == 1.0:
            return  # a step() inside a step(): scaled once, by the outermost
        groups = optimizer.param_groups
        unscaled = [group["lr"] for group in groups]
        scaled = [lr * self.lr_factor for lr in unscaled]
        self._unscaled_lrs[id(optimizer)] = (unscaled, scaled)
        for group, lr in zip(groups, scaled, strict=True):
            group["lr"] = lr

    def _unscale_lr(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        key = id(optimizer)
        depth = self._step_depth.get(key, 0)
        if depth > 1:
            self._step_depth[key] = depth - 1
            return  # an inner step() ends: the outermost puts the rate back
        self._step_depth.pop(key, None)
        saved = self._unscaled_lrs.pop(key, None)
        if saved is None:
            return
        for group, unscaled, scaled in zip(optimizer.param_groups, *saved, strict=True):
            if group["lr"] is scaled or _same_number(group["lr"], scaled):
                # The very object that was there, so schedulers continue from their value. (An optimizer that
                # only re-wraps the value, float to tensor, is no change; reading a tensor back syncs, but only
                # on this unusual path.)
                group["lr"] = unscaled
            else:
                # Set inside optimizer.step(): by the closure (training_step, a backward hook, a callback's
                # on_before_optimizer_step), which most optimizers call before their update. That update ran
                # at the value set there, without the factor; it stays, as whoever set it meant it.
                self._say_lr_overwritten(group["lr"], scaled)

    def _say_lr_overwritten(self, found: Any, scaled: Any) -> None:
        if self._lr_overwrite_said:
            return
        self._lr_overwrite_said = True
        self._lightning("utilities.rank_zero").rank_zero_warn(
            f"AdaptiveBatchSize: the learning rate was changed during optimizer.step() (to {found!r}, after this"
            f" callback had set {scaled!r}, the scheduled value x lr_factor={self.lr_factor:g}), by code that runs"
            " inside the optimizer's closure: training_step, a backward hook or a callback's"
            " on_before_optimizer_step. Those steps run without lr_factor. Set the learning rate before the step"
            " instead (an LR scheduler, or on_train_batch_start), or pass lr_scaling='none'."
        )

    # ------------------------------------------------------------------ per step
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A new epoch's loader may batch differently; an epoch resumed in its middle goes on with the saved sums.
        if trainer.current_epoch != self._units_epoch:
            if self._epoch_micro_batches:
                self._earlier_units = (self._epoch_units, self._epoch_micro_batches)
            self._epoch_units, self._epoch_micro_batches = 0, 0
            self._units_epoch = trainer.current_epoch

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        units = checked_batch_size(self.gns.batch_size_fn, batch)
        self._epoch_units = self._epoch_units + (units.sum() if isinstance(units, Tensor) else units)
        self._epoch_micro_batches += 1
        fit_loop = trainer.fit_loop
        if fit_loop._should_accumulate():
            return  # no optimizer step on this micro-batch: nothing to log, decide or switch
        assert self.accumulation is not None
        step = trainer.global_step
        logging = (trainer.loggers or self.prog_bar) and trainer._logger_connector.should_update_logs
        deciding = (
            self.pending is None
            and step >= self.warmup_steps
            and (self.last_change_step is None or step - self.last_change_step >= self.min_steps_between_changes)
            and step % self.check_every_n_steps == 0
        )
        if (logging or deciding) and trainer.world_size > 1:
            self._share_units(trainer)
        if logging:
            self._log(pl_module, trainer.world_size)
        if deciding:
            self.pending = self._decide(trainer, step)
        if self.pending is not None:
            epoch_ended = fit_loop.epoch_loop._num_ready_batches_reached()
            if is_safe_boundary(batch_idx + 1, self.pending[0], epoch_ended):
                self._switch(trainer, step)

    def _share_units(self, trainer: Trainer) -> None:
        """Replace each rank's sums by the mean over the ranks (one small all-reduce, on logging and deciding steps,
        which every rank takes alike): the micro-batch is then the ranks' mean, not rank 0's (ranks whose token
        counts differ logged an effective batch 70% low in a probe). Added to on every rank from here, the sums
        stay the ranks' total divided by their number, as rank 0's checkpoint saves them."""
        device = trainer.strategy.root_device
        sums = torch.stack(
            [
                torch.as_tensor(self._epoch_units, dtype=torch.float64, device=device),
                torch.tensor(float(self._epoch_micro_batches), dtype=torch.float64, device=device),
            ]
        )
        shared = trainer.strategy.reduce(sums, reduce_op="sum") / trainer.world_size
        self._epoch_units, self._epoch_micro_batches = shared[0], float(shared[1])

    # ------------------------------------------------------------------ decisions
    def _decide(self, trainer: Trainer, step: int) -> tuple[int, float] | None:
        decision: Any = None
        failure: Exception | None = None
        if trainer.is_global_zero:
            try:
                decision = self._decision(trainer, step)
            except Exception as error:  # every rank must leave the broadcast, then all of them raise
                failure, decision = error, ("error", f"{type(error).__name__}: {error}")
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision is not None and decision[0] == "error":
            # The global-zero rank keeps the original exception (type and traceback) as the cause.
            raise RuntimeError(
                f"AdaptiveBatchSize could not decide on the global-zero rank: {decision[1]}"
            ) from failure
        assert decision is not None
        new, factor, record = decision
        self.decisions.append(record)
        if new is None:
            return None
        self.pending_record = record
        return int(new), float(factor)

    def _decision(self, trainer: Trainer, step: int) -> tuple[int | None, float, dict[str, Any]]:
        assert self.accumulation is not None and self.base_accumulation is not None
        micro = self.micro_batch_size
        assert micro is not None
        metric = self.gns.metric
        world_size = trainer.world_size
        units_per_accumulation = float(micro * world_size)
        low, high = metric.confidence_interval(self.z)
        spread = metric.spread()
        # One read to the host for everything the decision needs.
        b_simple, low, high, grad_sq_norm, trace_cov, samples, error = torch.stack(
            [metric.b_simple, low, high, metric.grad_sq_norm, metric.trace_cov, spread.samples, metric.relative_error()]
        ).tolist()
        stats = NoiseScaleStatistics(
            b_simple=b_simple,
            grad_sq_norm=grad_sq_norm,
            trace_cov=trace_cov,
            effective_batch_size=self.accumulation * units_per_accumulation,
            accumulation=self.accumulation,
            micro_batch_size=micro,
            world_size=world_size,
            step=step,
            calibration=self.calibration,
            b_simple_low=low,
            b_simple_high=high,
        )
        record: dict[str, Any] = {
            "step": step,
            "b_simple": b_simple,
            "b_simple_low": low,
            "b_simple_high": high,
            "relative_error": error,
            "samples": samples,
            "target": math.nan,
            "target_low": math.nan,
            "target_high": math.nan,
            "accumulation": self.accumulation,
            "new_accumulation": self.accumulation,
        }
        if not samples >= self.min_samples:
            record["reason"] = f"warming up: {samples:.3g} effective samples < min_samples {self.min_samples:g}"
            return None, 1.0, record
        base_batch = self.base_accumulation * units_per_accumulation
        target_low = float(self._target(replace(stats, b_simple=low), base_batch))
        target_high = float(self._target(replace(stats, b_simple=high), base_batch))
        record.update(target=float(self._target(stats, base_batch)), target_low=target_low, target_high=target_high)
        new, reason = interval_accumulation(
            target_low,
            target_high,
            self.accumulation,
            units_per_accumulation,
            self.min_accumulation,
            self.max_accumulation,
            self.tolerance,
            self.monotonic,
            self.max_growth,
        )
        record["new_accumulation"] = new
        record["reason"] = reason
        if new == self.accumulation:
            return None, 1.0, record
        factor = lr_factor(
            self.lr_scaling,
            new / self.base_accumulation,
            trace_cov=stats.trace_cov,
            grad_sq_norm=stats.grad_sq_norm,
            base_batch=base_batch,
        )
        return new, factor, record

    def _target(self, stats: NoiseScaleStatistics, base_batch: float) -> float:
        if callable(self.target):
            return self.target(stats)
        if math.isnan(stats.b_simple):
            return math.nan
        if self.target == "b_simple":
            return stats.b_crit
        return sqrt_schedule(stats.b_crit, self.r if self.r is not None else base_batch)

    def _switch(self, trainer: Trainer, step: int) -> None:
        assert self.pending is not None
        old = self.accumulation
        self.accumulation, self.lr_factor = self.pending
        self.pending = None
        self.last_change_step = step
        trainer.accumulate_grad_batches = self.accumulation
        entry: dict[str, Any] = {"step": step, "accumulation": self.accumulation, "lr_factor": self.lr_factor}
        record, self.pending_record = self.pending_record, None
        if record is not None:
            entry.update(
                decided_step=record["step"],
                b_simple=record["b_simple"],
                target=record["target"],
                old_accumulation=old,
                reason=record["reason"],
            )
        self.history.append(entry)

    def _log(self, pl_module: LightningModule, world_size: int) -> None:
        values = {
            scalars.EFFECTIVE_BATCH_SIZE: self.effective_batch_size(world_size),
            scalars.ACCUMULATION: float(self.accumulation or 0),
            scalars.LR_FACTOR: self.lr_factor,
        }
        log_scalars(pl_module, values, prog_bar=scalars.ACCUMULATION if self.prog_bar else None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "accumulation": self.accumulation,
            "base_accumulation": self.base_accumulation,
            "lr_factor": self.lr_factor,
            "pending": self.pending,
            "last_change_step": self.last_change_step,
            "micro_batch_size": self.micro_batch_size,
            "epoch_units": float(self._epoch_units),
            "epoch_micro_batches": self._epoch_micro_batches,
            "units_epoch": self._units_epoch,
            "history": [dict(entry) for entry in self.history],
            "lr_scaling": self.lr_scaling,
            "decisions": [dict(entry) for entry in self.decisions],
            "pending_record": None if self.pending_record is None else dict(self.pending_record),
            "world_size": self._world_size,
        }

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        fitting = is_fitting(trainer)
        # Lightning calls load_state_dict only where the checkpoint holds this callback's state.
        key = getattr(self, "state_key", type(self).__qualname__)  # Lightning's Callback gives it
        self._skip_next_load = not fitting and key in (checkpoint.get("callbacks") or {})
        if not fitting:
            return  # validate/test/predict(ckpt_path=...): the fit's schedule stays
        # Runs for every callback before any load_state_dict: the noise-scale averages are read from the
        # checkpoint itself, whether or not the GradientNoiseScale callback has loaded them yet.
        gns_state = (checkpoint.get("callbacks") or {}).get(self.gns.state_key)
        trace_cov = grad_sq_norm = math.nan
        try:
            states = gns_state["metric"]  # type: ignore[index]
            weight = float(states["ema_weight"])
            if weight > 0:
                trace_cov = float(states["trace_cov_ema"]) / weight
                grad_sq_norm = float(states["grad_sq_norm_ema"]) / weight
        except (KeyError, TypeError, ValueError, RuntimeError):
            pass  # no or broken noise-scale state: GradientNoiseScale.load_state_dict reports a broken one
        self._resume_context = {
            "world_size": trainer.world_size,
            "global_step": checkpoint.get("global_step"),
            "trace_cov": trace_cov,
            "grad_sq_norm": grad_sq_norm,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, checked, and reconciled with this callback's arguments.

        An edited or corrupted state (an accumulation that is not an int >= 1, a non-finite or non-positive
        learning-rate factor, missing or unknown keys) raises a ``ValueError`` naming the key. A saved
        accumulation outside this callback's ``[min_accumulation, max_accumulation]`` is kept until the next
        safe boundary and then clamped into the bounds, like any decided change (a warning says so). A
        checkpoint saved with another ``lr_scaling`` keeps its accumulation, and its learning-rate factor is
        recomputed with this callback's rule (a warning gives the old and new factor): the new rule is
        taken to be what is wanted from now on. Checkpoints saved before ``lr_scaling`` was recorded are
        taken to have used this callback's rule. The state Lightning restores for
        ``trainer.validate/test/predict(ckpt_path=...)`` is not loaded: the fit's schedule stays.
        """
        if self._skip_next_load:
            self._skip_next_load = False
            return
        state_dict = renamed_keys(state_dict, ADAPTIVE_RENAMED_KEYS)
        validate_adaptive_state(state_dict, LR_SCALINGS)
        accumulation = state_dict["accumulation"]
        base = state_dict["base_accumulation"]
        self.accumulation = None if accumulation is None else int(accumulation)
        self.base_accumulation = None if base is None else int(base)
        self.lr_factor = float(state_dict["lr_factor"])
        pending = state_dict.get("pending")
        self.pending = None if pending is None else (int(pending[0]), float(pending[1]))
        last = state_dict.get("last_change_step")
        self.last_change_step = None if last is None else int(last)
        micro = state_dict.get("micro_batch_size")
        self._earlier_units = None if micro is None else (float(micro), 1)
        # Saved before the sums were (a run resumed from such a checkpoint averages the reads after the resume).
        self._epoch_units = float(state_dict.get("epoch_units", 0))  # under DDP the ranks' mean: not whole
        self._epoch_micro_batches = float(state_dict.get("epoch_micro_batches", 0))
        units_epoch = state_dict.get("units_epoch")
        self._units_epoch = None if units_epoch is None else int(units_epoch)
        self.history = [dict(entry) for entry in state_dict.get("history", [])]
        self.decisions = [dict(entry) for entry in state_dict.get("decisions", [])]
        record = state_dict.get("pending_record")
        self.pending_record = None if record is None else dict(record)
        # "estimate_moments" and "last_ema" of older checkpoints are not read: the metric keeps the moments now.
        self._restored = True
        self._saved_world_size = state_dict.get("world_size")
        if self.accumulation is not None:
            self._reconcile(state_dict.get("lr_scaling", self.lr_scaling))

    def _reconcile(self, saved_lr_scaling: str) -> None:
        assert self.accumulation is not None
        warn = self._lightning("utilities.rank_zero").rank_zero_warn
        if saved_lr_scaling != self.lr_scaling:
            old = self.lr_factor
            self.lr_factor = self._restored_lr_factor(self.accumulation)
            if self.pending is not None:
                self.pending = (self.pending[0], self._restored_lr_factor(self.pending[0]))
            step = self._resume_context.get("global_step")
            if isinstance(step, int):
                self.history.append({"step": step, "accumulation": self.accumulation, "lr_factor": self.lr_factor})
            warn(
                f"AdaptiveBatchSize: the checkpoint was saved with lr_scaling={saved_lr_scaling!r}, this callback has"
                f" lr_scaling={self.lr_scaling!r}. The learning-rate factor of the restored accumulation"
                f" {self.accumulation} is recomputed with the new rule: {old:g} -> {self.lr_factor:g}. Resume with"
                f" lr_scaling={saved_lr_scaling!r} to keep the old factor."
            )
        wanted = self.pending[0] if self.pending is not None else self.accumulation
        clamped = min(max(wanted, self.min_accumulation), self.max_accumulation)
        if clamped != wanted:
            self.pending = None if clamped == self.accumulation else (clamped, self._restored_lr_factor(clamped))
            warn(
                f"AdaptiveBatchSize: the checkpoint's accumulation {wanted} lies outside this callback's bounds"
                f" [min_accumulation={self.min_accumulation}, max_accumulation={self.max_accumulation}]; it changes"
                f" to {clamped} at the next safe boundary (an optimizer step closing a multiple of {clamped}"
                " micro-batches of the epoch, or the start of the next epoch)."
            )

    def _restored_lr_factor(self, accumulation: int) -> float:
        """The factor this callback's lr_scaling gives ``accumulation``, from the checkpoint's statistics."""
        assert self.base_accumulation is not None
        context = self._resume_context
        micro = self.micro_batch_size
        # Without a micro-batch size (no step taken) the base batch is unknown: NaN statistics make
        # "adascale" fall back to a factor of 1.
        known = micro is not None
        return lr_factor(
            self.lr_scaling,
            accumulation / self.base_accumulation,
            trace_cov=context.get("trace_cov", math.nan) if known else math.nan,
            grad_sq_norm=context.get("grad_sq_norm", math.nan) if known else math.nan,
            base_batch=float(self.base_accumulation * (micro or 1) * context.get("world_size", 1)),
        )


def _inside_a_window(trainer: Trainer) -> bool:
    """Whether the micro-batches run so far in this epoch end inside an accumulation window (Lightning steps the
    optimizer after every accumulate_grad_batches-th micro-batch of an epoch, and after its last)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    done = epoch_loop.batch_progress.current.ready  # counted at a batch's start: the same in its end hooks
    return done % trainer.accumulate_grad_batches != 0 and not epoch_loop.batch_progress.is_last_batch


def _positive(name: str, value: Any, example: str, minimum: float = 0.0, infinite: bool = False) -> float:
    """``value`` as a float: above 0 (``minimum=0``) or at least ``minimum``; finite unless ``infinite``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and not math.isnan(value)
    ok = ok and (value >= minimum if minimum else value > 0) and (infinite or math.isfinite(value))
    if not ok:
        bound = f">= {minimum:g}" if minimum else "> 0"
        raise ValueError(f"{name} must be {'a' if infinite else 'a finite'} number {bound} ({example}), got {value!r}.")
    return float(value)
