"""GradientNoiseScale: measure B_simple from the gradients training already computes.

The hooks live in :class:`GradientNoiseScaleBase`, which imports no Lightning namespace; the public
``GradientNoiseScale`` classes add the ``Callback`` base of ``lightning.pytorch`` or ``pytorch_lightning``.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from lightning_gns import scalars
from lightning_gns.batch_size import (
    BatchSizeFn,
    checked_batch_size,
    leading_dim_batch_size,
    refuse_uncollated_samples,
)
from lightning_gns.callbacks._arguments import checked_int
from lightning_gns.callbacks._checkpoint import GNS_RENAMED_KEYS, foreign_states, renamed_keys, validate_gns_state
from lightning_gns.callbacks._logging import log_scalars
from lightning_gns.callbacks._namespace import LightningNamespace
from lightning_gns.callbacks._spawn import SpawnedResult
from lightning_gns.metric import GradientNoiseScaleMetric, validate_beta
from lightning_gns.sources.left_out import callable_name
from lightning_gns.sources.per_example import Layers, batch_coupled_layers
from lightning_gns.tensorboard_layout import write_layout
from lightning_gns.time_major import TimeMajorCheck
from lightning_gns.tracker import GradientNoiseScaleTracker

if TYPE_CHECKING:
    from lightning.pytorch import LightningModule, Trainer

Mode = Literal["auto", "ddp", "microbatch", "per_example"]
MODES: tuple[str, ...] = get_args(Mode)
LAYERS: tuple[str, ...] = get_args(Layers)


class GradientNoiseScaleBase(LightningNamespace):
    r"""Measure the simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` during training.

    ``B_simple`` (McCandlish et al. 2018) estimates the critical batch size. It is measured from gradients
    training computes anyway, read before clipping with the AMP loss scale and the accumulation removed: the
    small batches are DDP ranks, accumulation micro-batches or single examples, by ``mode`` (README,
    "Modes"). No gradient is copied; the host is synchronised on logging steps only.
    ``lightning_gns.pytorch_lightning.GradientNoiseScale`` is the same class for ``pytorch_lightning``.

    Logged on logging steps (README, "Logged scalars"): ``gns/b_simple`` with ``gns/b_simple_low`` and
    ``gns/b_simple_high``, the estimates ``gns/grad_sq_norm`` and ``gns/trace_cov``, ``gns/b_small``,
    ``gns/b_big``, ``gns/skipped_steps``, the forecasts ``gns/steps_over_min``, ``gns/examples_over_min`` and
    ``gns/statistical_efficiency``; with ``per_example`` ``gns/covered_fraction``, with ``per_layer``
    ``gns/layer/<name>/b_simple``, with ``kaplan_loss`` ``gns/kaplan_b_crit_tokens``. Attributes
    (``b_simple``, ``skipped_steps``, ``left_out``, ...) and :meth:`compute` read the same values.

    Args:
        beta: EMA decay per measured optimizer step, in (0, 1).
        mode: ``"auto"`` (``"ddp"`` with several processes, else ``"microbatch"`` with accumulation, else
            ``"per_example"``), ``"ddp"``, ``"microbatch"`` or ``"per_example"``.
        batch_size_fn: ``batch -> int | Tensor``, the examples (or tokens) in a micro-batch, or a 1-D integer
            tensor with one count per example (``attention_mask.sum(dim=1)``; it stays on the device). The
            training loss must be the mean over these units. Default: the leading dimension the batch's tensors
            share (several train dataloaders, and samples left uncollated, need a ``batch_size_fn``: refused
            without one). In ``per_example`` mode each example holds its own count (and that share of the loss);
            with an int, each counts ``batch_size_fn(batch) / len(batch)`` units.
        prog_bar: show ``gns/b_simple`` in the progress bar.
        measure_every_n_steps: measure every n-th optimizer step (the EMA then spans about
            ``n / (1 - beta)`` steps). 1 measures every step.
        layers: ``per_example`` only: ``"all"`` supported layers, or ``"norm"`` (torch's ``nn.LayerNorm`` and
            ``nn.RMSNorm`` only, nearly free; Gray et al. 2024 find it tracks the whole-model noise scale; other
            norm classes, as transformers' ``LlamaRMSNorm``, are measured with ``"all"``).
        per_layer: ``per_example`` only: also log B_simple per layer.
        kaplan_loss: name of a logged metric (``self.log(name, ...)`` in the LightningModule) that holds a
            language-model cross-entropy in nats per token; when set, ``gns/kaplan_b_crit_tokens`` is
            logged from it. ``None`` (default): not logged.

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
        kaplan_loss: str | None = None,
    ) -> None:
        self.beta = validate_beta(beta)
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}. Choose one of {', '.join(repr(m) for m in MODES)}.")
        if layers not in LAYERS:
            raise ValueError(f"Unknown layers {layers!r}. Choose 'all' (every supported layer) or 'norm'.")
        for flag, value in (("prog_bar", prog_bar), ("per_layer", per_layer)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}.")
        if (layers != "all" or per_layer) and mode not in ("auto", "per_example"):
            wanted = " and ".join(
                f for f, on in ((f"layers={layers!r}", layers != "all"), ("per_layer=True", per_layer)) if on
            )
            raise ValueError(
                f"{wanted} needs per-example gradients: use mode='per_example' (or 'auto' on one device without"
                f" accumulation), got mode={mode!r}."
            )
        every = checked_int("measure_every_n_steps", measure_every_n_steps, minimum=1)
        if kaplan_loss is not None and not (isinstance(kaplan_loss, str) and kaplan_loss):
            raise ValueError(
                f"kaplan_loss must be the name of a logged loss metric (e.g. 'train_loss') or None,"
                f" got {kaplan_loss!r}."
            )
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise ValueError(f"batch_size_fn must be a callable batch -> int, got {batch_size_fn!r}.")
        self.requested_mode: str = mode
        self._mode: str | None = None
        self.batch_size_fn: BatchSizeFn = batch_size_fn or leading_dim_batch_size
        self.prog_bar = prog_bar
        self.measure_every_n_steps = every
        self.layers: Layers = layers
        self.per_layer = per_layer
        self.kaplan_loss = kaplan_loss
        self.tracker = GradientNoiseScaleTracker(beta=self.beta, layers=layers, per_layer=per_layer, warn=self._warn)
        self._comm_hook_pending = False
        self._warned_token_units = False
        # Set by an AdaptiveBatchSize callback that reads this one (its setup runs before on_fit_start), so that
        # the TensorBoard layout includes its charts.
        self.adaptive_batch_size_attached = False
        self._kaplan_loss_value: torch.Tensor | None = None
        self._kaplan_misses = 0  # logging steps on which kaplan_loss was not among the logged metrics
        self._warned_count_length = False
        # Read from the train dataloader at the start of each fit: several loaders combined into one batch (their
        # leading dimension is then no count of the rows the model sees), and one loader's fixed batch size.
        self._combined_loaders = False
        self._last_fit_trainer: weakref.ref[Trainer] | None = None
        self._loader_batch_size_to_check: int | None = None
        self._time_major: TimeMajorCheck | None = None  # watches sequence-first layers while the batch is counted
        self._warned_time_major = False
        self._warned_unstepped = False
        # Lightning restores callback states for validate/test/predict(ckpt_path=...) too: such a load is skipped
        # (an evaluation must not roll the fit's averages back); and whether this fit resumed from a checkpoint.
        self._skip_next_load = False
        self._loaded_for_fit = False
        # Each optimized parameter's .grad (identity and version) when a validation starts inside a window.
        self._grads_before_validation: list[tuple[int, int]] | None = None
        self._warned_validation_backward = False
        # strategy="ddp_spawn"/"ddp_notebook": rank 0 leaves its final readouts here for the main process.
        self._spawned = SpawnedResult()
        self._set_up_here = False  # a fit ran its hooks in this process
        self._spawned_readouts: dict[str, Any] | None = None  # what rank 0 of the last spawned fit had

    def _warn(self, message: str) -> None:
        self._lightning("utilities.rank_zero").rank_zero_warn(message)

    # ------------------------------------------------------------------ readouts
    @property
    def mode(self) -> str | None:
        """The mode in use, resolved from ``requested_mode`` at the start of fit; None before."""
        self._take_spawned_result()
        return self._mode

    @mode.setter
    def mode(self, value: str | None) -> None:
        self._mode = value

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._keyed_settings())  # type: ignore[attr-defined]

    def _keyed_settings(self) -> dict[str, Any]:
        # The settings whose change makes other averages: Lightning loads a state only into the same ones. layers is
        # keyed only where it is not the default, so that checkpoints of versions without it keep loading.
        settings: dict[str, Any] = {"mode": self.requested_mode, "beta": self.beta}
        if self.layers != "all":
            settings["layers"] = self.layers
        return settings

    @property
    def metric(self) -> GradientNoiseScaleMetric:
        """The whole-model :class:`~lightning_gns.GradientNoiseScaleMetric` (device tensors)."""
        self._take_spawned_result()
        return self.tracker.metric

    @property
    def layer_metrics(self) -> dict[str, GradientNoiseScaleMetric]:
        """``per_layer=True``: one metric per layer, by layer name."""
        self._take_spawned_result()
        return self.tracker.layer_metrics

    @property
    def b_simple(self) -> float:
        """``B_simple`` in batch-size units; NaN before the first estimate."""
        self._take_spawned_result()
        return self.tracker.b_simple

    @property
    def grad_sq_norm(self) -> float:
        """Bias-corrected EMA of the unbiased ``|G|^2`` estimates."""
        self._take_spawned_result()
        return self.tracker.grad_sq_norm

    @property
    def trace_cov(self) -> float:
        """Bias-corrected EMA of the unbiased ``tr(Sigma)`` estimates."""
        self._take_spawned_result()
        return self.tracker.trace_cov

    @property
    def skipped_steps(self) -> int:
        """Measured optimizer steps that could not enter the averages."""
        return int(self.metric.skipped_steps)

    @property
    def layer_b_simple(self) -> dict[str, float]:
        """``per_layer=True``: B_simple of each layer's parameters, by layer name."""
        return {name: float(m.b_simple) for name, m in self.layer_metrics.items()}

    def compute(self) -> dict[str, float]:
        """Every readout the callback logs, by logged name, as Python floats (reads them from the device).

        The same mapping as :meth:`GradientNoiseScaleTracker.compute`: ``gns/b_simple``, the averages, the
        batch sizes, the forecasts (``gns/steps_over_min``, ``gns/examples_over_min``,
        ``gns/statistical_efficiency``), ``gns/kaplan_b_crit_tokens`` at the last logged ``kaplan_loss``, ...
        After a fit in spawned processes (``strategy="ddp_spawn"``), what rank 0 had at the end of fit.
        """
        self._take_spawned_result()
        if self._spawned_readouts is not None:
            return dict(self._spawned_readouts["readouts"])
        return {name: float(value) for name, value in self.tracker.compute(self._kaplan_loss_value).items()}

    @property
    def source(self) -> str | None:
        """Source that fed the last measured step: ``"ddp_comm_hook"``, ``"param_hooks"`` or ``"per_example"``."""
        self._take_spawned_result()
        if self._spawned_readouts is not None:
            return self._spawned_readouts["source"]
        return self.tracker.source

    @property
    def covered_fraction(self) -> float:
        """Fraction of the optimized parameters (by element count) that the estimate covers."""
        self._take_spawned_result()
        if self._spawned_readouts is not None:
            return float(self._spawned_readouts["covered_fraction"])
        return self.tracker.covered_fraction

    @property
    def left_out(self) -> dict[str, str]:
        """``per_example``: every optimized parameter the estimate leaves out, by its name in the module -> why.

        Empty when everything is covered, and in the other modes. See
        :attr:`GradientNoiseScaleTracker.left_out <lightning_gns.GradientNoiseScaleTracker.left_out>`.
        """
        self._take_spawned_result()
        if self._spawned_readouts is not None:
            return dict(self._spawned_readouts["left_out"])
        return self.tracker.left_out

    # ------------------------------------------------------------------ fits in spawned processes
    def _leave_spawned_result(self, trainer: Trainer) -> None:
        """In rank 0 of a spawned or forked fit: leave the final readouts for the process that built the callback."""
        if not (self._spawned.in_child and trainer.global_rank == 0):
            return
        state = self.tracker.state_dict()
        base = state["base_batch_size"]
        payload = {
            # tolist: a scalar state becomes a number, a vector state (the estimates' moments) a list.
            "metric": {name: value.tolist() for name, value in state["metric"].items()},
            "layer_metrics": {
                layer: {name: value.tolist() for name, value in states.items()}
                for layer, states in state["layer_metrics"].items()
            },
            "base_batch_size": None if base is None else base.item(),
            "readouts": self.compute(),
            "mode": self.mode,
            "source": self.tracker.source,
            "covered_fraction": self.tracker.covered_fraction,
            "left_out": self.tracker.left_out,
        }
        if not self._spawned.write(payload):
            self._warn(
                "GradientNoiseScale: this fit ran in spawned processes and its readouts could not be carried back"
                " to the main process (no shared memory, or too many per-layer metrics), where gns.b_simple and"
                " compute() stay NaN. Read them inside the run, e.g. in a callback's on_fit_end or from the logged"
                " gns/ scalars."
            )

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into the processes of the next spawned fit: what the last one left must go along, or that fit
        # would start from the averages before it (taken otherwise only when a readout is read in between).
        self._take_spawned_result()
        state = self.__dict__.copy()
        state["_last_fit_trainer"] = None  # a weak reference does not pickle; a spawned process has its own Trainer
        return state

    def _take_spawned_result(self) -> None:
        """In the process that built the callback, after a spawned fit: take over what rank 0 had at its end."""
        if self._set_up_here or self._spawned.in_child:
            return
        payload = self._spawned.read()
        if payload is None:
            return

        def tensors(states: dict[str, Any]) -> dict[str, torch.Tensor]:
            return {
                name: torch.tensor(v, dtype=torch.int64 if isinstance(v, int) else torch.float64)
                for name, v in states.items()
            }

        base = payload["base_batch_size"]
        self.tracker.load_state_dict(
            {
                "metric": tensors(payload["metric"]),
                "layer_metrics": {layer: tensors(states) for layer, states in payload["layer_metrics"].items()},
                "base_batch_size": None if base is None else torch.tensor(base, dtype=torch.float64),
            }
        )
        self.mode = payload["mode"]
        self._spawned_readouts = payload

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_fit(trainer, pl_module, "GradientNoiseScale", "supports automatic optimization only")
        self._set_up_here, self._spawned_readouts = True, None
        self._loaded_for_fit = False
        self._say_shared_names(trainer)
        mode = self._resolve_mode(trainer, pl_module)
        continued = self.requested_mode == "auto" and self.mode == "per_example" and self._fitted_before(trainer)
        if continued and mode == "microbatch":
            # A second fit() of the same Trainer continues the averages, and the accumulation it starts at may be
            # one AdaptiveBatchSize grew (and may lower again to 1, where microbatch measures nothing):
            # per_example, which the first fit chose, measures at any accumulation.
            mode = "per_example"
        self.mode = mode
        self._last_fit_trainer = weakref.ref(trainer)
        self.tracker.own_states()  # ddp_spawn pickled the states into memory shared with the other processes
        self.tracker.to(trainer.strategy.root_device)
        self._refuse_fullgraph_compile(pl_module)

    def _fitted_before(self, trainer: Trainer) -> bool:
        return self._last_fit_trainer is not None and self._last_fit_trainer() is trainer

    def _say_shared_names(self, trainer: Trainer) -> None:
        """Several instances log the same gns/... names: a logger keeps one value per name and step (once per fit)."""
        instances = [c for c in trainer.callbacks if isinstance(c, GradientNoiseScaleBase)]  # type: ignore[attr-defined]
        if len(instances) > 1 and instances[0] is self and (trainer.loggers or any(c.prog_bar for c in instances)):
            self._warn(
                f"The Trainer has {len(instances)} GradientNoiseScale callbacks. They log under the same gns/... names,"
                " so each logged step keeps one of their values (the last to log) and mixes their scalars. Keep one"
                " callback in the Trainer, or read the others from their attributes (b_simple, metric, compute())."
            )

    def _say_carried_over(self) -> None:
        """Say once per fit that averages from before it continue (a second fit with this callback, or states
        loaded by hand); a resume from a checkpoint restored its own, and is not meant."""
        if self._loaded_for_fit:
            return
        measured = int(self.metric.measured_steps)  # a host read, once per fit
        if measured:
            self._lightning("utilities.rank_zero").rank_zero_warn(
                f"GradientNoiseScale holds the averages of {measured} measured steps from before this fit (an earlier"
                " fit with this callback, or load_state_dict): they continue, and B_simple mixes the two runs until"
                " the old steps decay. For another model or task, pass a new GradientNoiseScale() to the Trainer."
            )

    def _refuse_fullgraph_compile(self, pl_module: LightningModule) -> None:
        if self.mode != "per_example":
            return
        contexts = [(getattr(pl_module, "_compiler_ctx", None) or {}).get("dynamo_ctx")]
        contexts += [getattr(m, "dynamo_ctx", None) for m in pl_module.modules()]
        # module.compile() compiles in place: its context sits in the closure of the compiled call.
        compiled_calls = [getattr(m, "_compiled_call_impl", None) for m in pl_module.modules()]
        contexts += [value for call in compiled_calls for value in _closure_values(call)]
        if any(getattr(ctx, "fullgraph", False) is True for ctx in contexts):
            raise self._misconfiguration(
                "GradientNoiseScale(mode='per_example') hooks every supported layer's forward and output gradient,"
                " which torch.compile(fullgraph=True) cannot trace. Compile without fullgraph (graph breaks at the"
                " hooks), or measure with mode='microbatch' (accumulate_grad_batches >= 2) or mode='ddp', whose"
                " hooks sit on the parameters outside the compiled graph."
            )

    def _refuse_batch_coupling(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """SyncBatchNorm couples every rank's examples: no rank's or example's gradient is an independent sample."""
        synced = getattr(trainer.strategy, "_layer_sync", None) is not None
        synced = synced or any(isinstance(m, torch.nn.SyncBatchNorm) for m in pl_module.modules())
        if synced and trainer.world_size > 1:
            raise self._misconfiguration(
                "GradientNoiseScale cannot measure a model with SyncBatchNorm on several processes: the synchronised"
                " batch statistics couple the examples of every rank, so neither per-rank, per-micro-batch nor"
                " per-example gradients are independent samples. Use Trainer(sync_batchnorm=False) (plain BatchNorm"
                " per rank; mode='ddp' or 'microbatch' then measure correctly) or GroupNorm/LayerNorm."
            )

    def _resolve_mode(self, trainer: Trainer, pl_module: LightningModule) -> str:
        strategies = self._lightning("strategies")
        strategy = trainer.strategy
        accumulations = self._accumulations(trainer)
        max_accumulation = max(accumulations)
        is_ddp = isinstance(strategy, strategies.DDPStrategy) and not isinstance(strategy, strategies.DeepSpeedStrategy)
        model_parallel = getattr(strategies, "ModelParallelStrategy", None)
        if model_parallel is not None and isinstance(strategy, model_parallel):
            return self._resolve_sharded_mode(strategy)
        if not (is_ddp or isinstance(strategy, strategies.SingleDeviceStrategy)):
            raise self._misconfiguration(
                f"GradientNoiseScale supports single-device training, DDP (strategy='ddp', 'ddp_spawn', ...) and"
                f" sharded data parallelism through ModelParallelStrategy(data_parallel_size=N,"
                f" tensor_parallel_size=1) with fully_shard (FSDP2) in configure_model, not {type(strategy).__name__}."
                " strategy='fsdp' (FSDP1's flattened parameters) is not supported: switch to ModelParallelStrategy"
                " with fully_shard, or to strategy='ddp'."
            )
        if is_ddp and max_accumulation > 1 and getattr(strategy, "_ddp_kwargs", {}).get("static_graph", False):
            raise self._misconfiguration(
                "DDP static_graph=True with accumulate_grad_batches > 1 crashes inside torch itself"
                " (pytorch/pytorch#143580), with or without GradientNoiseScale. Use DDPStrategy(static_graph=False)"
                " or accumulate_grad_batches=1."
            )
        self._refuse_batch_coupling(trainer, pl_module)
        several_processes = is_ddp and trainer.world_size > 1
        mode = self.requested_mode
        coupled = batch_coupled_layers(pl_module)
        if mode == "auto" and not (self.layers != "all" or self.per_layer):
            if several_processes:
                return "ddp"
            if max_accumulation > 1 and min(accumulations) > 1:
                return "microbatch"
            if max_accumulation > 1 and coupled:
                # Epochs at accumulation 1 (GradientAccumulationScheduler) have one small batch per step, and
                # BatchNorm rules out per-example norms: those epochs are not measured.
                self._warn_unmeasured_epochs(accumulations, chosen=True)
                return "microbatch"
            if coupled:
                raise self._misconfiguration(
                    f"GradientNoiseScale cannot measure this run: the model has BatchNorm ({', '.join(coupled[:3])}),"
                    " which couples the examples of a batch so per-example gradients are not independent, and with"
                    " one process and no gradient accumulation there is no other small batch. Set"
                    " Trainer(accumulate_grad_batches=2) or more (mode='microbatch'), train on several processes"
                    " with strategy='ddp' (mode='ddp'), or replace BatchNorm by GroupNorm or LayerNorm."
                )
            return "per_example"
        if mode in ("auto", "per_example") and coupled:
            raise self._misconfiguration(
                "GradientNoiseScale(mode='per_example') cannot measure a model with BatchNorm"
                f" ({', '.join(coupled[:3])}): it couples the examples of a batch, so per-example gradients are not"
                " independent samples and their spread is not the gradient noise. Use mode='microbatch' with"
                " Trainer(accumulate_grad_batches=2) or more, mode='ddp' on several processes, or replace"
                " BatchNorm by GroupNorm or LayerNorm"
                " (layers='norm' and per_layer=True need per-example gradients too)."
            )
        if mode == "auto":
            # Also with a GradientAccumulationScheduler that has epochs at accumulation 1: microbatch mode would
            # measure nothing there, per_example measures at any accumulation.
            return "per_example"
        if mode == "microbatch" and max_accumulation > 1 and min(accumulations) < 2 and not several_processes:
            self._warn_unmeasured_epochs(accumulations, chosen=False)
        if mode == "ddp" and not several_processes:
            raise self._misconfiguration(
                f"GradientNoiseScale(mode='ddp') needs DDP with more than one process, got {type(strategy).__name__}"
                f" with world_size={trainer.world_size}. Use Trainer(devices=N, strategy='ddp') with N >= 2,"
                " mode='microbatch' with accumulate_grad_batches >= 2, or mode='per_example'."
            )
        if mode == "microbatch" and max_accumulation < 2:
            raise self._misconfiguration(
                "GradientNoiseScale(mode='microbatch') needs gradient accumulation: set"
                " Trainer(accumulate_grad_batches=2) or more, or use mode='per_example' (works without"
                " accumulation) or mode='ddp' on several devices."
            )
        return mode

    def _resolve_sharded_mode(self, strategy: Any) -> str:
        # FSDP2: gradients are reduce-scattered inside backward, so no unsharded per-rank or per-micro-batch
        # gradient ever exists to norm; per-example norms come from activations, before any communication.
        tensor_parallel = getattr(strategy, "_tensor_parallel_size", 1)
        if tensor_parallel != 1:
            raise self._misconfiguration(
                f"GradientNoiseScale with ModelParallelStrategy needs tensor_parallel_size=1 (got {tensor_parallel}):"
                " tensor parallelism splits each layer's activations across ranks, so per-example norms computed"
                " on one rank would be partial. Use ModelParallelStrategy(data_parallel_size=N,"
                " tensor_parallel_size=1) with fully_shard in configure_model (its defaults are tensor parallel)."
            )
        if self.requested_mode not in ("auto", "per_example"):
            raise self._misconfiguration(
                f"GradientNoiseScale(mode={self.requested_mode!r}) cannot run under ModelParallelStrategy (FSDP2):"
                " sharded training never materialises a rank's or a micro-batch's whole gradient. Use"
                " mode='per_example' (or 'auto'), which measures per-example norms inside the layers."
            )
        return "per_example"

    def _accumulations(self, trainer: Trainer) -> list[int]:
        """The accumulations the fit will use: a GradientAccumulationScheduler's (it sets the Trainer's), else the
        Trainer's."""
        scheduler = self._lightning("callbacks").GradientAccumulationScheduler
        values = [
            k
            for callback in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(callback, scheduler)
            for k in callback.scheduling.values()
        ]
        return values or [trainer.accumulate_grad_batches]

    def _warn_unmeasured_epochs(self, accumulations: list[int], chosen: bool) -> None:
        why = " (mode='auto' chose it: the model has BatchNorm, which rules out per-example norms)" if chosen else ""
        self._warn(
            f"GradientNoiseScale measures in mode='microbatch'{why}, but the GradientAccumulationScheduler has"
            f" epochs at accumulation 1 (schedule {sorted(set(accumulations))}): their steps hold one small batch"
            " and are skipped and counted, and gns/* keep their last values there. Schedule an accumulation of 2 or"
            " more for every epoch, or use mode='per_example' (small batches of one example at any accumulation)."
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Optimizers and the DDP wrapper exist from here on, and no backward has run yet. The DDP comm hook waits
        # for the first training batch, after the LightningModule's own on_fit_start/on_train_start, where users
        # register theirs.
        assert self.mode is not None
        self._refuse_batch_coupling(trainer, pl_module)  # configure_model may have built the layers only now
        wrapper = trainer.strategy.model
        self.tracker.watch_ddp(wrapper if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel) else None)
        try:
            self.tracker.attach(self._optimized_params(trainer), self.mode, model=pl_module)  # type: ignore[arg-type]
        except ValueError as error:
            raise self._misconfiguration(f"GradientNoiseScale: {error}") from None
        self._comm_hook_pending = self.mode == "ddp"
        self._watch_time_major(pl_module)
        for logger in trainer.loggers:
            write_layout(
                logger,
                adaptive=self.adaptive_batch_size_attached,
                per_layer=self.per_layer,
                per_example=self.mode == "per_example",
                kaplan=self.kaplan_loss is not None,
            )
        if self.mode == "per_example" and not self.tracker.has_per_example_layers:
            raise self._misconfiguration(
                "GradientNoiseScale(mode='per_example') found no supported layer"
                + (
                    " (nn.Linear, nn.Embedding, nn.Conv1d/2d, nn.LayerNorm, nn.RMSNorm)"
                    if self.layers == "all"
                    else " for layers='norm': no nn.LayerNorm or nn.RMSNorm (a norm class of its own, as transformers'"
                    " LlamaRMSNorm or T5LayerNorm, is measured with layers='all')"
                )
                + " owning the optimized parameters, so nothing can be measured. Build the model from these layers,"
                " or set Trainer(accumulate_grad_batches=2) or more (mode='microbatch'), or use strategy='ddp' on"
                " several devices (mode='ddp')."
            )

    @staticmethod
    def _optimized_params(trainer: Trainer) -> list[torch.nn.Parameter]:
        return [p for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._say_carried_over()  # here, after any checkpoint was restored (before or after the strategy's setup)
        loaders = trainer.train_dataloader
        many = isinstance(loaders, (dict, list, tuple))
        count = len(loaders) if isinstance(loaders, (dict, list, tuple)) else 1
        self._combined_loaders = count > 1
        batch_size = getattr(loaders, "batch_size", None) if not many else None
        self._loader_batch_size_to_check = batch_size if isinstance(batch_size, int) and batch_size >= 2 else None
        if self._combined_loaders and self.batch_size_fn is leading_dim_batch_size:
            # Several training loaders (a dict or list, combined by Lightning) give one batch from each. Their
            # shared leading dimension, when they share one, is one loader's batch: half the truth for two when
            # the loss averages over all of them, and a short last batch of one of them would stop the count
            # mid-training. Only the user knows what the loss averages over.
            raise ValueError(
                f"GradientNoiseScale: training draws one batch from each of {count} dataloaders at a time, and"
                " the default count cannot tell how many examples the loss averages over. Pass batch_size_fn"
                " returning the micro-batch's total, e.g. lambda batch: sum(len(y) for x, y in batch.values()) for a"
                " dict of (x, y) batches whose loss is the mean over all of them, or a 1-D integer tensor with one"
                " count per example in the order the model sees them (mode='per_example' needs one forward on their"
                " concatenation)."
            )

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._drop_unstepped()  # the last window, if it took no optimizer step
        self.tracker.check()  # say once if no step could be measured, or what was left out
        if self.kaplan_loss is not None and self._kaplan_loss_value is None and self._kaplan_misses < 2:
            self._say_kaplan_loss_missing(trainer)

    def _say_kaplan_loss_missing(self, trainer: Trainer) -> None:
        logged = ", ".join(repr(k) for k in sorted(trainer.callback_metrics) if not k.startswith("gns/")) or "none"
        self._lightning("utilities.rank_zero").rank_zero_warn(
            f"GradientNoiseScale(kaplan_loss={self.kaplan_loss!r}): no logged metric of that name holds one number"
            f" (logged: {logged}), so gns/kaplan_b_crit_tokens is not logged. Log the training loss with"
            f" self.log({self.kaplan_loss!r}, loss) in training_step, or name a logged metric."
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.tracker.detach()
        self._watch_time_major(None)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.tracker.detach()
        self._watch_time_major(None)
        if stage == "fit":
            self._leave_spawned_result(trainer)

    # ------------------------------------------------------------------ per micro-batch and step
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        measure = trainer.global_step % self.measure_every_n_steps == 0
        if self._time_major is not None:
            self._time_major.expect(None)
        if not measure:
            self.tracker.start_micro_batch(0, trainer.accumulate_grad_batches, measure=False)
            return
        if self._comm_hook_pending:
            self._comm_hook_pending = False
            wrapper = trainer.strategy.model
            if isinstance(wrapper, torch.nn.parallel.DistributedDataParallel):
                self.tracker.use_comm_hook(wrapper)
        if self.tracker.step_is_empty:
            self.tracker.sync_params(self._optimized_params(trainer))  # a backbone unfrozen, a group added
        units = checked_batch_size(self.batch_size_fn, batch)
        if self._loader_batch_size_to_check is not None and self.batch_size_fn is leading_dim_batch_size:
            # The fit's first batch only: it is full, while a short last batch of (x, y) fields of one shape
            # would look like samples left uncollated.
            doubt = refuse_uncollated_samples(
                batch, self._loader_batch_size_to_check, units, lambda: _first_sample(trainer)
            )
            if doubt is not None:
                self._warn(doubt + " (said once).")
            self._loader_batch_size_to_check = None
        examples = None
        if self._combined_loaders:
            pass  # the model sees the loaders' examples together: the rows are the count (or one per count)
        elif self.mode == "per_example" and (not isinstance(units, torch.Tensor) or units.dim() == 0):
            # One count for the whole micro-batch (an int, or a 0-d tensor such as mask.sum()): the examples are
            # the batch's rows, which every layer's leading dimension is checked against.
            examples = _leading_dim_or_none(batch)
            if examples is not None and not self._warned_token_units:
                # A 0-d tensor is read on the first measured micro-batch only (its value is a host sync).
                self._warned_token_units = isinstance(units, torch.Tensor)
                count = int(units)
                if count != examples:
                    self._warned_token_units = True
                    self._lightning("utilities.rank_zero").rank_zero_warn(
                        f"GradientNoiseScale(mode='per_example'): batch_size_fn counts {count} units in a micro-batch"
                        f" of {examples} examples, so each example is taken to hold {count / examples:g} units and"
                        " an equal share of the loss. If the examples' lengths differ (padding), return one count per"
                        " example instead, e.g. batch_size_fn=lambda batch: batch['attention_mask'].sum(dim=1), or"
                        " B_simple comes out biased."
                    )
        elif isinstance(units, torch.Tensor) and units.dim() == 1 and not self._warned_count_length:
            rows = _leading_dim_or_none(batch)
            if rows is not None and rows != units.shape[0]:
                self._warned_count_length = True
                self._lightning("utilities.rank_zero").rank_zero_warn(
                    f"GradientNoiseScale: batch_size_fn returned {units.shape[0]} per-example counts for a batch"
                    f" whose tensors lead with {rows} rows. One count per example is expected (e.g."
                    " batch['attention_mask'].sum(dim=1)); with another number the examples are miscounted"
                    " (per_example mode: every layer looks called on the wrong batch). Return an int for the whole"
                    " micro-batch, or one count per example."
                )
        if examples is None and self.mode == "per_example" and isinstance(units, torch.Tensor) and units.dim() == 0:
            # No rows to take the examples from (combined loaders, a batch without tensors): the count is the
            # examples, as an int count would be. Read on every measured micro-batch: a host sync, in this case only.
            examples = int(units)
        if self._time_major is not None:
            # The examples the estimates take the leading dimension for: per_example's split, or the default count.
            counted = units if self.batch_size_fn is leading_dim_batch_size else None
            self._time_major.expect(
                examples if examples is not None else counted if isinstance(counted, int) else None, batch
            )
        self.tracker.start_micro_batch(units, trainer.accumulate_grad_batches, measure=True, examples=examples)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation inside an accumulation window (val_check_interval not a multiple of accumulate_grad_batches):
        # a validation_step that calls backward (Trainer(inference_mode=False)) adds to .grad, the window's big
        # batch, a gradient none of its recorded micro-batches holds. Seen by .grad's identity and version counter.
        fitting = is_fitting(trainer) and not trainer.sanity_checking
        in_window = fitting and not self.tracker.step_is_empty
        self._grads_before_validation = _grad_versions(self._optimized_params(trainer)) if in_window else None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        before, self._grads_before_validation = self._grads_before_validation, None
        if before is None or _grad_versions(self._optimized_params(trainer)) == before:
            return
        reason = (
            "a backward pass during validation, in the middle of an accumulation window (a validation_step that calls"
            " backward under Trainer(inference_mode=False)), added to .grad, the big batch, a gradient that none of"
            " the window's micro-batches holds: the step is skipped. Validate at multiples of"
            " accumulate_grad_batches (val_check_interval), or take validation gradients with torch.autograd.grad,"
            " which leaves .grad alone"
        )
        self.tracker.skip_step(reason)
        if not self._warned_validation_backward:
            self._warned_validation_backward = True
            self._warn(f"GradientNoiseScale: {reason} (said once; gns/skipped_steps counts them).")

    def on_before_zero_grad(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        # Lightning zeroes the gradients where an accumulation window starts; a window before it that took no
        # optimizer step left its micro-batches' norms behind, which must not join this window's.
        self._drop_unstepped()

    def _drop_unstepped(self) -> None:
        if self.tracker.discard_unstepped() and not self._warned_unstepped:
            self._warned_unstepped = True
            self._warn(
                "GradientNoiseScale: an accumulation window ended without an optimizer step (the fit stopped in the"
                " middle of a window: max_time, trainer.should_stop set by a callback, a resume from a checkpoint"
                " saved inside a window; an optimizer_step that does not call optimizer.step(); on_train_batch_start"
                " returning -1 in the middle of a window): its micro-batches are not measured. Windows dropped so far:"
                " tracker.unstepped_windows."
            )

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self.tracker.before_backward(loss)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        problem = None if self._time_major is None else self._time_major.problem
        if problem is not None:
            problem = self._say_time_major(problem)
        self.tracker.end_micro_batch(failed=problem)

    def _watch_time_major(self, pl_module: LightningModule | None) -> None:
        """Watch the model's sequence-first layers for a time-major batch counted by its leading dimension (or
        stop watching, with None)."""
        if self._time_major is not None:
            self._time_major.detach()
            self._time_major = None
        if pl_module is not None:
            check = TimeMajorCheck(pl_module)
            self._time_major = check if check.watching else None

    def _say_time_major(self, problem: str) -> str:
        """The reason a time-major micro-batch is skipped, with the fix for this mode; warned once per fit."""
        if self.mode == "per_example":
            fix = (
                "make the batches (B, T) and the layers batch_first=True (per_example mode splits each layer's"
                " gradient along its leading dimension), or accumulate gradients over 2 or more micro-batches"
                " (mode='microbatch') with batch_size_fn=lambda batch: batch[0].shape[1]"
            )
        else:
            fix = (
                "pass batch_size_fn returning the examples, e.g. batch_size_fn=lambda batch: batch[0].shape[1] (or,"
                " if the leading dimension does hold them and the layer attends across the examples,"
                " batch_size_fn=lambda batch: len(batch[0]) to say so)"
            )
        reason = f"{problem}. To measure, {fix}"
        if not self._warned_time_major:
            self._warned_time_major = True
            self._warn(f"GradientNoiseScale: {reason}. Until then every measured step is skipped.")
        return reason

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.tracker.stop_recording()  # a training_step that returned None had no backward
        if self._time_major is not None:
            self._time_major.expect(None)  # validation's forward passes are not checked

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        # Gradients here are accumulated, all-reduced and not yet clipped; unscaled, except where Lightning leaves
        # that to the optimizer (a fused optimizer, or a last micro-batch whose training_step returned None).
        self.tracker.measure_step(
            loss_scale=_amp_loss_scale(trainer), grads_scaled=_amp_grads_still_scaled(trainer, optimizer)
        )
        if (trainer.loggers or self.prog_bar) and trainer._logger_connector.should_update_logs:
            self.tracker.check()
            self._log(trainer, pl_module)

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.kaplan_loss is not None:
            loss = trainer.callback_metrics.get(self.kaplan_loss)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                self._kaplan_loss_value = loss.detach().reshape(())
            else:
                self._kaplan_misses += 1
                if self._kaplan_misses == 2:  # the first logging step may come before the loss is logged
                    self._say_kaplan_loss_missing(trainer)
        values = self.tracker.compute(self._kaplan_loss_value)
        log_scalars(pl_module, values, prog_bar=scalars.B_SIMPLE if self.prog_bar else None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {**self.tracker.state_dict(), "beta": self.beta, "batch_size_fn": callable_name(self.batch_size_fn)}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning calls load_state_dict only where the checkpoint holds this callback's state.
        holds_ours = self.state_key in (checkpoint.get("callbacks") or {})
        self._skip_next_load = holds_ours and not is_fitting(trainer)
        if not is_fitting(trainer):
            return
        # Lightning loads only the state saved under this callback's state_key, which holds mode and beta: a
        # resume with other settings would restart the averages without a word.
        current = [callback.state_key for callback in trainer.callbacks]  # type: ignore[attr-defined]
        qualname = type(self).__qualname__
        for saved in foreign_states(checkpoint.get("callbacks") or {}, qualname, self.state_key, current):
            settings = ", ".join(f"{name}={value!r}" for name, value in saved.items())
            self._lightning("utilities.rank_zero").rank_zero_warn(
                f"The checkpoint holds {qualname} state saved with {settings}, but this {qualname} has"
                f" {', '.join(f'{k}={v!r}' for k, v in self._keyed_settings().items())}: its averages (and the"
                " statistical-efficiency"
                f" base batch) restart from zero instead of continuing. To continue them, resume with"
                f" {qualname}({settings})."
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, refusing an edited or corrupted one with a ``ValueError`` naming the key.

        Non-finite averages, counts below zero, tensors of the wrong shape, missing or unknown keys are
        refused. Saved per-layer averages are dropped when this callback has ``per_layer=False``. States of
        earlier versions, which saved the base batch as ``reference_batch_size``, load. The state Lightning restores
        for ``trainer.validate/test/predict(ckpt_path=...)`` is not loaded: the fit's averages stay.
        """
        if self._skip_next_load:  # trainer.validate/test/predict(ckpt_path=...): the fit's averages stay
            self._skip_next_load = False
            return
        state_dict = renamed_keys(state_dict, GNS_RENAMED_KEYS)
        validate_gns_state(state_dict, self.metric._defaults, self.beta)
        saved_fn, own_fn = state_dict.get("batch_size_fn"), callable_name(self.batch_size_fn)
        if saved_fn is not None and saved_fn != own_fn:
            self._lightning("utilities.rank_zero").rank_zero_warn(
                f"GradientNoiseScale: the checkpoint's averages were counted by batch_size_fn={saved_fn}, this"
                f" callback counts by {own_fn}. If the two count other units (examples and tokens), the averages"
                " now mix them and B_simple is in neither: resume with the same batch_size_fn, or start the averages"
                " afresh by deleting this callback's entry of checkpoint['callbacks']."
            )
        state_dict = {k: v for k, v in state_dict.items() if k != "batch_size_fn"}
        if not self.per_layer and state_dict.get("layer_metrics"):
            state_dict = {**state_dict, "layer_metrics": {}}
        self.tracker.load_state_dict(state_dict)
        self._loaded_for_fit = True


def _grad_versions(params: list[torch.nn.Parameter]) -> list[tuple[int, int]]:
    """Each parameter's ``.grad`` as (identity, version counter): what an in-place accumulation or a new gradient
    changes (host-side integers, no device read)."""
    return [(0, 0) if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def is_fitting(trainer: Trainer) -> bool:
    """Whether the trainer runs ``fit`` (not ``validate``, ``test`` or ``predict``)."""
    fn = trainer.state.fn
    return getattr(fn, "value", fn) == "fit"


def _first_sample(trainer: Trainer) -> Any:
    """The train dataloader's dataset's first sample (a map-style dataset), or None."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__"):
        return None
    try:
        return dataset[0]
    except Exception:  # a dataset that cannot be indexed so: nothing to compare with
        return None


def _closure_values(function: Any) -> list[Any]:
    values = []
    for cell in getattr(function, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            values.append(cell.cell_contents)
    return values


def _leading_dim_or_none(batch: Any) -> int | None:
    try:
        return leading_dim_batch_size(batch)
    except ValueError:
        return None


def _amp_grads_still_scaled(trainer: Trainer, optimizer: Optimizer) -> bool:
    """Whether ``.grad`` still carries the GradScaler's scale here: Lightning unscales before this hook unless
    the optimizer unscales inside its own step (fused Adam/AdamW/SGD) or the last closure returned None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return False
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
    return state is None or state.get("stage") is not OptState.UNSCALED


def _amp_loss_scale(trainer: Trainer) -> torch.Tensor | None:
    """The GradScaler scale the step's backward passes used, as a tensor (``get_scale()`` would sync)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale
    return torch.tensor(float(scaler.get_scale()))
