"""Every error message of GradientNoiseScale, at construction and at fit time.

Lightning re-raises exceptions from callback hooks unchanged (trainer/call.py), so the callback's own
exception type reaches the caller of ``Trainer.fit``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_gns import GradientNoiseScale
from support.models import LinearProblem, LinearRegression, ManualRegression, loader
from support.trainers import MemoryLogger, make_trainer

PROBLEM = LinearProblem(dim=4, seed=0)


def fit(callback: GradientNoiseScale, model: Any = None, data: DataLoader | None = None, **trainer_kwargs: Any) -> None:
    trainer = make_trainer([callback], max_steps=2, **trainer_kwargs)
    if data is None:
        data = loader(*PROBLEM.sample(32, seed=1), batch_size=4)
    trainer.fit(model if model is not None else LinearRegression(PROBLEM), data)


# ---------------------------------------------------------------- constructor


@pytest.mark.parametrize("beta", [0, 1, 1.5, True, -0.5, None])
def test_beta_out_of_range(beta: Any) -> None:
    with pytest.raises(ValueError, match=r"beta must be a number strictly between 0 and 1.*Typical values: 0\.9"):
        GradientNoiseScale(beta=beta)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match=re.escape("Unknown mode 'dp'. Choose one of 'auto', 'ddp', 'microbatch'")):
        GradientNoiseScale(mode="dp")  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_measure_every_n_steps(n: Any) -> None:
    with pytest.raises(ValueError, match="measure_every_n_steps must be an int >= 1"):
        GradientNoiseScale(measure_every_n_steps=n)


def test_batch_size_fn_not_callable() -> None:
    with pytest.raises(ValueError, match=r"batch_size_fn must be a callable batch -> int, got 32"):
        GradientNoiseScale(batch_size_fn=32)  # type: ignore[arg-type]


def test_unknown_layers() -> None:
    with pytest.raises(ValueError, match=r"Unknown layers 'attn'\. Choose 'all'"):
        GradientNoiseScale(layers="attn")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "kwargs", "said"),
    [("microbatch", {"layers": "norm"}, "layers='norm'"), ("ddp", {"per_layer": True}, "per_layer=True")],
    ids=["layers", "per_layer"],
)
def test_layer_options_need_per_example_mode(mode: str, kwargs: dict[str, Any], said: str) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(said)} needs per-example gradients: use mode='per_example'"):
        GradientNoiseScale(mode=mode, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("flag", ["prog_bar", "per_layer"])
def test_flags_must_be_booleans(flag: str) -> None:
    with pytest.raises(ValueError, match=rf"{flag} must be True or False, got 'no'"):
        GradientNoiseScale(**{flag: "no"})  # type: ignore[arg-type]


def test_valid_arguments_construct() -> None:
    gns = GradientNoiseScale(beta=0.5, mode="microbatch", batch_size_fn=len, measure_every_n_steps=3)
    assert (gns.beta, gns.requested_mode, gns.measure_every_n_steps) == (0.5, "microbatch", 3)


# ---------------------------------------------------------------- fit time: mode and strategy


def test_auto_mode_on_one_device_without_accumulation_is_not_an_error() -> None:
    """Once an error (no second small batch); now mode='auto' falls back to per-example gradients."""
    gns = GradientNoiseScale(beta=0.5)
    fit(gns)
    assert gns.mode == "per_example"
    assert gns.skipped_steps == 0


class BareParameterRegression(LinearRegression):
    """The linear model as a bare parameter: no layer the per-example source supports."""

    def __init__(self) -> None:
        super().__init__(PROBLEM)
        del self.linear
        self.w = torch.nn.Parameter(PROBLEM.w.float().clone())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return 0.5 * (x @ self.w - y).square().mean()


@pytest.mark.parametrize("mode", ["per_example", "auto"])
def test_per_example_without_supported_layers(mode: str) -> None:
    with pytest.raises(MisconfigurationException, match=r"found no supported layer.*accumulate_grad_batches"):
        fit(GradientNoiseScale(mode=mode), model=BareParameterRegression())  # type: ignore[arg-type]


def test_ddp_mode_on_one_device() -> None:
    with pytest.raises(
        MisconfigurationException, match=r"mode='ddp'\) needs DDP with more than one process.*world_size=1"
    ) as info:
        fit(GradientNoiseScale(mode="ddp"), accumulate_grad_batches=2)
    assert "Trainer(devices=N, strategy='ddp') with N >= 2" in str(info.value)
    assert "mode='microbatch' with accumulate_grad_batches >= 2" in str(info.value)


def test_microbatch_mode_without_accumulation() -> None:
    with pytest.raises(
        MisconfigurationException,
        match=r"mode='microbatch'\) needs gradient accumulation: set Trainer\(accumulate_grad_batches=2\)",
    ):
        fit(GradientNoiseScale(mode="microbatch"))


def test_manual_optimization() -> None:
    with pytest.raises(MisconfigurationException, match=r"automatic optimization only.*GradientNoiseScaleTracker"):
        fit(GradientNoiseScale(), model=ManualRegression(PROBLEM))


class PlainCPUStrategy(Strategy):
    """A minimal strategy that is neither single-device nor DDP."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu")

    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @property
    def is_global_zero(self) -> bool:
        return True

    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        return tensor


def test_unsupported_strategy() -> None:
    with pytest.raises(
        MisconfigurationException,
        match=r"supports single-device training, DDP .* not PlainCPUStrategy\. strategy='fsdp' .* not supported",
    ):
        fit(GradientNoiseScale(), strategy=PlainCPUStrategy(), accumulate_grad_batches=2)


@pytest.mark.usefixtures("restore_process_state")
def test_ddp_static_graph_with_accumulation() -> None:
    with pytest.raises(
        MisconfigurationException,
        match=r"pytorch/pytorch#143580.*Use DDPStrategy\(static_graph=False\) or accumulate_grad_batches=1",
    ):
        fit(GradientNoiseScale(), strategy=DDPStrategy(static_graph=True), devices=1, accumulate_grad_batches=2)


@pytest.mark.usefixtures("restore_process_state")
def test_ddp_one_device_with_accumulation_runs() -> None:
    """Control for the static-graph test: the same in-process DDP setup measures without error."""
    gns = GradientNoiseScale(beta=0.5)
    fit(gns, strategy=DDPStrategy(static_graph=False), devices=1, accumulate_grad_batches=2)
    assert gns.mode == "microbatch"
    assert gns.b_simple > 0


# ---------------------------------------------------------------- fit time: batch sizes


@pytest.mark.parametrize("value", [-3, 2.5, "8", True], ids=repr)
def test_batch_size_fn_must_return_positive_int(value: Any) -> None:
    with pytest.raises(ValueError, match=r"batch_size_fn must return a positive int \(examples or tokens"):
        fit(GradientNoiseScale(batch_size_fn=lambda batch: value), accumulate_grad_batches=2)


def test_batch_size_fn_counting_zero_skips_the_steps_and_says_so() -> None:
    """0 is an empty micro-batch's count (a collate that filtered every sample out), not an error; where every
    count is 0, no step is measured and the one message names the counts."""
    gns = GradientNoiseScale(batch_size_fn=lambda batch: 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(gns, accumulate_grad_batches=2)
    said = [str(w.message) for w in caught if "no optimizer step could be measured" in str(w.message)]
    assert len(said) == 1 and "all zero" in said[0] and int(gns.metric.measured_steps) == 0 and gns.skipped_steps > 0


@pytest.mark.parametrize("value", [4.0, torch.tensor(4)], ids=["float", "tensor"])
def test_batch_size_fn_integral_values_accepted(value: Any) -> None:
    gns = GradientNoiseScale(batch_size_fn=lambda batch: value)
    fit(gns, accumulate_grad_batches=2)
    assert float(gns.metric.last_b_small) == 4.0


class FloatListRegression(LinearRegression):
    def training_step(self, batch: list[float], batch_idx: int) -> Tensor:
        y = torch.tensor(batch)
        return super().training_step((y.unsqueeze(-1).expand(-1, PROBLEM.dim), y), batch_idx)


def float_lists(collate: Callable[[list[int]], list[float]]) -> DataLoader:
    return DataLoader(list(range(32)), batch_size=4, collate_fn=collate)


def test_batch_without_tensors_needs_batch_size_fn() -> None:
    with pytest.raises(ValueError, match=r"could not find the batch size.*Pass batch_size_fn=") as info:
        fit(
            GradientNoiseScale(),
            model=FloatListRegression(PROBLEM),
            data=float_lists(lambda items: [*map(float, items)]),
            accumulate_grad_batches=2,
        )
    assert "batch of type list" in str(info.value)


def test_batch_without_tensors_runs_with_batch_size_fn() -> None:
    gns = GradientNoiseScale(batch_size_fn=len)
    fit(
        gns,
        model=FloatListRegression(PROBLEM),
        data=float_lists(lambda items: [*map(float, items)]),
        accumulate_grad_batches=2,
    )
    assert float(gns.metric.last_b_small) == 4.0


@pytest.mark.usefixtures("restore_process_state")
def test_sharded_training_needs_per_example_mode() -> None:
    with pytest.raises(MisconfigurationException, match=r"mode='microbatch'\) cannot run under ModelParallelStrategy"):
        fit(
            GradientNoiseScale(mode="microbatch"),
            strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
            devices=1,
            accumulate_grad_batches=2,
        )


def test_sharded_training_rejects_tensor_parallelism() -> None:
    gns = GradientNoiseScale()
    with pytest.raises(MisconfigurationException, match=r"needs tensor_parallel_size=1 \(got 2\)"):
        gns._resolve_sharded_mode(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))


# ---------------------------------------------------------------- errors inside the per-example norms


class NormOnly(LinearRegression):
    """A LayerNorm on sequences, the only measured layer: its norms come from the fused path only."""

    def __init__(self) -> None:
        super().__init__(PROBLEM)
        del self.linear
        self.norm = torch.nn.LayerNorm(PROBLEM.dim)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        sequence = torch.stack([x, x.flip(-1), 2 * x], dim=1)  # (B, 3, dim): takes the fused LayerNorm path
        return 0.5 * (self.norm(sequence).sum(dim=(1, 2)) - y).square().mean()


def _raise(error: BaseException) -> Callable[..., Any]:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    return failing


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("injected: out of memory"), ValueError("injected: a bug")], ids=["oom", "other"]
)
@pytest.mark.parametrize("path", ["hooks", "fused"])
def test_errors_in_per_example_norms_reach_the_user(
    monkeypatch: pytest.MonkeyPatch, path: str, error: BaseException
) -> None:
    """Out of memory (a RuntimeError) and any other error propagate through trainer.fit, not a skipped step."""
    from lightning_gns.sources import per_example

    if path == "hooks":  # Linear on (B, dim): the hooks compute the factors
        monkeypatch.setattr(per_example, "layer_factors", _raise(error))
        model: LinearRegression = LinearRegression(PROBLEM)
    else:  # the fused LayerNorm delivers per-example gradients, which _add folds in
        monkeypatch.setattr(per_example.PerExampleSource, "_add", _raise(error))
        model = NormOnly()
    with pytest.raises(type(error), match="injected"):
        fit(GradientNoiseScale(mode="per_example"), model=model)


def test_a_shape_that_does_not_split_per_example_skips_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain RuntimeError in the factor maths (shapes, dtypes) means "cannot be measured": skipped, said once."""
    from lightning_gns.sources import per_example

    monkeypatch.setattr(per_example, "layer_factors", _raise(RuntimeError("shape '[4, -1, 3]' is invalid")))
    gns = GradientNoiseScale(mode="per_example")
    with pytest.warns(UserWarning, match=r"no optimizer step could be measured.*failed: shape '\[4, -1, 3\]'"):
        fit(gns)
    assert gns.skipped_steps == 2 and np.isnan(gns.b_simple)


@pytest.mark.parametrize(
    "counts", [lambda batch: torch.full((len(batch[0]),), -1), lambda batch: torch.tensor(-8)], ids=["1-D", "0-d"]
)
def test_batch_size_fn_tensors_of_negative_counts_skip_every_step_and_say_why(counts: Any) -> None:
    gns = GradientNoiseScale(batch_size_fn=counts)
    with pytest.warns(UserWarning, match="batch_size_fn counts that are negative or all zero"):
        fit(gns, accumulate_grad_batches=2)
    assert gns.skipped_steps > 0 and not np.isfinite(gns.b_simple)


def test_a_second_fit_with_the_same_callback_says_the_averages_continue(tmp_path: Any) -> None:
    gns = GradientNoiseScale()
    fit(gns, accumulate_grad_batches=2)
    with pytest.warns(UserWarning, match=r"holds the averages of 2 measured steps from before this fit"):
        fit(gns, accumulate_grad_batches=2)
    # A resume restores the checkpoint's averages after setup: nothing to say.
    first = make_trainer([GradientNoiseScale()], max_steps=2, accumulate_grad_batches=2)
    first.fit(LinearRegression(PROBLEM), loader(*PROBLEM.sample(32, seed=1), batch_size=4))
    first.save_checkpoint(tmp_path / "last.ckpt")
    resumed = GradientNoiseScale()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*from before this fit.*")
        trainer = make_trainer([resumed], max_steps=4, accumulate_grad_batches=2)
        data = loader(*PROBLEM.sample(32, seed=1), batch_size=4)
        trainer.fit(LinearRegression(PROBLEM), data, ckpt_path=tmp_path / "last.ckpt")
    assert int(resumed.metric.measured_steps) == 4


def test_counts_of_another_length_than_the_batch_are_said_once() -> None:
    gns = GradientNoiseScale(batch_size_fn=lambda batch: torch.ones(len(batch[0]) + 1, dtype=torch.long))
    with pytest.warns(UserWarning, match=r"batch_size_fn returned 5 per-example counts for a batch whose tensors lead"):
        fit(gns, accumulate_grad_batches=2)


@pytest.fixture
def one_process_group() -> Any:
    """A gloo process group of one process (DDP's hooks need one; the hooks' choice does not need two ranks)."""
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_lossy_ddp_comm_hook_is_refused_and_others_are_named(one_process_group: Any) -> None:
    """PowerSGD leaves a low-rank approximation in .grad (B_simple about half the truth in a 2-process probe):
    refused, naming the fix; a hook the callback does not know is named, without a promise of the same numbers."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    from lightning_gns.sources.ddp_comm_hook import register_comm_hook

    said: list[str] = []
    powersgd = DistributedDataParallel(torch.nn.Linear(4, 4))
    powersgd.register_comm_hook(powerSGD_hook.PowerSGDState(process_group=None), powerSGD_hook.powerSGD_hook)
    with pytest.raises(ValueError, match=r"powerSGD_hook.*not the mean of the ranks' gradients.*without that hook"):
        register_comm_hook(powersgd, said.append)
    for hook, promise in (
        (default_hooks.allreduce_hook, "same numbers"),
        (default_hooks.fp16_compress_hook, "rounded to 16 bits"),
        (lambda state, bucket: default_hooks.allreduce_hook(state, bucket), "a hook that compresses them"),
    ):
        said.clear()
        model = DistributedDataParallel(torch.nn.Linear(4, 4))
        model.register_comm_hook(None, hook)
        assert register_comm_hook(model, said.append) is None
        assert len(said) == 1 and promise in said[0] and "param_hooks" in said[0], said


def test_parameters_ddp_does_not_average_are_named_by_why(one_process_group: Any) -> None:
    """Which parameters DDP all-reduces is read off the wrapper before the first backward: unfrozen after the wrap,
    ignored, or all-reduced late (delay_all_reduce_named_params) each name the parameters; a change of
    requires_grad between the wrap and the reading falls back to DDP's own byte count (a size, said as one)."""
    from torch.nn.parallel import DistributedDataParallel

    from lightning_gns.sources.ddp_averaged import DDPAveraged

    def two_layers() -> torch.nn.Sequential:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))

    def names(model: torch.nn.Module) -> dict[int, str]:
        return {id(p): n for n, p in model.named_parameters()}

    model = two_layers()
    assert DDPAveraged.of(DistributedDataParallel(model)).not_averaged(list(model.parameters()), names(model)) is None

    model = two_layers()  # frozen when wrapped, unfrozen since (BackboneFinetuning)
    model[0].requires_grad_(False)
    averaged = DDPAveraged.of(DistributedDataParallel(model))
    model[0].requires_grad_(True)
    said = averaged.not_averaged(list(model.parameters()), names(model))
    assert said is not None and "does not average 15 elements (0.weight, 0.bias) of the 23 optimized" in said

    model = two_layers()
    model._ddp_params_and_buffers_to_ignore = ["1.bias"]  # type: ignore[assignment]
    said = DDPAveraged.of(DistributedDataParallel(model)).not_averaged(list(model.parameters()), names(model))
    assert said is not None and "does not average 2 elements (1.bias)" in said

    model = two_layers()
    delayed = DistributedDataParallel(
        model, delay_all_reduce_named_params=[("1.weight", model[1].weight)], param_to_hook_all_reduce=model[0].weight
    )
    said = DDPAveraged.of(delayed).not_averaged(list(model.parameters()), names(model))
    assert said is not None and "all-reduces 6 elements (1.weight) after the backward" in said

    model = two_layers()
    model[0].requires_grad_(False)
    wrapper = DistributedDataParallel(model)
    model[0].requires_grad_(True)  # before the reading: only DDP's count knows
    said = DDPAveraged.of(wrapper).not_averaged(list(model.parameters()), names(model))
    assert said is not None and "does not average 60 of the 92 bytes of optimized parameters" in said


def test_two_callbacks_that_log_the_same_names_are_said_and_both_measure() -> None:
    """Two instances log the same gns/... names: a logger keeps one value per name and step (the last instance's,
    or a blend of both; found by a helper), so the Trainer says so once. A per_example instance beside a microbatch
    one measures: the other's parameter hooks only read the gradients (it left every parameter out for them)."""
    every_example = GradientNoiseScale(beta=0.9, mode="per_example")
    windows = GradientNoiseScale(beta=0.8, mode="microbatch")
    trainer = make_trainer([every_example, windows], max_steps=4, accumulate_grad_batches=2, logger=MemoryLogger())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LinearRegression(PROBLEM), loader(*PROBLEM.sample(64, seed=1), batch_size=4))
    said = [str(w.message) for w in caught if "GradientNoiseScale callbacks" in str(w.message)]
    assert len(said) == 1 and "The Trainer has 2 GradientNoiseScale callbacks" in said[0]
    assert every_example.left_out == {} and every_example.covered_fraction == 1.0
    assert every_example.skipped_steps == windows.skipped_steps == 0
    assert int(every_example.metric.measured_steps) == int(windows.metric.measured_steps) == 4


# ---------------------------------------------------------------- the tracker and the metric used by hand


def plain_loop(mode: str, accumulation: int, skip: Callable[[int, int], str]) -> tuple[Any, list[str]]:
    """The README's plain-PyTorch loop on the linear regression, 4 windows, with one call left out where ``skip``
    says (``"end"``: end_micro_batch after that micro-batch, ``"measure"``: measure_step of that window)."""
    from lightning_gns import GradientNoiseScaleTracker

    problem = LinearProblem(dim=4, seed=60)
    x, y = problem.sample(8 * accumulation * 4, seed=61)
    model = LinearRegression(problem).linear
    tracker = GradientNoiseScaleTracker(beta=0.9)
    tracker.attach(model.parameters(), mode=mode, model=model)  # type: ignore[arg-type]
    batches = list(loader(x, y, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            for i, (xb, yb) in enumerate(batches[step * accumulation : (step + 1) * accumulation]):
                tracker.start_micro_batch(units=len(xb), accumulation=accumulation)
                (0.5 * (model(xb).squeeze(-1) - yb).square().mean() / accumulation).backward()
                if skip(step, i) != "end":
                    tracker.end_micro_batch()
            if skip(step, accumulation - 1) != "measure":
                tracker.measure_step()
                model.zero_grad()
        tracker.check()
    return tracker, [str(w.message) for w in caught]


@pytest.mark.parametrize("mode", ["microbatch", "per_example"])
def test_a_backward_without_end_micro_batch_skips_its_step_and_says_so(mode: str) -> None:
    """The unended micro-batch's norms were dropped while .grad held its gradient: B_simple 0.0 for 8.1 (probe)."""
    tracker, said = plain_loop(mode, 2, lambda step, i: "end" if (step, i) == (1, 1) else "")
    assert int(tracker.metric.skipped_steps) == 1 and int(tracker.metric.measured_steps) == 3
    assert any("ran without end_micro_batch() after it" in m for m in said)
    assert not any("could not be measured and was skipped" in m for m in said), "said twice"


@pytest.mark.parametrize("mode", ["microbatch", "per_example"])
def test_a_window_without_measure_step_skips_the_next_and_says_so(mode: str) -> None:
    """Window 1's micro-batches joined window 2's (4 backward passes at an accumulation of 2), measured against a
    .grad that, zeroed in between or not, is no mean of them: |G|^2 2.3 for 9.6 (probe). Skipped, and said."""
    tracker, said = plain_loop(mode, 2, lambda step, i: "measure" if step == 1 else "")
    assert int(tracker.metric.skipped_steps) == 1 and int(tracker.metric.measured_steps) == 2
    assert any("more backward passes were recorded since the last measure_step()" in m for m in said)


def test_a_0d_count_without_examples_is_refused_in_per_example_mode() -> None:
    """A 0-d tensor of units (a token count, mask.sum()) does not say how many examples the layers must lead with."""
    from lightning_gns import GradientNoiseScaleTracker

    model = torch.nn.Linear(3, 1)
    tracker = GradientNoiseScaleTracker()
    tracker.attach(model.parameters(), mode="per_example", model=model)
    with pytest.raises(ValueError, match=r"units is a 0-d tensor.*pass examples=len\(batch\)"):
        tracker.start_micro_batch(units=torch.tensor(12))
    tracker.start_micro_batch(units=torch.tensor(12), examples=4)  # told: measured
    (model(torch.randn(4, 3)).square().mean()).backward()
    tracker.end_micro_batch()
    tracker.measure_step()
    assert int(tracker.metric.measured_steps) == 1


class PenaltyFromStep(LinearRegression):
    """A gradient penalty through torch.autograd.grad on the parameters, switched on after a warm-up: from then on
    each step's parameter gradient comes from two backward passes, which no norm of one pass measures."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_step >= 3:
            (grad,) = torch.autograd.grad(loss, self.linear.weight, create_graph=True)
            loss = loss + 0.0 * grad.square().sum()
        return loss


def test_steps_that_cannot_be_measured_after_measured_ones_are_said_once_per_reason() -> None:
    """Only gns/skipped_steps showed them (3 measured, 7 skipped, no warning), while B_simple stayed put."""
    problem = LinearProblem(dim=4, seed=62)
    x, y = problem.sample(8 * 2 * 10, seed=63)
    gns = GradientNoiseScale(beta=0.9, mode="microbatch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer([gns], accumulate_grad_batches=2, log_every_n_steps=1)
        trainer.fit(PenaltyFromStep(problem), loader(x, y, 8))
    assert int(gns.metric.measured_steps) == 3 and int(gns.metric.skipped_steps) == 7
    said = [str(w.message) for w in caught if "could not be measured and was skipped" in str(w.message)]
    assert len(said) == 1, said
    assert "received two gradients in one micro-batch" in said[0] and "gns/skipped_steps" in said[0]


def test_ddp_model_that_is_no_ddp_wrapper_is_refused() -> None:
    from lightning_gns import GradientNoiseScaleTracker

    model = torch.nn.Linear(3, 1)
    with pytest.raises(TypeError, match=r"ddp_model must be the torch.nn.parallel.DistributedDataParallel wrapper"):
        GradientNoiseScaleTracker().attach(model.parameters(), mode="ddp", ddp_model=model)  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["dist_sync_on_step", "sync_on_compute"])
def test_metric_sync_options_are_refused(option: str) -> None:
    """torchmetrics' sync stacked every rank's copy of states the update had already all-reduced: compute() gave
    one value per rank."""
    from lightning_gns import GradientNoiseScaleMetric

    with pytest.raises(ValueError, match=rf"GradientNoiseScaleMetric\({option}=True\): update\(\) already all-reduces"):
        GradientNoiseScaleMetric(**{option: True})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["metric"].__setitem__("grad_sq_norm_ema", torch.tensor(float("nan"), dtype=torch.float64)),
            "is nan",
        ),
        (lambda s: s["metric"].pop("trace_cov_ema"), "'metric.trace_cov_ema' is missing"),
        (lambda s: s["metric"].__setitem__("estimate_moments", torch.tensor(1.0, dtype=torch.float64)), "shape"),
    ],
    ids=["nan", "missing", "shape"],
)
def test_the_tracker_refuses_a_damaged_state(edit: Callable[[dict[str, Any]], Any], message: str) -> None:
    """The callback's checks, for the tracker used by hand: a missing trace_cov_ema loaded as B_simple 0, a
    scalar estimate_moments broadcast into an interval [1, 1]."""
    tracker, _ = plain_loop("microbatch", 2, lambda step, i: "")
    state = tracker.state_dict()
    edit(state)
    from lightning_gns import GradientNoiseScaleTracker

    fresh = GradientNoiseScaleTracker(beta=0.9)
    with pytest.raises(ValueError, match=rf"GradientNoiseScaleTracker: the checkpoint's .*{message}"):
        fresh.load_state_dict(state)
