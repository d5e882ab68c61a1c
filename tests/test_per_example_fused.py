"""The fused nn.Linear path of mode="per_example": exact norms, unchanged gradients, and where it must hold."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_gns import GradientNoiseScaleTracker
from lightning_gns.sources import PerExampleSource
from lightning_gns.sources.per_example import is_supported
from lightning_gns.sources.per_example_factors import OneHot, factor_sq_norm
from lightning_gns.sources.per_example_fused import FusableForward, fused_pays
from support.multiprocess import run_worker
from support.per_example_norms import pop_norms, pop_norms_by_layer
from support.seq_model import VOCAB, SeqModel, fused_layer_names, sequence_loss, vmap_sq_norms


def measure(model: nn.Module, tokens: Tensor, fused: bool = True) -> tuple[Tensor, dict[str, Tensor], set[str]]:
    """Per-example squared norms (of the per-example loss) from the source, per layer, and the fused layers."""
    source = PerExampleSource(fused=fused)
    source.attach(model, model.parameters())
    source.recording = True
    source.expected_examples = len(tokens)
    names = fused_layer_names(model)
    sequence_loss(model, tokens).mean().backward()
    norms, layers = pop_norms_by_layer(source)
    source.detach()
    assert norms is not None
    scale = len(tokens) ** 2
    return (norms * len(tokens)).square(), {k: v * scale for k, v in layers.items()}, names


@pytest.mark.parametrize("checkpointed", [False, "non-reentrant", "reentrant"])
def test_fused_norms_match_torch_func_in_float64(checkpointed: str | bool) -> None:
    torch.manual_seed(0)
    model = SeqModel(reentrant=checkpointed == "reentrant").double()
    tokens = torch.randint(0, VOCAB, (4, 9))
    expected = vmap_sq_norms(model, tokens)  # torch.func refuses checkpoints: the reference runs without
    model.checkpointed = bool(checkpointed)
    total, layer, fused = measure(model, tokens)
    assert fused == {"up", "down", "head", "norm"}
    torch.testing.assert_close(total, sum(expected.values()), rtol=1e-10, atol=0)
    torch.testing.assert_close(layer["up"], expected["up.weight"] + expected["up.bias"], rtol=1e-10, atol=0)
    torch.testing.assert_close(layer["norm"], expected["norm.weight"] + expected["norm.bias"], rtol=1e-10, atol=0)
    # The head's weight is the embedding's: reported under the embedding, with the cross term of both uses.
    torch.testing.assert_close(layer["embed"], expected["embed.weight"], rtol=1e-10, atol=0)


def test_fused_and_hook_paths_agree_and_leave_the_gradient_unchanged() -> None:
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (6, 16))
    base = SeqModel(width=8)
    grads = {}
    for label, fused in (("plain", None), ("hooks", False), ("fused", True)):
        model = copy.deepcopy(base)
        if fused is None:
            sequence_loss(model, tokens).mean().backward()
        else:
            total, _, names = measure(model, tokens, fused=fused)
            assert bool(names) == fused
            grads[f"{label}_norms"] = total
        grads[label] = {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(grads["fused_norms"], grads["hooks_norms"], rtol=1e-5, atol=0)
    for name, want in grads["plain"].items():
        torch.testing.assert_close(grads["fused"][name], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(grads["hooks"][name], want)  # the hook path does not touch the gradient


def test_checkpointed_fused_layers_keep_no_factors_alive() -> None:
    """A non-reentrant checkpoint's recomputation is not a second use: nothing is stored for cross terms."""
    torch.manual_seed(2)
    model = SeqModel(checkpointed=True).double()
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())  # untie: no parameter used twice...
    model.block = lambda h: h + model.down(torch.tanh(model.up(h)))  # type: ignore[method-assign]  # ...once
    source = PerExampleSource()
    source.attach(model, model.parameters())
    source.recording = True
    sequence_loss(model, torch.randint(0, VOCAB, (3, 7))).mean().backward()
    assert not source._stored_factors  # the recomputed calls counted as further uses would leave theirs
    assert pop_norms(source) is not None


def test_autocast_bf16_gradient_and_norms() -> None:
    torch.manual_seed(3)
    base = SeqModel(width=16)
    tokens = torch.randint(0, VOCAB, (4, 32))
    expected = sum(vmap_sq_norms(copy.deepcopy(base).double(), tokens).values())
    results = {}
    for fused in (False, True):
        model = copy.deepcopy(base)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, _, names = measure(model, tokens, fused=fused)
        assert bool(names) == fused
        results[fused] = (total, {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(results[True][0], expected.float(), rtol=0.05, atol=0)
    for name, want in results[False][1].items():
        got = results[True][1][name]
        assert got.dtype == want.dtype == torch.float32
        assert ((got - want).norm() / want.norm()).item() < 0.02, name


@pytest.mark.slow
def test_torch_compile_falls_back_to_the_hooks() -> None:
    torch.manual_seed(4)
    model = SeqModel().double()
    tokens = torch.randint(0, VOCAB, (3, 8))
    expected = sum(vmap_sq_norms(model, tokens).values())
    compiled = torch.compile(model, backend="aot_eager")
    total, _, _ = measure(compiled, tokens)
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=0)


def test_double_backward_through_a_fused_layer_fails_the_pass() -> None:
    model = SeqModel().double()
    source = PerExampleSource()
    source.attach(model, model.parameters())
    source.recording = True
    loss = sequence_loss(model, torch.randint(0, VOCAB, (3, 8))).mean()
    loss.backward(retain_graph=True)
    loss.backward()
    backward = source.pop_backward()
    assert backward is not None and backward.failed is not None and "twice" in backward.failed


def test_accumulated_gradient_matches_plain_training() -> None:
    torch.manual_seed(5)
    base = SeqModel(width=8)
    batches = [torch.randint(0, VOCAB, (4, 10)) for _ in range(2)]
    plain, tracked = copy.deepcopy(base), copy.deepcopy(base)
    tracker = GradientNoiseScaleTracker(beta=0.5)
    tracker.attach(tracked.parameters(), mode="per_example", model=tracked)
    for tokens in batches:
        (sequence_loss(plain, tokens).mean() / 2).backward()
        tracker.start_micro_batch(units=len(tokens), accumulation=2)
        names = fused_layer_names(tracked)
        (sequence_loss(tracked, tokens).mean() / 2).backward()
        tracker.end_micro_batch()
        assert names == {"up", "down", "head", "norm"}
    assert tracker.measure_step()
    assert tracker.metric.measured_steps.item() == 1
    for (name, p), q in zip(tracked.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_attach_and_detach_replace_and_restore_forward() -> None:
    model = SeqModel()
    source = PerExampleSource()
    source.attach(model, model.parameters())
    assert isinstance(vars(model.up).get("forward"), FusableForward)
    assert isinstance(vars(model.norm).get("forward"), FusableForward)
    assert "forward" not in vars(model.embed)  # only Linear and LayerNorm layers
    copied = copy.deepcopy(model)  # a copy runs plain F.linear: its layers are not watched
    source.recording = True
    names = fused_layer_names(copied)
    sequence_loss(copied, torch.randint(0, VOCAB, (2, 6))).mean().backward()
    assert names == set() and source.pop_backward() is None
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(restored.up(torch.ones(2, 5)), model.up(torch.ones(2, 5)))
    assert torch.equal(restored.norm(torch.ones(2, 5)), model.norm(torch.ones(2, 5)))
    assert is_supported(restored.up) and is_supported(restored.norm)  # its own forward, bound: still dedicated
    source.detach()
    assert all("forward" not in vars(m) for m in model.modules())


def test_linear_subclass_with_its_own_forward_is_not_fused() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(4, 4))
    source = PerExampleSource()
    source.attach(model, model.parameters())
    assert "forward" not in vars(model[0])


def test_fused_pays_by_shape() -> None:
    assert not fused_pays(16, 1, 128, 128)  # single tokens: the closed form is free
    assert fused_pays(16, 128, 512, 128)  # the GPT benchmark's MLP
    assert not fused_pays(16, 16, 4096, 4096)  # Gram form far cheaper, and (B, 4096, 4096) too large
    assert fused_pays(4, 128, 1024, 1024)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_fused_path_under_two_process_ddp_and_fsdp2(tmp_path: Path, wrap: str) -> None:
    run_worker(Path(__file__).parent / "support" / "fused_worker.py", "--out", str(tmp_path), "--wrap", wrap)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["fused"] == ["down", "head", "norm", "up"]
        assert result["norm_error"] < 1e-10
        assert max(result["grad_errors"].values()) < 1e-10, result["grad_errors"]


def test_embedding_norms_scattered_and_gram_forms_agree() -> None:
    """A small table's per-example gradient is scattered into (B, rows, n); a large one takes the Gram form."""
    torch.manual_seed(6)
    index = torch.randint(0, 7, (3, 10))
    b = torch.randn(3, 10, 4, dtype=torch.float64)
    want = torch.zeros(3, 7, 4, dtype=torch.float64)
    for i in range(3):
        for t in range(10):
            want[i, index[i, t]] += b[i, t]
    want_sq = want.flatten(1).square().sum(dim=1)
    for rows in (7, None):  # scattered, Gram
        torch.testing.assert_close(factor_sq_norm(OneHot(index, b, rows)), want_sq, rtol=1e-12, atol=0)


def test_torch_func_inside_a_recorded_step_runs_the_plain_forward() -> None:
    """vmap over the attached model while recording: the fused function is not vmapped, the hooks see nothing."""
    torch.manual_seed(7)
    model = SeqModel().double()
    tokens = torch.randint(0, VOCAB, (3, 8))
    expected = vmap_sq_norms(model, tokens)
    source = PerExampleSource()
    source.attach(model, model.parameters())
    source.recording = True
    got = vmap_sq_norms(model, tokens)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=0)


def test_data_parallel_model_is_not_fused() -> None:
    model = SeqModel()
    source = PerExampleSource()
    source.attach(nn.DataParallel(model), model.parameters())
    assert all("forward" not in vars(m) for m in model.modules())


class InPlaceBlock(nn.Module):
    """An MLP block on (B, T, d) that modifies the Linear outputs in place (or, for the control, out of place)."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.up, self.down, self.in_place = nn.Linear(16, 64), nn.Linear(64, 16), in_place

    def forward(self, x: Tensor) -> Tensor:
        if self.in_place:
            h = torch.relu_(self.up(x))  # nn.ReLU(inplace=True)
            out = self.down(h)
            out += x  # a residual added in place
            return out
        return self.down(torch.relu(self.up(x))) + x


def test_in_place_ops_on_fused_linear_outputs_train_and_measure_alike() -> None:
    """A fused Linear's output was a view made inside a custom Function, and autograd refused in-place ops on it:
    training crashed at the first batch (found by a helper). Now the in-place model measures exactly what the
    out-of-place one does."""
    x = torch.randn(8, 32, 16, generator=torch.Generator().manual_seed(5))
    results = {}
    for in_place in (False, True):
        model = InPlaceBlock(in_place)
        fused = fused_layer_names(model)
        tracker = GradientNoiseScaleTracker(beta=0.5)
        tracker.attach(model.parameters(), "per_example", model=model)
        tracker.start_micro_batch(8, 1)
        out = model(x)
        tracker.before_backward(out.square().mean())
        out.square().mean().backward()
        tracker.end_micro_batch()
        tracker.measure_step()
        assert fused == {"up", "down"}
        results[in_place] = (float(tracker.metric.grad_sq_norm), float(tracker.metric.trace_cov))
    assert results[True] == pytest.approx(results[False], rel=1e-6)
