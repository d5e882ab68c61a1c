"""Setups that used to give a wrong number without a word: each is now exact against float64, or refused/warned."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_gns import GradientNoiseScale
from support.models import LinearProblem, LinearRegression, loader
from support.recording import Recorder, assert_matches_reference
from support.reference_func import BatchRecorder, assert_histories_match, reference_history
from support.trainers import fit64, make_trainer, param_names
from support.zoo import BatchNormCNN, FlattenedTokensModel, PaddedTokenModel, TinyGPT


# ---------------------------------------------------------------- 1. sequences of unequal length
@pytest.mark.parametrize("accumulate", [1, 2])
def test_padded_sequences_per_example_counts_match_float64(accumulate: int) -> None:
    """batch_size_fn returns one token count per example: each example gets its own size and loss share."""
    model = PaddedTokenModel()
    data = PaddedTokenModel.data(8 * 7 + 3)
    gns = GradientNoiseScale(beta=0.8, mode="per_example", batch_size_fn=PaddedTokenModel.units)
    recorder = BatchRecorder(gns)
    fit64([gns, recorder], model, data, accumulate_grad_batches=accumulate)
    assert gns.skipped_steps == 0
    want = reference_history(
        model, recorder.micro_batches, PaddedTokenModel.example_loss, lambda step: param_names(model),
        PaddedTokenModel.units, beta=0.8,
    )  # fmt: skip
    assert_histories_match(recorder.history, want)


def test_padded_sequences_microbatch_mode_takes_counts_too() -> None:
    model = PaddedTokenModel()
    gns = GradientNoiseScale(beta=0.8, mode="microbatch", batch_size_fn=PaddedTokenModel.units)
    fit64([gns], model, PaddedTokenModel.data(8 * 8), accumulate_grad_batches=2)
    assert gns.skipped_steps == 0 and math.isfinite(gns.b_simple)
    last_window = list(PaddedTokenModel.data(8 * 8))[-2:]
    assert float(gns.metric.last_b_big) == float(sum(PaddedTokenModel.units(b).sum() for b in last_window))


def test_token_total_in_per_example_mode_warns_about_equal_shares() -> None:
    """An int token count cannot say how the tokens split between examples: say so once."""
    model = PaddedTokenModel()
    gns = GradientNoiseScale(beta=0.8, mode="per_example", batch_size_fn=lambda b: int(b[1][:, 1:].sum()))
    messages = fit64([gns], model, PaddedTokenModel.data(8 * 3))
    assert sum("one count per example" in m for m in messages) == 1


# ---------------------------------------------------------------- 2. BatchNorm
def test_batchnorm_refuses_per_example() -> None:
    with pytest.raises(MisconfigurationException, match=r"BatchNorm \(net.1\).*accumulate_grad_batches=2"):
        make_trainer([GradientNoiseScale(mode="per_example")]).fit(BatchNormCNN(), BatchNormCNN.data())


def test_batchnorm_auto_without_another_source_is_an_error() -> None:
    with pytest.raises(MisconfigurationException, match=r"cannot measure this run.*BatchNorm.*GroupNorm"):
        make_trainer([GradientNoiseScale()]).fit(BatchNormCNN(), BatchNormCNN.data())


def test_batchnorm_auto_with_accumulation_picks_microbatch() -> None:
    gns = GradientNoiseScale(beta=0.9)
    make_trainer([gns], accumulate_grad_batches=2).fit(BatchNormCNN(), BatchNormCNN.data())
    assert gns.mode == "microbatch" and gns.skipped_steps == 0 and math.isfinite(gns.b_simple)


# ---------------------------------------------------------------- 5. gradients outside the training backward
class ValidationWithGradients(LinearRegression):
    """A validation_step that takes gradients, as input-attribution or meta-learning code does."""

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        with torch.enable_grad():
            loss = 0.5 * (self.linear(x).squeeze(-1) - y).square().mean()
            loss.backward()  # leaves .grad behind too; the next step's zero_grad clears it
            torch.autograd.grad(0.5 * (self.linear(x).squeeze(-1) - y).square().mean(), self.linear.weight)


@pytest.mark.parametrize("mode", ["per_example", "microbatch"])
def test_validation_gradients_do_not_leak_into_training_steps(mode: str) -> None:
    problem = LinearProblem(dim=5, noise_std=0.5, seed=40)
    x, y = problem.sample(8 * 24, seed=41)
    gns = GradientNoiseScale(beta=0.9, mode=mode)
    recorder = Recorder(gns)
    accumulate = 2 if mode == "microbatch" else 1
    trainer = make_trainer(
        [gns, recorder], accumulate_grad_batches=accumulate, inference_mode=False, val_check_interval=4,
        limit_val_batches=2, num_sanity_val_steps=1,
    )  # fmt: skip
    trainer.fit(ValidationWithGradients(problem, lr=0.3), loader(x, y, 8), loader(x[:16], y[:16], 8))
    assert gns.skipped_steps == 0
    assert_matches_reference(recorder, world_size=1, beta=0.9, per_example=mode == "per_example")


@pytest.mark.parametrize("mode", ["per_example", "microbatch"])
def test_a_validation_backward_inside_an_accumulation_window_skips_that_step(mode: str) -> None:
    """Validation after micro-batch 3 of windows of 2 runs inside the window (batches 2 and 3): its backward adds to
    .grad, the window's big batch, a gradient no micro-batch holds (B_simple 0.0 against 12.7 in a probe, nothing
    said). Those steps are skipped with the reason; the others match the float64 recomputation."""
    problem = LinearProblem(dim=5, noise_std=0.5, seed=42)
    x, y = problem.sample(8 * 24, seed=43)
    gns = GradientNoiseScale(beta=0.9, mode=mode)
    recorder = Recorder(gns)
    trainer = make_trainer(
        [gns, recorder], accumulate_grad_batches=2, inference_mode=False, val_check_interval=3,
        limit_val_batches=2, num_sanity_val_steps=1,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ValidationWithGradients(problem, lr=0.3), loader(x, y, 8), loader(x[:16], y[:16], 8))
    # Validation after micro-batches 3, 9, 15, 21: the first of windows (2, 3), (8, 9), ...: 4 of 12 steps.
    assert gns.skipped_steps == 4 and int(gns.metric.measured_steps) == 8
    assert any("a backward pass during validation" in str(w.message) for w in caught)


class InputGradientPenalty(LinearRegression):
    """training_step with a double backward: the loss penalises the gradient with respect to the input."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x = x.clone().requires_grad_(True)
        loss = 0.5 * (self.linear(x).squeeze(-1) - y).square().mean()
        (input_grad,) = torch.autograd.grad(loss, x, create_graph=True)
        return loss + 0.1 * input_grad.square().sum()


def test_double_backward_per_example_is_skipped_counted_and_warned() -> None:
    problem = LinearProblem(dim=4, seed=42)
    x, y = problem.sample(8 * 6, seed=43)
    gns = GradientNoiseScale(beta=0.9, mode="per_example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns]).fit(InputGradientPenalty(problem, lr=0.1), loader(x, y, 8))
    assert gns.skipped_steps == 6 and math.isnan(gns.b_simple)
    messages = [str(w.message) for w in caught if "no optimizer step could be measured" in str(w.message)]
    assert len(messages) == 1 and "double backward" in messages[0]


def test_double_backward_through_the_input_is_measured_in_microbatch_mode() -> None:
    """Parameter hooks see one gradient per micro-batch whatever happened before backward: nothing to skip."""
    problem = LinearProblem(dim=4, seed=42)
    x, y = problem.sample(8 * 8, seed=43)
    gns = GradientNoiseScale(beta=0.9, mode="microbatch")
    make_trainer([gns], accumulate_grad_batches=2).fit(InputGradientPenalty(problem, lr=0.1), loader(x, y, 8))
    assert gns.skipped_steps == 0 and math.isfinite(gns.b_simple)


class ParamGradientInTrainingStep(LinearRegression):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        torch.autograd.grad(loss, self.linear.weight, retain_graph=True)  # fires the parameter hooks once more
        return loss


def fit_warned(gns: GradientNoiseScale, model: LinearRegression, data: Any, **kwargs: Any) -> list[str]:
    """Fit and return the messages of the warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns], **kwargs).fit(model, data)
    return [str(w.message) for w in caught]


def test_parameter_gradient_taken_before_backward_skips_microbatch_steps() -> None:
    problem = LinearProblem(dim=4, seed=44)
    x, y = problem.sample(8 * 8, seed=45)
    gns = GradientNoiseScale(beta=0.9, mode="microbatch")
    messages = fit_warned(gns, ParamGradientInTrainingStep(problem), loader(x, y, 8), accumulate_grad_batches=2)
    assert gns.skipped_steps == 4 and math.isnan(gns.b_simple)
    told = [m for m in messages if "no optimizer step could be measured so far (4 skipped)" in m]
    assert len(told) == 1 and "parameter 'linear.weight' received two gradients in one micro-batch" in told[0]
    assert "torch.autograd.grad with respect to the parameters" in told[0]


class ReentrantCheckpointing(LinearRegression):
    """One square layer applied twice, each application in its own reentrant checkpointed segment."""

    def __init__(self, problem: LinearProblem, reentrant: bool) -> None:
        super().__init__(problem, lr=0.1)
        self.reentrant = reentrant
        self.square = nn.Linear(problem.dim, problem.dim, bias=False)
        with torch.no_grad():
            self.square.weight.copy_(torch.eye(problem.dim) + 0.1 * torch.ones(problem.dim, problem.dim))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        x = x.requires_grad_(True)  # a reentrant segment whose inputs need no gradient would get none
        for _ in range(2):
            x = torch.utils.checkpoint.checkpoint(self.square, x, use_reentrant=self.reentrant)
        return 0.5 * (self.linear(x).squeeze(-1) - y).square().mean()


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_parameter_in_two_reentrant_checkpointed_segments_skips_the_step_and_says_why(reentrant: bool) -> None:
    """Each reentrant segment's recomputation is a backward pass of its own: square.weight gets two gradients
    per micro-batch, whose norms do not give the norm of their sum. Non-reentrant checkpointing gives one."""
    problem = LinearProblem(dim=4, seed=46)
    x, y = problem.sample(8 * 8, seed=47)
    gns = GradientNoiseScale(beta=0.9, mode="microbatch")
    model = ReentrantCheckpointing(problem, reentrant)
    messages = fit_warned(gns, model, loader(x, y, 8), accumulate_grad_batches=2)
    told = [m for m in messages if "no optimizer step could be measured" in m]
    if not reentrant:
        assert gns.skipped_steps == 0 and math.isfinite(gns.b_simple) and not told
        return
    assert gns.skipped_steps == 4 and int(gns.metric.measured_steps) == 0 and math.isnan(gns.b_simple)
    assert len(told) == 1 and "(4 skipped)" in told[0]
    assert "parameter 'square.weight' received two gradients in one micro-batch" in told[0]
    assert "use_reentrant=False" in told[0]


# ---------------------------------------------------------------- 6. parameters that change during fit
class Backbone(PaddedTokenModel):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(self.embed, self.norm)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.backbone(tokens))


def test_unfrozen_backbone_is_measured_from_the_next_step() -> None:
    model = Backbone()
    data = PaddedTokenModel.data(8 * 5)
    gns = GradientNoiseScale(beta=0.8, mode="per_example", batch_size_fn=PaddedTokenModel.units)
    recorder = BatchRecorder(gns)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    messages = fit64([finetuning, gns, recorder], model, data, max_epochs=2)
    assert sum("parameters changed" in m for m in messages) == 1
    assert gns.covered_fraction == 1.0
    head, everything = ["head.weight", "head.bias"], param_names(model)

    def names_at(step: int) -> list[str]:
        return head if step < 5 else everything

    want = reference_history(
        model, recorder.micro_batches, PaddedTokenModel.example_loss, names_at, PaddedTokenModel.units, beta=0.8
    )
    assert_histories_match(recorder.history, want)


# ---------------------------------------------------------------- 7. layers whose leading dimension is not the batch
@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [4, 8], ids=["T!=B", "T==B"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_nanogpt_positional_embedding_is_left_out_and_the_rest_exact(batch_size: int, accumulate: int) -> None:
    """wpe(arange(T)) is broadcast over the batch: left out (and said), every other parameter exact."""
    model = TinyGPT()
    data = TinyGPT.data(batch_size * 6, batch_size=batch_size)
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    recorder = BatchRecorder(gns)
    messages = fit64([gns, recorder], model, data, accumulate_grad_batches=accumulate)
    assert gns.skipped_steps == 0
    assert list(gns.left_out) == ["wpe.weight"] and "arange" in gns.left_out["wpe.weight"]
    said = [m for m in messages if "left out" in m.lower()]
    assert len(said) == 1 and "wpe.weight" in said[0], messages
    total = sum(p.numel() for p in model.parameters())
    assert gns.covered_fraction == pytest.approx(1 - model.wpe.weight.numel() / total)
    want = reference_history(
        model, recorder.micro_batches, TinyGPT.example_loss, lambda step: param_names(model, ("wpe",)),
        lambda batch: torch.ones(len(batch)), beta=0.8,
    )  # fmt: skip
    assert_histories_match(recorder.history, want)


@pytest.mark.parametrize(
    ("model_class", "left_out"),
    [(FlattenedTokensModel, ("proj",))],
    ids=["flattened-tokens"],
)
def test_layers_that_cannot_be_split_per_example_are_left_out_and_said(
    model_class: type[Any], left_out: tuple[str, ...]
) -> None:
    model = model_class()
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    recorder = BatchRecorder(gns)
    messages = fit64([gns, recorder], model, model_class.data(4 * 6))
    assert gns.skipped_steps == 0
    expected = {n for n in param_names(model) if n.startswith(left_out)}
    assert set(gns.left_out) == expected
    said = [m for m in messages if "left out" in m.lower()]
    assert len(said) == 1 and all(name in said[0] for name in expected), messages
    kept = param_names(model, left_out)
    total = sum(p.numel() for p in model.parameters())
    assert gns.covered_fraction == pytest.approx(sum(model.get_parameter(n).numel() for n in kept) / total)
    want = reference_history(
        model, recorder.micro_batches, model_class.example_loss, lambda step: kept,
        lambda batch: torch.ones(len(batch[0])), beta=0.8,
    )  # fmt: skip
    assert_histories_match(recorder.history, want)


def test_one_example_per_step_on_one_process_warns_once() -> None:
    problem = LinearProblem(dim=3, seed=46)
    x, y = problem.sample(6, seed=47)
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns]).fit(LinearRegression(problem), loader(x, y, 1))
    messages = [str(w.message) for w in caught if "no optimizer step could be measured" in str(w.message)]
    assert len(messages) == 1 and "one example" in messages[0]
    assert gns.skipped_steps == 6


def test_steps_that_all_overflow_are_not_blamed_on_one_example_micro_batches() -> None:
    """Every step overflowing under an fp16 GradScaler, with 8 examples per micro-batch: the message named "a
    micro-batch of one example" first, which cannot apply."""
    from lightning.pytorch.plugins import MixedPrecision

    problem = LinearProblem(dim=3, seed=46)
    x, y = problem.sample(32, seed=47)
    gns = GradientNoiseScale(mode="per_example")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)  # inf in every fp16 gradient
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(
            LinearRegression(problem), loader(x, y, 8)
        )
    messages = [str(w.message) for w in caught if "no optimizer step could be measured" in str(w.message)]
    assert len(messages) == 1 and "non-finite gradients" in messages[0] and "one example" not in messages[0]
    assert gns.skipped_steps == 4


# ---------------------------------------------------------------- 13. torch.compile(fullgraph=True)
@pytest.mark.parametrize("form", ["torch.compile", "in-place", "in-place submodule"])
def test_fullgraph_compile_with_per_example_is_refused(form: str) -> None:
    """Module.compile() keeps its context in the compiled call's closure: that form crashed inside dynamo at the
    first forward (the hooks cannot be traced) instead of being refused."""
    problem = LinearProblem(dim=3, seed=48)
    x, y = problem.sample(16, seed=49)
    model = LinearRegression(problem)
    if form == "torch.compile":
        model = torch.compile(model, fullgraph=True)
    else:
        (model if form == "in-place" else model.linear).compile(fullgraph=True, backend="eager")
    with pytest.raises(MisconfigurationException, match=r"fullgraph=True.*Compile without fullgraph"):
        make_trainer([GradientNoiseScale(mode="per_example")]).fit(model, loader(x, y, 8))


class _Unused(Callback):
    pass


def test_trainer_without_loggers_still_warns_at_the_end() -> None:
    """The exclusion warnings come at train end when no logging step ever runs."""
    model = TinyGPT()
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns, _Unused()], max_steps=2).fit(model, TinyGPT.data(8))
    assert any("wpe.weight" in str(w.message) for w in caught)
