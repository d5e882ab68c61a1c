"""GradientNoiseScaleTracker: the measurement loop without any training framework.

It wires a gradient-norm source to the model, collects each micro-batch's small-batch norms, and at each
optimizer step turns them and the accumulated gradient into small/big-batch statistics for
:class:`~lightning_gns.GradientNoiseScaleMetric` (one all-reduce across processes). The Lightning callback
is glue around it; plain PyTorch and Fabric loops call it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gns import scalars
from lightning_gns._deprecation import warn_renamed
from lightning_gns.announcements import Announcements
from lightning_gns.estimators import StepSums, summary_from_counts
from lightning_gns.metric import GradientNoiseScaleMetric, load_metric_states, metric_states, validate_beta
from lightning_gns.sources.base import BackwardNorms, GradNormSource
from lightning_gns.sources.ddp_averaged import DDPAveraged
from lightning_gns.sources.left_out import parameter_names
from lightning_gns.sources.per_example import REORDERED_COUNTS, Layers, PerExampleSource
from lightning_gns.sources.per_example_bookkeeping import PerExampleBookkeeping, attach_per_example
from lightning_gns.sources.sharded import is_dtensor
from lightning_gns.sources.source_set import SourceSet
from lightning_gns.sources.step_bookkeeping import StepBookkeeping

# Why a step is skipped when a micro-batch's backward ran without end_micro_batch() after it: its norms are lost,
# while .grad holds its gradient.
NO_END_MICRO_BATCH = (
    "GradientNoiseScaleTracker: a micro-batch's backward ran without end_micro_batch() after it, so the window's"
    " norms lack it while .grad holds it; call end_micro_batch() after every backward. The step is skipped"
)

SourceMode = Literal["ddp", "microbatch", "per_example"]
SOURCE_MODES: tuple[str, ...] = ("ddp", "microbatch", "per_example")


# Distinct reasons for skipped steps that check() says one by one; after them, one message says there are more.
MAX_FAILURE_REASONS = 5


class GradientNoiseScaleTracker:
    """Measure the gradient noise scale in any training loop.

    The small batches are micro-batches, DDP ranks or single examples, by ``mode`` (README, "Modes"). Each
    micro-batch's loss must be its mean over the ``units`` passed to :meth:`start_micro_batch`, divided by
    the accumulation factor. :meth:`compute` returns the ``gns/`` scalars by name.

    Args:
        beta: EMA decay per measured optimizer step, in (0, 1).
        layers: ``per_example`` only: ``"all"`` supported layers or ``"norm"`` layers only.
        per_layer: ``per_example`` only: keep one metric per layer in :attr:`layer_metrics`.

    Example (plain PyTorch, one device, 2 micro-batches per step):
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
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

    def __init__(
        self,
        beta: float = 0.99,
        layers: Layers = "all",
        per_layer: bool = False,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.metric = GradientNoiseScaleMetric(beta=validate_beta(beta), all_reduce=False)
        self.layer_metrics: dict[str, GradientNoiseScaleMetric] = {}
        self.layers: Layers = layers
        self.per_layer = per_layer
        self.mode: str | None = None
        # Fallbacks, exclusions and unmeasurable steps are announced through this, once per message.
        self._announce = Announcements(warn)
        self._sources = SourceSet(self._announce)
        self._params: list[nn.Parameter] = []
        # What the DDP wrapper averages (read when it is first seen), and why the measured parameters are not all
        # among it (checked at attach, which a change of the optimized parameters repeats).
        self._ddp_averaged: DDPAveraged | None = None
        self._not_averaged: str | None = None
        self._silent_layers: set[str] = set()  # per_layer: layers left out whole, whose metrics were restarted
        self._restored_contributed: list[str] | None = None  # from a checkpoint, until the next attach takes it
        self._restored_contributed_mode: str | None = None  # the mode that measured them
        self._restored_contributed_all = False  # an earlier version's microbatch/ddp averages: every parameter
        self._param_names: dict[int, str] = {}  # parameter id -> its name in the model
        self._model: nn.Module | None = None
        self._ddp_model: nn.parallel.DistributedDataParallel | None = None
        self._process_group: Any = None
        self._world_size, self._rank = 1, 0
        # How a step is packed for the all-reduce and what the estimate covers (set at attach).
        self._book = StepBookkeeping([], 1, 0, torch.device("cpu"))
        self._measuring_step = False
        self._accumulation = 1
        self._micro_batch_units: int | Tensor = 0
        self._in_micro_batch = False
        # Effective batch of the first measured step: the base of the statistical efficiency. A device
        # tensor (set without a host sync), kept in checkpoints so a resumed run keeps its base.
        self.base_batch_size: Tensor | None = None
        self._base_settled = False  # the host has seen base_batch_size hold a batch size
        self._sums = StepSums()  # running sums of the current optimizer step on this rank
        self._step_failure_seen: str | None = None  # the last reason a step could not be measured
        # Every distinct reason a step could not be measured, those check() has yet to say, and how many it said:
        # after the first measured step each new reason is said once (the averages go on without those steps).
        self._step_failures: set[str] = set()
        self._step_failures_to_say: list[str] = []
        self._step_failures_said = 0
        # The watched parameters that required gradients after the step's first backward (None before it).
        self._window_trainable: list[nn.Parameter] | None = None
        self._most_examples = 0  # the most examples a measured micro-batch held (0: none counted on the host)
        # Restarts of the averages because parameters measured before were left out (device counter), and how many
        # the host has announced.
        self._restarts: Tensor | None = None
        self._restarts_said = 0
        # Whether a step was skipped for micro-batches of sizes too unequal to measure (a device flag, read by check()).
        self._unbalanced: Tensor | None = None
        self._unbalanced_said = False
        # Accumulation windows whose micro-batches were recorded but no measure_step followed (no optimizer step).
        self.unstepped_windows = 0

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
                (falling back to parameter hooks, with a warning, if the model already has one).
            process_group: the group to all-reduce over (default: the whole world when initialized).

        Raises:
            ValueError: an unknown mode; ``per_example`` without a model, or on a model with batch-coupled
                layers (BatchNorm); sharded parameters outside ``per_example`` mode.
        """
        if mode not in SOURCE_MODES:
            raise ValueError(f"Unknown mode {mode!r}. Choose one of {', '.join(repr(m) for m in SOURCE_MODES)}.")
        self.detach()
        self._sources.per_example = None
        self.mode = mode
        self._params = _unique_trainable(params)
        ddp_model = _unwrapped_ddp(ddp_model)
        self._model, self._ddp_model, self._process_group = model, ddp_model, process_group
        if ddp_model is not None and self._ddp_averaged is None:
            self._ddp_averaged = DDPAveraged.of(ddp_model)
        distributed = dist.is_available() and dist.is_initialized()
        self._world_size = dist.get_world_size(process_group) if distributed else 1
        self._rank = dist.get_rank(process_group) if distributed else 0
        sharded = any(is_dtensor(p) for p in self._params)
        if sharded and mode != "per_example":
            raise ValueError(
                f"Sharded parameters (FSDP2 fully_shard) are supported with mode='per_example' only, got mode={mode!r}:"
                " per-rank and per-micro-batch gradients are never materialised unsharded."
            )
        module = model if model is not None else getattr(ddp_model, "module", None)
        device = self.metric.grad_sq_norm_ema.device
        if mode == "per_example":
            source = self._sources.per_example = attach_per_example(module, self._params, self.layers)
            assert module is not None
            self._book = PerExampleBookkeeping(
                source, module, self._params, self.layers, self._world_size, self._rank, device, sharded
            )
        else:
            self._book = StepBookkeeping(self._params, self._world_size, self._rank, device)
            if mode == "ddp" and ddp_model is not None:
                self.use_comm_hook(ddp_model)
        self._param_names = parameter_names(module, self._params)
        averaged = self._ddp_averaged
        self._not_averaged = None if averaged is None else averaged.not_averaged(self._params, self._param_names)
        self._restore_contributed()
        self._restored_contributed = None
        self._silent_layers = set()  # a new per-example source: its exclusions start again
        self._book.buffer(device)  # allocated at setup, not on the first measured step

    def watch_ddp(self, ddp_model: nn.parallel.DistributedDataParallel | None) -> None:
        """Read which parameters ``ddp_model`` averages, before its first training backward (Lightning: at
        ``on_fit_start``; None: no DDP wrapper). Steps whose optimized parameters it does not all average
        (unfrozen after DDP wrapped the model) are then skipped with the reason, in every mode. :meth:`attach`
        with ``ddp_model`` does this."""
        averaged = self._ddp_averaged = None if ddp_model is None else DDPAveraged.of(ddp_model)
        self._not_averaged = None
        if averaged is not None and self.mode is not None:
            self._not_averaged = averaged.not_averaged(self._params, self._param_names)

    def use_comm_hook(self, ddp_model: nn.parallel.DistributedDataParallel) -> None:
        """``ddp`` mode: take per-rank norms from a comm hook on ``ddp_model`` (parameter hooks, announced, if
        DDP already has one). :meth:`attach` with ``ddp_model`` does this at once."""
        self._ddp_model = ddp_model
        self._sources.use_comm_hook(ddp_model, self._params)

    def skip_step(self, reason: str) -> None:
        """Skip the optimizer step in progress (counted, with ``reason``), e.g. when ``.grad`` got a gradient that
        no recorded micro-batch holds."""
        if self._measuring_step:
            self._sums.failed = reason
            self._note_failure(reason, said=True)  # the caller says it

    def discard_unstepped(self) -> bool:
        """Drop what the micro-batches recorded since the last :meth:`measure_step` hold, where no optimizer step
        followed them; True if there was any (counted in :attr:`unstepped_windows`).

        Call it where a new accumulation window starts (before ``zero_grad``): a window that ended without
        ``optimizer.step()`` (an ``optimizer_step`` that skips it, an epoch stopped in the middle of a window)
        would otherwise add its micro-batches to the next window's, whose ``.grad`` holds that window alone.
        """
        self._window_trainable = None
        if self._sums.backward_passes == 0 and self._sums.failed is None:
            return False
        self._sums.clear()
        self.unstepped_windows += 1
        return True

    @property
    def step_is_empty(self) -> bool:
        """Whether no micro-batch of the current optimizer step has been recorded yet."""
        return self._sums.backward_passes == 0 and not self._in_micro_batch

    def sync_params(self, params: Iterable[nn.Parameter]) -> bool:
        """Re-attach when the optimized, trainable parameters changed (a backbone unfrozen, a parameter group
        added); True if they did. The averages continue. Call it between optimizer steps."""
        current = _unique_trainable(params)
        if [id(p) for p in current] == [id(p) for p in self._params] or self.mode is None:
            return False
        before = sum(p.numel() for p in self._params)
        self.attach(current, self.mode, self._model, self._ddp_model, self._process_group)  # type: ignore[arg-type]
        after = sum(p.numel() for p in self._params)
        self._announce(  # once per change of set: a set toggled every step is said twice, not every step
            f"GradientNoiseScale: the optimized trainable parameters changed ({before:,} -> {after:,} elements);"
            " the gradient norms now cover the new set. The averages continue, so the noise scale moves to the new"
            f" parameters' value over about 1 / (1 - beta) = {1 / (1 - self.metric.beta):.0f} measured steps."
        )
        return True

    def detach(self) -> None:
        """Remove every hook this tracker registered (a DDP comm hook stays until the wrapper is gone); what was
        measured stays readable."""
        self._sources.detach()
        self._sums.clear()

    def to(self, device: torch.device | str) -> GradientNoiseScaleTracker:
        """Move the statistics to ``device`` (float32 on MPS, which has no float64)."""
        device = torch.device(device)
        for metric in (self.metric, *self.layer_metrics.values()):
            metric.to(device)
            if device.type == "mps":
                metric.set_dtype(torch.float32)
        if self.base_batch_size is not None:
            self.base_batch_size = self.base_batch_size.to(self.metric.last_b_big)
        self._book.to(device, self.metric.last_b_big.dtype)  # the bookkeeping made at attach lives here too
        return self

    def own_states(self) -> None:
        """Give every statistic its own storage: ``strategy="ddp_spawn"`` pickles the callback into each process
        through shared memory, where the processes would otherwise fold into the same tensors."""
        for metric in (self.metric, *self.layer_metrics.values()):
            for name in metric._defaults:
                getattr(metric, name).data = getattr(metric, name).detach().clone()

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
    def reference_batch_size(self) -> Tensor | None:
        """Deprecated name of ``base_batch_size`` (the effective batch of the first measured step)."""
        warn_renamed("GradientNoiseScaleTracker.reference_batch_size", "it is now called base_batch_size")
        return self.base_batch_size

    @property
    def source(self) -> str | None:
        """Source that fed the last micro-batch: ``"ddp_comm_hook"``, ``"param_hooks"`` or ``"per_example"``."""
        active = self._sources.active
        return active.name if active is not None else None

    def compute(self, kaplan_loss: Tensor | None = None) -> dict[str, Tensor]:
        """Every readout, keyed by its logged name (:mod:`lightning_gns.scalars`), as device tensors.

        With ``kaplan_loss`` (a language-model loss in nats per token), Kaplan et al.'s fitted critical batch
        too. Nothing is read to the host: the caller decides when to pay for that.

        Example:
            >>> tracker = GradientNoiseScaleTracker()
            >>> sorted(tracker.compute())[:3]
            ['gns/b_big', 'gns/b_simple', 'gns/b_simple_high']
        """
        values = scalars.metric_values(self.metric, self.base_batch_size, kaplan_loss)
        covered = self._book.covered_fraction(float(sum(p.numel() for p in self._params)))
        if covered is not None:
            values[scalars.COVERED_FRACTION] = covered
        for name, layer_metric in self.layer_metrics.items():
            values[scalars.layer_b_simple(name)] = layer_metric.b_simple
        return values

    @property
    def has_per_example_layers(self) -> bool:
        """Whether ``per_example`` mode found at least one supported layer owning an optimized parameter."""
        return self._sources.per_example is not None and self._sources.per_example.attached

    @property
    def covered_fraction(self) -> float:
        """Fraction of the optimized trainable parameters (by element count) that the estimate covers.

        Less than 1 in ``per_example`` mode only (see :attr:`left_out`); reading it synchronises with the device.
        """
        total = sum(p.numel() for p in self._params)
        return self._book.covered_elements() / total if total else float("nan")

    @property
    def left_out(self) -> dict[str, str]:
        """Every optimized trainable parameter the estimate does not cover: its name in the model -> why.

        Empty outside ``per_example`` mode. Reasons come from the model's structure at :meth:`attach` and from
        the measured steps. Reading it after a measured step synchronises with the device.

        Example (``layers="norm"`` measures the normalisation layers only):
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
            >>> tracker = GradientNoiseScaleTracker(layers="norm")
            >>> tracker.attach(model.parameters(), mode="per_example", model=model)
            >>> tracker.left_out["0.weight"]
            "not an nn.LayerNorm or nn.RMSNorm (layers='norm'; other norm classes are measured with layers='all')"
            >>> sorted(tracker.left_out), round(tracker.covered_fraction, 3)
            (['0.bias', '0.weight'], 0.333)
        """
        reasons = self._book.left_out()
        return {self._param_names[id(p)]: reasons[id(p)] for p in self._params if id(p) in reasons}

    def check(self) -> list[str]:
        """Announce what the measurement leaves out or cannot measure (once each); returns the new messages.

        Reads a few flags from the device: call it on steps that log, not on every step.
        """
        before = len(self._announce.said)
        if not self._base_settled and self.base_batch_size is not None:
            self._base_settled = bool(torch.isfinite(self.base_batch_size))
        left_out = self.left_out
        if left_out:
            numels = {self._param_names[id(p)]: p.numel() for p in self._params}
            self._announce.left_out(left_out, numels, all_layers=self.layers == "all")
        restarts = 0 if self._restarts is None else int(self._restarts)
        if restarts > self._restarts_said:
            self._restarts_said = restarts
            self._announce(
                "GradientNoiseScale: parameters measured in earlier steps were found unmeasurable and left out (see"
                f" the left-out message); the averages restarted then ({restarts} time(s) so far), so gns/b_simple"
                " describes the covered parameters only, averaged over the steps since."
            )
        if not self._unbalanced_said and self._unbalanced is not None and bool(self._unbalanced):
            self._unbalanced_said = True
            # Under DDP the small batches are the ranks' (micro-)batches, whose gradients the all-reduce weights
            # equally too.
            parts = "micro-batches or ranks' batches" if self.mode == "ddp" else "micro-batches"
            self._announce(
                f"GradientNoiseScale: a step whose {parts} differ too much in size was skipped (gns/skipped_steps"
                " counts it; said once). Lightning (and DDP's all-reduce) weights each of them equally, and with sizes"
                " about 6x apart (an epoch's short last window, a rank's short last batch, one sequence per micro-batch"
                " counted in tokens) the step's estimates are hundreds of times noisier than a normal step's and would"
                " swamp the averages; steps more than 4x noisier than one of equal sizes are left out. Use"
                " DataLoader(drop_last=True), batches of similar size (several sequences each, or packed), or"
                " more micro-batches per step."
            )
        measured = int(self.metric.measured_steps)
        skipped = int(self.metric.skipped_steps) if measured == 0 else 0
        if skipped >= 1:
            said_now = self._announce.nothing_measured(
                skipped,
                self._step_failure_seen,
                self.mode,
                self._world_size,
                self._accumulation,
                one_example=None if self._most_examples == 0 else self._most_examples == 1,
            )
            if said_now and self._step_failure_seen in self._step_failures_to_say:  # named by the message
                self._step_failures_to_say.remove(self._step_failure_seen)
        elif measured > 0:
            to_say, self._step_failures_to_say = self._step_failures_to_say, []
            for reason in to_say:
                if self._step_failures_said == MAX_FAILURE_REASONS:
                    self._announce(
                        "GradientNoiseScale: more steps could not be measured, for other reasons than those said;"
                        " gns/skipped_steps counts them."
                    )
                else:
                    self._announce(
                        f"GradientNoiseScale: an optimizer step could not be measured and was skipped: {reason}."
                        " gns/skipped_steps counts the skipped steps; the averages hold the measured ones only"
                        " (each reason is said once)."
                    )
                self._step_failures_said += 1
        return self._announce.said[before:]

    # ------------------------------------------------------------------ per micro-batch
    def start_micro_batch(
        self, units: int | Tensor, accumulation: int = 1, measure: bool = True, examples: int | None = None
    ) -> None:
        """Call before a micro-batch's forward pass.

        Args:
            units: examples (or tokens) in the micro-batch, its loss being the mean over them; or a 1-D integer
                tensor with each example's count (e.g. ``attention_mask.sum(dim=1)``): then the micro-batch holds
                their sum and, in ``per_example`` mode, each example its own count and loss share.
            accumulation: micro-batches per optimizer step (the loss is divided by it).
            measure: whether this optimizer step is measured (the same for all its micro-batches).
            examples: ``per_example`` mode: the examples in the micro-batch, which every hooked layer's leading
                dimension must match. Default: ``len(units)`` for a 1-D tensor, ``units`` for an int; required for
                a 0-d tensor (its value is not read, which would synchronise with the device).
        """
        self._accumulation = accumulation
        self._measuring_step = measure
        self._micro_batch_units = units
        if examples is None:
            if not isinstance(units, Tensor):
                examples = units
            elif units.dim() == 1:
                examples = units.numel()
        if measure and examples is not None:
            self._most_examples = max(self._most_examples, examples)
        source = self._sources.pick(self._params, accumulation, self._param_names)
        if examples is None and measure and isinstance(source, PerExampleSource) and isinstance(units, Tensor):
            raise ValueError(
                f"GradientNoiseScaleTracker.start_micro_batch: units is a {units.dim()}-d tensor, which does not say"
                " how many examples the micro-batch holds (per_example mode checks every layer's leading dimension"
                " against it): pass examples=len(batch), or units as one count per example (a 1-D tensor)."
            )
        if self._in_micro_batch:
            if self._backward_without_end():
                self._sums.add_failed_backward(NO_END_MICRO_BATCH)  # a backward ran; its norms are lost
                self._fail_step(NO_END_MICRO_BATCH)
            self.stop_recording()  # the last micro-batch had no backward (training_step returned None)
        self._sources.start(source, measure, examples)
        self._in_micro_batch = measure

    def before_backward(self, loss: Tensor) -> None:
        """Optional, between a measured micro-batch's forward and its backward pass: ``loss`` is what backward
        runs on. In ``per_example`` mode its graph shows parameters used outside their layers (a weight tied by a
        functional call, a penalty in the loss), layers below a loss that compares examples with each other (the
        in-batch negatives of a contrastive loss; both read on each loss graph of a new structure) and layer
        outputs that look like a batch but are broadcast over it (positions as many as the examples, read once per
        layer): all are then left out with the reason. Without it those are not found."""
        source = self._sources.active
        if source is None or not source.recording:
            return
        try:
            source.before_backward(loss)
        except Exception as error:  # a read of the graph that fails must not stop training; it is announced
            self._announce(
                "GradientNoiseScale: the per_example checks of the autograd graph (parameters used outside their"
                " layers, a loss that compares examples, outputs broadcast over the batch) could not read this step's"
                " graph"
                f" ({type(error).__name__}: {error}) and were skipped."
            )
        self._say_notes(source)

    def _say_notes(self, source: GradNormSource) -> None:
        while source.notes:
            self._announce(source.notes.pop(0))

    def end_micro_batch(self, failed: str | None = None) -> None:
        """Call after a micro-batch's backward pass (and before any other backward, e.g. in validation).

        ``failed``: why this micro-batch cannot be measured though its norms were taken (its step is skipped).
        """
        source = self._sources.active
        self._sources.stop()
        if source is not None:
            self._say_notes(source)  # found inside the backward (a checkpoint's recomputation)
        if not (self._in_micro_batch and self._measuring_step) or source is None:
            return
        self._in_micro_batch = False
        if self._window_trainable is None:  # the step's first backward: which parameters its norms can hold
            self._window_trainable = [p for p in self._params if p.requires_grad]
        backward = source.pop_backward()
        if failed is not None:
            backward = BackwardNorms(torch.zeros(0), (), failed=failed)
        if backward is None:
            if source.nothing_recorded is None:
                return
            backward = BackwardNorms(torch.zeros(0), (), failed=source.nothing_recorded)
        units = self._micro_batch_units
        reordered = source.examples_reordered if isinstance(source, PerExampleSource) else None
        if reordered is not None and backward.by_example and isinstance(units, Tensor) and units.dim() == 1:
            backward = BackwardNorms(torch.zeros(0), (), failed=REORDERED_COUNTS.format(node=reordered))
        if backward.failed is not None:
            self._sums.add_failed_backward(backward.failed)
        else:
            self._sums.add_backward(backward.sq_norms, self._micro_batch_units, backward.by_example, backward.measured)
        if self._sums.failed is not None:
            self._note_failure(self._sums.failed, said=self._sums.failed == failed)  # the caller says its own

    def _note_failure(self, reason: str, said: bool = False) -> None:
        self._step_failure_seen = reason
        if reason not in self._step_failures and len(self._step_failures) <= MAX_FAILURE_REASONS:
            self._step_failures.add(reason)
            if not said:
                self._step_failures_to_say.append(reason)

    def _fail_step(self, reason: str) -> None:
        """A misuse of the calls: the step in progress is skipped, and the reason said once."""
        self._sums.failed = reason
        self._note_failure(reason, said=True)
        self._announce(reason + ".")

    def _backward_without_end(self) -> bool:
        """Whether the micro-batch in progress had a backward pass that end_micro_batch() did not take (what it
        recorded is dropped)."""
        source = self._sources.active
        if source is None:
            return False
        self._sources.stop()
        return source.pop_backward() is not None

    def stop_recording(self) -> None:
        """Stop a micro-batch that had no backward pass, dropping whatever its forward left in the sources."""
        self._sources.stop()
        if self._in_micro_batch:
            self._in_micro_batch = False
            self._sources.drop()

    # ------------------------------------------------------------------ per optimizer step
    def measure_step(self, loss_scale: Tensor | float | None = None, grads_scaled: bool = False) -> bool:
        """Fold the optimizer step whose micro-batches were recorded; call before ``optimizer.step()``.

        Call it where ``.grad`` holds the accumulated (and, under DDP, all-reduced) gradient with the AMP
        loss scale removed (after ``scaler.unscale_(optimizer)``) and before gradient clipping. ``loss_scale``
        is the scale the backward passes used (``scaler.get_scale()``, or its tensor to avoid a host sync).
        ``grads_scaled``: ``.grad`` still carries ``loss_scale`` (not unscaled yet, as before a fused optimizer's
        step, which unscales inside it); its norm is unscaled here.
        In a distributed run, call it on every process: it performs one small all-reduce.

        No host synchronisation happens here (in per_example mode with per-example counts, none either: the
        counts stay on the device).

        Returns:
            True if this step was measured (folded into the metric, or counted as skipped there), False if
            it fell between measurements (``measure=False`` at :meth:`start_micro_batch`).
        """
        if not self._measuring_step:
            self._sums.clear()
            self._window_trainable = None
            return False
        if self._in_micro_batch and self._backward_without_end():
            self._in_micro_batch = False
            self._sums.add_failed_backward(NO_END_MICRO_BATCH)
            self._fail_step(NO_END_MICRO_BATCH)
        trainable, self._window_trainable = self._window_trainable, None
        frozen = [self._param_names.get(id(p), "?") for p in trainable or () if not p.requires_grad]
        if frozen and self._sums.failed is None:
            # Frozen after a micro-batch whose norms hold them: .grad holds only part of them.
            shown = ", ".join(repr(n) for n in frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
            self._fail_step(
                f"GradientNoiseScale: {len(frozen)} measured parameter(s) ({shown}) stopped requiring gradients"
                " after the backward pass of this optimizer step's first micro-batch, whose norms hold them: the step"
                " is skipped. Change requires_grad between optimizer steps (BaseFinetuning does, at epoch starts)"
            )
        device = self.metric.grad_sq_norm_ema.device
        k, m = self._accumulation, self._sums.backward_passes
        if m > k:
            # .grad holds one window of at most k backward passes: more were recorded since the last
            # measure_step when a window ended without one, or without discard_unstepped().
            self._fail_step(
                "GradientNoiseScaleTracker: more backward passes were recorded since the last measure_step() than"
                " the accumulation passed to start_micro_batch(): call measure_step() once per optimizer step, and"
                " discard_unstepped() where a window ends without one. Such steps are skipped"
            )
        # Undo the loss factor k / scale of every recorded norm (squared).
        unscale_sq: Tensor | float = float(k * k)
        if loss_scale is not None:
            unscale_sq = k * k / torch.as_tensor(loss_scale).to(device=device, dtype=torch.float64).square()
        # One all-reduce: what the source's bookkeeping packs (A and this rank's share of |G_big|^2, per part),
        # then the step's counts.
        if self._not_averaged is not None:
            self._announce(self._not_averaged)
            self._sums.failed = self._not_averaged
        book = self._book
        packed = book.buffer(device)
        book.pack(packed[: book.size], self._sums, unscale_sq)
        self._sums.fill_counts(packed[book.size :])
        if self._world_size > 1:
            dist.all_reduce(packed, group=self._process_group)
        sq_sum, big = book.unpack(packed[: book.size])
        counts = summary_from_counts(sq_sum, packed[book.size :])
        # .grad = sum over (rank, backward, small batch) of share * g / (world_size * k): the share-weighted
        # mean over the step's small batches is .grad * k * world_size / (backward passes on all ranks), also
        # for a short last window of the epoch, and for ranks whose last windows differ in length (the count
        # comes from the all-reduce: one per backward pass on each rank).
        big_factor: Tensor | float = (k / max(m, 1)) ** 2
        if self._world_size > 1:
            big_factor = (k * self._world_size / counts.weight_sum.clamp(min=1.0)).square()
        if grads_scaled and loss_scale is not None:
            big_factor = big_factor / torch.as_tensor(loss_scale).to(device=device, dtype=torch.float64).square()
        # Parameters measured in earlier steps and left out from this one on: the averages so far describe
        # another set of parameters, and start again (every rank alike: the flags come from the all-reduce).
        shrank = book.coverage_shrank()
        if shrank is not None:
            self.metric.restart(shrank)
            self._restarts = shrank.long() if self._restarts is None else self._restarts + shrank.long()
        nearly_singular = self.metric.fold(counts, big * big_factor)
        if self._unbalanced is None:
            self._unbalanced = nearly_singular.clone()
        else:
            self._unbalanced.logical_or_(nearly_singular)
        if self.per_layer:
            for name, layer_sq_sum, layer_big, layer_shrank in book.layer_sums():
                layer_counts = counts._replace(size_weighted_sq_norm_sum=layer_sq_sum)
                metric = self.layer_metric(name)
                metric.restart(layer_shrank)
                metric.fold(layer_counts, layer_big * big_factor)
            source = self._sources.per_example
            for name in set() if source is None else source.left_out_layers() - self._silent_layers:
                self._silent_layers.add(name)
                if name in self.layer_metrics:  # measured before, left out whole since: NaN, not its last value
                    self.layer_metrics[name].restart()
        base = self.base_batch_size
        if base is None:
            self.base_batch_size = self.metric.last_b_big.clone()
        elif not self._base_settled:
            # The first measured step can come after the first step (skipped, or without a backward): the
            # base stays NaN until then. check() tells on a logging step when it holds a batch size.
            torch.where(torch.isnan(base), self.metric.last_b_big, base, out=base)
        self._sums.clear()
        return True

    def layer_metric(self, name: str) -> GradientNoiseScaleMetric:
        """The metric of one layer (created on first use, on the main metric's device)."""
        if name not in self.layer_metrics:
            metric = GradientNoiseScaleMetric(beta=self.metric.beta, all_reduce=False)
            self.layer_metrics[name] = metric.to(self.metric.grad_sq_norm_ema.device)
        return self.layer_metrics[name]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        base = self.base_batch_size
        return {
            "metric": metric_states(self.metric),
            "layer_metrics": {name: metric_states(m) for name, m in self.layer_metrics.items()},
            # NaN before the first measured step: nothing to keep (a resumed run takes its first measured step).
            "base_batch_size": None if base is None or not bool(torch.isfinite(base)) else base.detach().cpu().clone(),
            # The parameters the averages hold, so that a resume that measures another set (per_example leaving one
            # out, or microbatch measuring one that per_example left out) restarts them.
            "contributed": self._contributed_names(),
            # The mode that measured them: only per_example leaves parameters out of the averages.
            "contributed_mode": self.mode if self._restored_contributed is None else self._restored_contributed_mode,
        }

    def _contributed_names(self) -> list[str] | None:
        positions = self._book.contributed() if self.mode is not None else None
        if positions is None and self.mode is not None:  # every step covers every parameter
            positions = list(range(len(self._book.params))) if int(self.metric.measured_steps) > 0 else []
        names = None if positions is None else [self._param_names.get(id(self._book.params[i]), "?") for i in positions]
        if self._restored_contributed is None:
            return names
        return sorted(set(self._restored_contributed) | set(names or ()))  # loaded, not attached since

    def _restore_contributed(self) -> None:
        if self.mode is None:
            return
        names = self._restored_contributed
        if names is None and self._restored_contributed_all:
            names = self._restored_contributed = [self._param_names.get(id(p), "?") for p in self._params]
            self._restored_contributed_all = False
        if names is None:
            return
        wanted = set(names)
        self._book.restore_contributed(
            [i for i, p in enumerate(self._book.params) if self._param_names.get(id(p)) in wanted]
        )
        if isinstance(self._book, PerExampleBookkeeping) or self._restored_contributed_mode != "per_example":
            # per_example: a saved parameter it leaves out restarts the averages at the next step (lost). Saved by
            # microbatch or ddp: every parameter trainable then is in them (one unfrozen since is a documented lag).
            return
        # Every parameter is measured from here on: averages that hold fewer (a per_example run that left some
        # out) would mix two sets.
        missing = sorted(name for p in self._book.params if (name := self._param_names.get(id(p), "?")) not in wanted)
        if missing and bool(self.metric.ema_weight > 0):
            self.metric.restart()
            for metric in self.layer_metrics.values():
                metric.restart()
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            shown = ", ".join(repr(n) for n in missing[:5]) + more
            self._announce(
                f"GradientNoiseScale: the checkpoint's averages leave out {len(missing)} parameter(s) that"
                f" mode={self.mode!r} measures ({shown}; left out where they were saved, in per_example mode): they"
                " restart here, so that B_simple describes one set of parameters."
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s averages; a damaged state (a missing key, a non-finite average, a negative
        count, a wrong shape) is a ``ValueError`` that names the key."""
        from lightning_gns.callbacks._checkpoint import validate_metric_states  # no Lightning import there

        if not isinstance(state_dict, dict) or "metric" not in state_dict:
            raise ValueError("GradientNoiseScaleTracker state: expected a dict with 'metric', as state_dict() makes.")
        names = list(self.metric._defaults)
        validate_metric_states("GradientNoiseScaleTracker", "metric.", state_dict["metric"], names)
        for name, states in state_dict.get("layer_metrics", {}).items():
            validate_metric_states("GradientNoiseScaleTracker", f"layer_metrics.{name}.", states, names)
        # copy_ keeps each state on the metric's device, whether this runs before or after .to(device).
        load_metric_states(self.metric, state_dict["metric"])
        for name, states in state_dict.get("layer_metrics", {}).items():
            load_metric_states(self.layer_metric(name), states)
        base = state_dict.get("base_batch_size")
        self.base_batch_size = None if base is None else base.to(self.metric.last_b_big.device)
        self._base_settled = base is not None
        contributed = state_dict.get("contributed")
        saved_mode = state_dict.get("contributed_mode")
        if saved_mode is None and contributed is not None:
            saved_mode = "per_example"  # earlier versions saved the names in per_example mode only
        # An earlier version's microbatch or ddp averages (no names saved): every parameter, as far as can be told.
        self._restored_contributed_all = contributed is None and bool(self.metric.ema_weight > 0)
        if self._restored_contributed_all:
            saved_mode = "microbatch"
        self._restored_contributed = contributed
        self._restored_contributed_mode = saved_mode
        self._restore_contributed()  # loaded after attach (plain PyTorch); Lightning loads before: attach does it


def _unwrapped_ddp(ddp_model: Any) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel module itself, also where a wrapper holds it (Lightning Fabric's model)."""
    if ddp_model is None or isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        return ddp_model
    inner = getattr(ddp_model, "_forward_module", None)  # fabric.setup()'s _FabricModule
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner
    raise TypeError(
        f"ddp_model must be the torch.nn.parallel.DistributedDataParallel wrapper, got {type(ddp_model).__name__}."
        " Pass the model DDP wraps as model= and leave ddp_model out to measure with parameter hooks."
    )


def _unique_trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return list({id(p): p for p in params if p.requires_grad}.values())  # first-seen order
