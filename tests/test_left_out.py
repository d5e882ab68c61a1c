"""What per_example mode leaves out: the left_out readout, its reasons, the one message, the low-coverage warning."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseScale, GradientNoiseScaleMetric, GradientNoiseScaleTracker
from lightning_gns.sources.left_out import NOT_IN_MODEL, unwatched_reasons
from lightning_gns.sources.per_example_fused import LinearWithPerExampleGrads
from lightning_gns.sources.per_example_uses import UseCheck, graph_signature
from support.multiprocess import run_worker
from support.reference import ema_history
from support.syncs import SyncWatcher
from support.trainers import fit64, make_trainer
from support.zoo import Scale, SequenceRegression, TinyGPT

RAW_TOP = (
    "raw parameter used in the forward of the top module (Structure), outside any layer the per-example source hooks"
)
RAW_ATTN = (
    "raw parameter used in the forward of 'attn' (MultiheadAttention), outside any layer the per-example source hooks"
)
PARAMETRIZED = (
    "parametrized tensor (torch.nn.utils.parametrize, e.g. weight_norm or spectral_norm): its gradient reaches the"
    " original tensors, which no per-example path reads"
)


class Structure(nn.Module):
    """One parameter of each kind the per-example source has no path for, beside supported layers."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.linear = nn.Linear(3, 4)
        self.cell = nn.GRUCell(4, 4)
        self.attn = nn.MultiheadAttention(4, 2)
        self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
        self.sparse = nn.Embedding(5, 4, sparse=True)
        self.grouped = nn.Conv1d(4, 4, 3, groups=2)
        self.norm = nn.LayerNorm(4)


def test_reasons_come_from_the_model_structure() -> None:
    """Why each parameter would be left out if the per-example source did not watch it, from its owner alone."""
    model = Structure()
    outside = nn.Parameter(torch.zeros(2))
    supported = ("linear.", "attn.out_proj.", "norm.")  # layers with a dedicated path: nothing to explain
    params = [p for n, p in model.named_parameters() if not n.startswith(supported)]
    reasons = unwatched_reasons(model, [*params, outside], layers="all")
    gru = "unsupported layer GRUCell"
    by_name = {name: reasons[id(p)] for name, p in model.named_parameters() if not name.startswith(supported)}
    assert by_name == {
        "scale": RAW_TOP,
        "cell.weight_ih": gru,
        "cell.weight_hh": gru,
        "cell.bias_ih": gru,
        "cell.bias_hh": gru,
        "attn.in_proj_weight": RAW_ATTN,
        "attn.in_proj_bias": RAW_ATTN,
        "normed.bias": "unsupported layer ParametrizedLinear",
        "normed.parametrizations.weight.original0": PARAMETRIZED,
        "normed.parametrizations.weight.original1": PARAMETRIZED,
        "sparse.weight": "Embedding with an option per-example norms do not support (sparse=True)",
        "grouped.weight": "Conv1d with an option per-example norms do not support (groups > 1)",
        "grouped.bias": "Conv1d with an option per-example norms do not support (groups > 1)",
    }
    assert reasons[id(outside)] == NOT_IN_MODEL


def test_left_out_is_every_parameter_the_estimate_does_not_cover() -> None:
    model = Structure()
    outside = nn.Parameter(torch.zeros(2))
    tracker = GradientNoiseScaleTracker()
    tracker.attach([*model.parameters(), outside], mode="per_example", model=model)
    source = tracker._sources.per_example
    assert source is not None
    covered = {id(p) for p in source.covered_params()}
    names = {id(p): n for n, p in model.named_parameters()}
    expected = {names[id(p)] for p in model.parameters() if id(p) not in covered} | {
        "<optimized parameter 19, shape (2,)>"
    }
    left_out = tracker.left_out
    assert set(left_out) == expected and left_out["<optimized parameter 19, shape (2,)>"] == NOT_IN_MODEL
    assert all(left_out.values())
    total = sum(p.numel() for p in model.parameters()) + outside.numel()
    missing = sum(model.get_parameter(n).numel() for n in expected if not n.startswith("<")) + outside.numel()
    assert tracker.covered_fraction == pytest.approx(1 - missing / total, rel=1e-12)


def test_layers_norm_leaves_out_every_other_layer_by_name() -> None:
    model = Structure()
    tracker = GradientNoiseScaleTracker(layers="norm")
    tracker.attach(model.parameters(), mode="per_example", model=model)
    names = {n for n, _ in model.named_parameters()}
    left_out = tracker.left_out
    assert set(left_out) == names - {"norm.weight", "norm.bias"}
    assert {r for n, r in left_out.items() if ".parametrizations." not in n} == {
        "not an nn.LayerNorm or nn.RMSNorm (layers='norm'; other norm classes are measured with layers='all')"
    }


class OffsetLayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + 1


def test_layers_norm_leaves_out_a_norm_subclass_with_its_own_forward_by_name() -> None:
    # layers="all" replays such a subclass as written; layers="norm" has only LayerNorm's own equations.
    model = nn.Sequential(nn.Linear(3, 4), OffsetLayerNorm(4), nn.LayerNorm(4))
    tracker = GradientNoiseScaleTracker(layers="norm")
    tracker.attach(model.parameters(), mode="per_example", model=model)
    own = (
        "OffsetLayerNorm has a forward of its own (layers='norm' measures LayerNorm and RMSNorm as torch defines them)"
    )
    assert {n: r for n, r in tracker.left_out.items() if n.startswith("1.")} == {"1.weight": own, "1.bias": own}
    assert not any(n.startswith("2.") for n in tracker.left_out)


def test_everything_covered_and_other_modes_leave_nothing_out() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    for mode in ("per_example", "microbatch"):
        tracker = GradientNoiseScaleTracker()
        tracker.attach(model.parameters(), mode=mode, model=model)  # type: ignore[arg-type]
        assert tracker.left_out == {} and tracker.covered_fraction == 1.0
    tracker = GradientNoiseScaleTracker()
    tracker.attach(Structure().parameters(), mode="microbatch")
    assert tracker.left_out == {}


class LateBranch(SequenceRegression):
    """From step 2 on, a branch on tokens flattened by position to (T*B, d) joins: left out then, most of the model."""

    def __init__(self) -> None:
        super().__init__(lr=0.01)
        torch.manual_seed(7)
        self.scale = nn.Parameter(torch.ones(()))
        self.proj = nn.Linear(4, 4)
        self.late = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        if self.trainer.global_step >= 2:
            b, t, d = h.shape  # rows grouped by position: they cannot be split per example
            h = h + self.late(h.transpose(0, 1).reshape(t * b, d)).reshape(t, b, d).transpose(0, 1)
        return self.head(h).mean(dim=(1, 2)) * self.scale


def test_one_message_then_one_update_when_more_is_left_out(tmp_path: Path) -> None:
    model = LateBranch()
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer([gns], logger=CSVLogger(tmp_path), log_every_n_steps=1)
        trainer.fit(model, LateBranch.data(4 * 8))
    messages = [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)]
    said = [m for m in messages if "Left out" in m]
    assert len(said) == 2, messages
    assert "scale" in said[0] and "late.0.weight" not in said[0] and "updated" not in said[0]
    late = ["late.0.weight", "late.0.bias", "late.2.weight", "late.2.bias"]
    assert all(n in said[1] for n in [*late, "scale"]) and "updated: 4 more" in said[1]
    assert set(gns.left_out) == {"scale", *late}
    total = sum(p.numel() for p in model.parameters())
    kept = model.proj.weight.numel() + model.proj.bias.numel() + model.head.weight.numel() + model.head.bias.numel()
    assert gns.covered_fraction == pytest.approx(kept / total, rel=1e-12)
    # Each group's share of the elements, and the covered share, are in the message.
    for layer in ("late.0", "late.2"):  # each layer's reason names its input shape: a group of its own
        share = sum(model.get_parameter(f"{layer}.{p}").numel() for p in ("weight", "bias")) / total
        assert f"({100 * share:.1f}%): {layer}.weight, {layer}.bias" in said[1]
    assert f"covers {100 * kept / total:.1f}% of the {total:,} optimized" in said[1]
    # Below one half only after the branch joined, and said once although every later step logs.
    low = [m for m in messages if "NOT the model's noise scale" in m]
    assert len(low) == 1 and "accumulate_grad_batches=2" in low[0] and "DDP" in low[0]
    assert messages.index(low[0]) > messages.index(said[1])
    assert not any("rest of the model is measured" in m for m in messages)


def test_left_out_parts_add_no_host_sync_on_steps_that_do_not_log() -> None:
    model = TinyGPT(lr=0.1)
    gns = GradientNoiseScale(beta=0.9, mode="per_example")
    watcher = SyncWatcher()
    make_trainer([watcher, gns]).fit(model, TinyGPT.data(4 * 12))
    assert watcher.context is not None and int(gns.metric.measured_steps) == 12
    assert dict(watcher.calls) == {}
    assert list(gns.left_out) == ["wpe.weight"]


WORKER = Path(__file__).parent / "support" / "left_out_ddp_worker.py"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ranks_agree_on_what_is_left_out_under_ddp(tmp_path: Path) -> None:
    """Only rank 1 finds ``late`` unmeasurable; both ranks leave it out and name it (rank 0 from the all-reduce)."""
    run_worker(WORKER, "--out", str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert set(rank0["left_out"]) == set(rank1["left_out"]) == {"late.weight", "late.bias"}
    assert "leading dimension" in rank1["left_out"]["late.weight"]
    assert "another process found it unmeasurable" in rank0["left_out"]["late.weight"]
    # proj and head: 25 of the 45 elements.
    assert rank0["covered_fraction"] == rank1["covered_fraction"] == pytest.approx(25 / 45)
    assert rank0["b_simple"] == rank1["b_simple"]


class FunctionallyTied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.tanh(self.mid(self.embed(tokens))) @ self.embed.weight.T


def tracked_steps(model: nn.Module, check: bool, steps: int = 2) -> GradientNoiseScaleTracker:
    tracker = GradientNoiseScaleTracker()
    tracker.attach(model.parameters(), mode="per_example", model=model)
    tokens = torch.randint(0, 11, (4, 6))
    for _ in range(steps):
        tracker.start_micro_batch(units=4)
        loss = nn.functional.cross_entropy(model(tokens).transpose(1, 2), tokens)
        if check:
            tracker.before_backward(loss)
        model.zero_grad()
        loss.backward()
        tracker.end_micro_batch()
        tracker.measure_step()
    return tracker


def test_a_left_out_fused_layer_runs_plain_from_the_next_micro_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its per-example gradients would be thrown away: from the micro-batch after it is left out, no fused call."""
    fused_calls: list[int] = []
    step = [0]
    original = LinearWithPerExampleGrads.apply

    def counted(*args: Any) -> Any:
        fused_calls.append(step[0])
        return original(*args)

    monkeypatch.setattr(LinearWithPerExampleGrads, "apply", staticmethod(counted))
    torch.manual_seed(0)
    model = nn.ModuleDict({"embed": nn.Embedding(11, 8), "mid": nn.Linear(8, 8), "out": nn.Linear(8, 11)})
    tracker = GradientNoiseScaleTracker()
    tracker.attach(model.parameters(), mode="per_example", model=model)
    tokens = torch.randint(0, 11, (4, 6))
    for step[0] in range(3):
        tracker.start_micro_batch(units=4)
        mid = model["mid"]
        logits = model["out"](torch.tanh(mid(model["embed"](tokens))))
        penalty = mid.weight.square().sum() + mid.bias.square().sum()
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), tokens) + 1e-3 * penalty
        tracker.before_backward(loss)
        model.zero_grad()
        loss.backward()
        tracker.end_micro_batch()
        tracker.measure_step()
    assert set(tracker.left_out) == {"mid.weight", "mid.bias"}  # the penalty
    assert fused_calls == [0, 0, 1, 2]  # mid and out in the first micro-batch, then out alone
    assert int(tracker.metric.measured_steps) == 3


def test_a_parameter_used_outside_its_layers_is_found_in_the_first_graph_and_left_out() -> None:
    torch.manual_seed(0)
    tracker = tracked_steps(FunctionallyTied(), check=True)
    assert list(tracker.left_out) == ["embed.weight"]
    reason = tracker.left_out["embed.weight"]
    assert reason.startswith("used outside the layers that own it (PermuteBackward0 in the forward or the loss")
    assert "nn.Linear whose weight is the embedding's" in reason and "mode='microbatch'" in reason
    # Without the loss (before_backward is optional for the tracker) the graph is not read: nothing is found.
    assert tracked_steps(FunctionallyTied(), check=False).left_out == {}


@pytest.mark.slow
def test_a_compiled_model_is_not_judged_by_its_graph() -> None:
    # A compiled region calls layers no hook sees: its graph must not make every parameter look used outside.
    torch.manual_seed(0)
    model = TinyGPT()
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns], max_steps=2).fit(torch.compile(model, backend="aot_eager"), TinyGPT.data(8))
    assert set(gns.left_out) == {"wpe.weight"} and gns.skipped_steps == 0
    # ... and it says that the checks could not look inside (a probe centred h over the batch inside a compiled
    # block: everything measured, nothing said).
    said = [str(w.message) for w in caught if "torch.compile'd regions" in str(w.message)]
    assert len(said) == 1 and "cannot see inside them" in said[0] and "mode='microbatch'" in said[0], said


def test_a_graph_the_check_cannot_read_is_announced_and_training_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(self: object, loss: Tensor) -> dict[int, str]:
        raise RuntimeError("no graph")

    monkeypatch.setattr(UseCheck, "outside_uses", unreadable)
    said: list[str] = []
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = tracked_steps(FunctionallyTied(), check=True)
        said = [str(w.message) for w in caught if "could not read" in str(w.message)]
    assert len(said) == 1 and "RuntimeError: no graph" in said[0]
    assert tracker.left_out == {} and int(tracker.metric.skipped_steps) == 0 and int(tracker.metric.measured_steps) == 2


class LatePenalty(LightningModule):
    """Linear regression (learning rate 0) whose loss gains a penalty on the weight from step ``late`` on."""

    def __init__(self, late: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.late = late
        self.lin = nn.Linear(8, 1)
        self.batches: dict[int, tuple[Tensor, Tensor]] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.batches[self.global_step] = (x.detach().clone(), y.detach().clone())
        loss = F.mse_loss(self.lin(x).squeeze(-1), y)
        if self.global_step >= self.late:  # switched on after a warm-up: absent from the first loss graphs
            loss = loss + 0.5 * self.lin.weight.pow(2).sum()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    @staticmethod
    def data() -> DataLoader:
        generator = torch.Generator().manual_seed(5)
        x = torch.randn(320, 8, generator=generator, dtype=torch.float64)
        y = x @ torch.randn(8, generator=generator, dtype=torch.float64) + torch.randn(320, generator=generator)
        return DataLoader(TensorDataset(x, y), batch_size=32)


def bias_only_history(model: LatePenalty, steps: list[int], beta: float) -> list[dict[str, float]]:
    """The averages over ``steps`` of the bias's per-example estimates, recomputed in float64 numpy."""
    w = model.lin.weight.detach().double().numpy().ravel()
    b = float(model.lin.bias.detach())
    estimates = []
    for step in steps:
        x, y = (t.double().numpy() for t in model.batches[step])
        g = 2 * (x @ w + b - y)  # each example's own loss's gradient for the bias
        n = len(g)
        # E[sum_i g_i^2] = n |G|^2 + n tr(Sigma);  E[mean(g)^2] = |G|^2 + tr(Sigma) / n
        grad_sq_norm, trace_cov = np.linalg.solve(np.array([[n, n], [1.0, 1.0 / n]]), [g @ g, g.mean() ** 2])
        estimates.append((step, grad_sq_norm, trace_cov))
    return ema_history(estimates, beta)


def test_a_penalty_added_after_the_first_steps_is_found_and_the_averages_restart() -> None:
    """A use outside the layers that appears later (here a penalty switched on at step 4) is found on its first
    micro-batch, like one present from the start: the weight is left out, and the averages restart from that step
    on the bias alone, instead of mixing four steps of the whole model into them."""
    beta = 0.5
    model = LatePenalty(late=4)
    gns = GradientNoiseScale(beta=beta, mode="per_example")
    said = fit64([gns], model, LatePenalty.data(), max_steps=10, log_every_n_steps=1)
    assert list(gns.left_out) == ["lin.weight"] and "used outside the layers that own it" in gns.left_out["lin.weight"]
    assert gns.covered_fraction == pytest.approx(1 / 9, rel=1e-12)
    assert sum("the averages restarted then (1 time(s) so far)" in m for m in said) == 1, said
    want = bias_only_history(model, list(range(4, 10)), beta)[-1]
    for name in ("grad_sq_norm", "trace_cov", "b_simple"):
        assert getattr(gns, name) == pytest.approx(want[name], rel=1e-9), name
    # Control: without the penalty nothing is left out or restarted, and the whole model is measured.
    control = GradientNoiseScale(beta=beta, mode="per_example")
    said = fit64([control], LatePenalty(late=100), LatePenalty.data(), max_steps=10, log_every_n_steps=1)
    assert control.left_out == {} and not any("restarted" in m for m in said)


def test_a_parameter_left_out_first_after_a_resume_restarts_the_averages_as_without_the_resume(
    tmp_path: Path,
) -> None:
    """Which parameters the averages hold is saved with the checkpoint: the penalty appearing at the very first
    step after a resume restarts them as in the uninterrupted run (without it the resumed run kept four steps of
    the weight in the averages). The bias-only float64 recomputation of the steps since is the reference."""
    beta = 0.5
    first = GradientNoiseScale(beta=beta, mode="per_example")
    trainer = make_trainer([first], precision="64-true", max_steps=4)
    trainer.fit(LatePenalty(late=4), LatePenalty.data())
    trainer.save_checkpoint(tmp_path / "step4.ckpt")
    model = LatePenalty(late=4)
    resumed = GradientNoiseScale(beta=beta, mode="per_example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([resumed], precision="64-true", max_steps=10).fit(
            model, LatePenalty.data(), ckpt_path=tmp_path / "step4.ckpt"
        )
    said = [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)]
    assert sum("the averages restarted then (1 time(s) so far)" in m for m in said) == 1, said
    want = bias_only_history(model, list(range(4, 10)), beta)[-1]
    for name in ("grad_sq_norm", "trace_cov", "b_simple"):
        assert getattr(resumed, name) == pytest.approx(want[name], rel=1e-9), name


def test_restart_forgets_the_averages_where_the_flag_is_set_and_keeps_the_counts() -> None:
    metric = GradientNoiseScaleMetric(beta=0.5)
    metric.update(torch.tensor([4.0, 6.0]), torch.tensor([1.0, 1.0]), torch.tensor(3.0))
    before = {name: getattr(metric, name).clone() for name in ("grad_sq_norm_ema", "trace_cov_ema", "ema_weight")}
    metric.restart(torch.tensor(False))
    assert all(torch.equal(getattr(metric, name), value) for name, value in before.items())
    metric.restart(torch.tensor(True))
    assert float(metric.ema_weight) == 0.0 and not metric.estimate_moments.any() and int(metric.measured_steps) == 1
    metric.update(torch.tensor([5.0, 7.0]), torch.tensor([1.0, 1.0]), torch.tensor(4.0))
    fresh = GradientNoiseScaleMetric(beta=0.5)
    fresh.update(torch.tensor([5.0, 7.0]), torch.tensor([1.0, 1.0]), torch.tensor(4.0))
    assert float(metric.b_simple) == float(fresh.b_simple)


def test_the_graph_signature_sees_a_new_use_of_a_parameter_and_ignores_the_batch_size() -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    index = {id(p): i for i, p in enumerate([*first.parameters(), *second.parameters()])}

    def signature(batch: int, penalty: nn.Linear | None = None) -> int:
        loss = second(first(torch.randn(batch, 3))).sum()
        if penalty is not None:
            loss = loss + penalty.weight.pow(2).sum()
        return graph_signature(loss.grad_fn, index)

    assert signature(4) == signature(7)
    assert len({signature(4), signature(4, first), signature(4, second)}) == 3


class CentredByADetachedMean(nn.Module):
    """A user layer whose output for one example depends on the batch without a gradient."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(width, width) * 0.2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh((x - x.detach().mean(0)) @ self.w)


class MaskedMixing(nn.Module):
    """A user layer taking a (T, T) causal mask built by its parent."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(width, width) * 0.2)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        scores = (x @ self.w @ x.transpose(-1, -2)).masked_fill(mask, float("-inf"))
        return scores.softmax(-1) @ x


class UserLayerModel(LightningModule):
    def __init__(self, layer: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.layer = layer
        users = {"centred": CentredByADetachedMean, "mask": MaskedMixing, "in place": Scale, "out of place": Scale}
        self.user = users[layer](16)
        self.out = nn.Linear(16, 3)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        h = torch.tanh(self.inp(x))
        if self.layer == "centred":
            h = self.user(h)
        elif self.layer == "in place":  # transformers' Falcon adds the attention to the MLP's output so
            out = self.user(h)
            out += h
            h = out
        elif self.layer == "out of place":
            h = self.user(h) + h
        else:
            length = x.shape[1]
            h = self.user(h, torch.ones(length, length, dtype=torch.bool).triu(1))
        return F.cross_entropy(self.out(h.mean(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_on_sequences(model: LightningModule, length: int) -> GradientNoiseScale:
    """Three per_example steps on sequences of ``length`` vectors of width 8, batches of 6, three classes."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(24, length, 8, generator=generator)
    y = torch.randint(0, 3, (24,), generator=generator)
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=3).fit(model, DataLoader(TensorDataset(x, y), batch_size=6))
    return gns


def user_layer_fit(layer: str, length: int) -> GradientNoiseScale:
    return fit_on_sequences(UserLayerModel(layer), length)


def test_a_layer_whose_replay_is_not_its_forward_is_left_out() -> None:
    """x.detach().mean(0) inside a replayed layer: one example at a time it is another function (a probe measured
    it with every step wrong and nothing said). The first replays are compared with the forward's outputs."""
    gns = user_layer_fit("centred", 5)
    assert list(gns.left_out) == ["user.w"] and "does not reproduce its forward" in gns.left_out["user.w"]
    assert gns.skipped_steps == 0


def test_a_replayed_layer_whose_output_the_model_changes_in_place_is_measured() -> None:
    """y = layer(x); y += x: the replay is compared with the call's output as the call gave it (it was compared with
    the changed output, and the layer left out as if it depended on the other examples; found in Falcon)."""
    in_place, out_of_place = user_layer_fit("in place", 5), user_layer_fit("out of place", 5)
    assert in_place.left_out == {} and in_place.skipped_steps == 0 and int(in_place.metric.measured_steps) == 3
    same = [float(m.trace_cov) for m in (in_place.metric, out_of_place.metric)]
    assert same[0] == same[1] > 0 and float(in_place.metric.grad_sq_norm) == float(out_of_place.metric.grad_sq_norm)


class BatchScaledWithALargeChannel(nn.Module):
    """A user layer scaled by a statistic of the whole batch without a gradient (an fp8-style amax scale), with
    one output channel of 3e4 (a large bias, a massive activation)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(width, width) * 0.2)
        self.register_buffer("bias", torch.zeros(width))
        self.bias[0] = 3e4

    def forward(self, x: Tensor) -> Tensor:
        return x * x.detach().square().mean().rsqrt() @ self.w + self.bias


class CancellingLinear(nn.Linear):
    """Its own forward (the generic replay) on inputs of ~1e3 that the weights' zero-sum rows cancel: O(1)
    outputs whose float32 rounding is ~2e-4 of their size in the batch and in the replay."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x + 1e3, self.weight - self.weight.mean(1, keepdim=True), self.bias)


class ReplayCheckModel(LightningModule):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.user = layer
        self.out = nn.Linear(16, 3)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        h = self.user(torch.tanh(self.inp(x)))
        return F.cross_entropy(self.out(torch.tanh(h * 1e-4)).mean(1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def replay_check_fit(layer: nn.Module) -> GradientNoiseScale:
    return fit_on_sequences(ReplayCheckModel(layer), 5)


class ReluLinear(nn.Linear):
    """A fused Linear and ReLU, as user code writes it (its own forward: the generic replay)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(F.linear(x, self.weight, self.bias))


class TokensThroughReluLinear(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 256)
        self.user = ReluLinear(256, 1024)
        self.head = nn.Linear(1024, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, y = batch
        return F.mse_loss(self.head(self.user(F.relu(self.emb(ids)))).mean(dim=(1, 2)).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_a_correct_replay_in_bf16_is_not_taken_for_a_batch_statistic(precision: str) -> None:
    """bf16 rounds the product before the bias is added: near-zero outputs (ReLU) differ between the batched and the
    replayed kernels by about one ulp of the terms, which a per-position tolerance without a half-precision floor
    took for a dependence on the other examples (a review of that change: the layer was left out)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (24, 64), generator=generator)
    ids[:, 0] = 0  # a BOS token: position 0 is the same row in every example
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=3, precision=precision).fit(
            TokensThroughReluLinear(),
            DataLoader(TensorDataset(ids, torch.randn(24, generator=generator)), batch_size=8),
        )
    assert gns.left_out == {} and int(gns.metric.measured_steps) == 3


def test_one_large_output_channel_does_not_hide_a_replay_that_is_not_the_forward() -> None:
    """The replay check held every output to 1e-4 of the largest output anywhere: one channel of 3e4 let an O(1)
    mismatch through in the others, and a layer scaled by a batch statistic was counted with B_simple ~3x off
    (a probe: 6.4 against 18.1, nothing said). Each position is now held to its own scale over the examples."""
    gns = replay_check_fit(BatchScaledWithALargeChannel(16))
    assert list(gns.left_out) == ["user.w"] and "does not reproduce its forward" in gns.left_out["user.w"]


def test_rounding_of_a_cancelling_layer_is_not_taken_for_a_batch_statistic() -> None:
    """Inputs of ~1e3 behind O(1) outputs: batched and replayed float32 kernels round differently by ~2e-4 of the
    output's size, which the per-position check allows; the layer is measured."""
    gns = replay_check_fit(CancellingLinear(16, 16))
    assert gns.left_out == {} and gns.skipped_steps == 0 and int(gns.metric.measured_steps) == 3


@pytest.mark.parametrize("length", [5, 6])
def test_a_square_mask_beside_the_batch_is_ambiguous_where_the_sequence_is_as_long_as_the_batch(length: int) -> None:
    """A (T, T) causal mask beside (B, T, d) at T == B could be one padding row per example: the layer is left out
    (a probe's replay split the mask by rows, every step wrong, nothing said); at T != B it is measured."""
    gns = user_layer_fit("mask", length)
    if length == 6:
        assert (
            set(gns.left_out) == {"user.w"}
            and "input of shape (6, 6) beside one of shape (6, 6, 16)" in (gns.left_out["user.w"])
        )
    else:
        assert gns.left_out == {} and gns.covered_fraction == 1.0


class AdversarialTraining(LightningModule):
    """FGSM inside training_step: an input-gradient pass, then the loss on the perturbed input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        attacked = x.clone().requires_grad_(True)
        (direction,) = torch.autograd.grad(F.cross_entropy(self.net(attacked), y), attacked)
        return F.cross_entropy(self.net((x + 0.3 * direction.sign()).detach()), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_forward_after_an_input_gradient_pass_is_named_as_such() -> None:
    """Adversarial training's second forward comes after a backward pass finished the parameters' gradients: left
    out with that reason and the fix (the message used to blame a reentrant checkpoint the model does not have)."""
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 8, generator=generator), torch.randint(0, 3, (24,), generator=generator))
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=2).fit(AdversarialTraining(), DataLoader(data, batch_size=8))
    assert len(gns.left_out) == 4
    for reason in gns.left_out.values():
        assert "after a backward pass of the same micro-batch" in reason and "FGSM" in reason
        assert "reentrant" not in reason and "mode='microbatch'" in reason


class KeywordCalls(LightningModule):
    """Linear, LayerNorm and Linear on (B, T, d), each called with its input by keyword or by position."""

    def __init__(self, keyword: bool, pruned: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.norm, self.head = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3)
        self.keyword = keyword
        if pruned:
            torch.nn.utils.prune.l1_unstructured(self.up, "weight", amount=0.5)  # weight = weight_orig * mask

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.keyword:
            h = self.norm(input=torch.tanh(self.up(input=x)))
            return F.cross_entropy(self.head(input=h).mean(1), y)
        return F.cross_entropy(self.head(self.norm(torch.tanh(self.up(x)))).mean(1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def keyword_fit(model: LightningModule) -> GradientNoiseScale:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(24, 5, 8, generator=generator), torch.randint(0, 3, (24,), generator=generator))
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=3).fit(model, DataLoader(data, batch_size=6))
    return gns


def test_layers_called_with_their_input_by_keyword_are_measured_as_by_position() -> None:
    """lin(input=x) crashed training on (B, T, d) inputs (the hook read args[0]) and left 2-D ones out with an
    untrue reason (found by a helper)."""
    by_keyword, by_position = keyword_fit(KeywordCalls(True)), keyword_fit(KeywordCalls(False))
    assert by_keyword.left_out == {} and by_keyword.covered_fraction == 1.0
    for name in ("grad_sq_norm", "trace_cov"):
        assert getattr(by_keyword, name) == pytest.approx(getattr(by_position, name), rel=1e-6), name


def test_a_pruned_layer_is_left_out_naming_its_pre_hook() -> None:
    """torch.nn.utils.prune (and Lightning's ModelPruning) computes with weight_orig * mask in a forward pre-hook:
    the per-example gradients formed from the layer's input were those of the masked weight, not of weight_orig,
    every step wrong without a word (found by a helper). Left out, named; the rest is measured."""
    gns = keyword_fit(KeywordCalls(False, pruned=True))
    assert set(gns.left_out) == {"up.bias", "up.weight_orig"}
    assert all("forward pre-hook (L1Unstructured" in reason for reason in gns.left_out.values())
    assert 0 < gns.covered_fraction < 1 and gns.skipped_steps == 0


class MaskedRows(LightningModule):
    """Regression whose first layer trains only its first rows, by a gradient hook registered at ``hook_from``."""

    def __init__(self, hook_from: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.hook_from = hook_from
        if hook_from == 0:
            self.net[0].weight.register_hook(self.mask)

    @staticmethod
    def mask(grad: Tensor) -> Tensor:
        return grad * (torch.arange(16) < 6).to(grad.dtype).unsqueeze(1)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.hook_from and batch_idx > 0:  # after the callback's own hooks
            self.net[0].weight.register_hook(self.mask)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.mse_loss(self.net(batch[0]).squeeze(-1), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class StepEstimates(Callback):
    """Each measured step's own |G|^2 estimate, recovered from the averages."""

    def __init__(self, gns: GradientNoiseScale) -> None:
        self.gns, self.previous, self.steps = gns, 0.0, []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps.append(None)  # filled after the callback folded this step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.steps and self.steps[-1] is None:
            beta, average = self.gns.beta, float(self.gns.metric.grad_sq_norm_ema)
            self.steps[-1] = (average - beta * self.previous) / (1 - beta)
            self.previous = average


def test_a_gradient_hook_registered_after_the_callbacks_is_read_after_in_microbatch_mode() -> None:
    """Tensor hooks run in registration order: the callback's hook read the gradient before a mask the user added
    later, while .grad had it (a probe: B_simple 180.7 against 19.5). Now its hook moves behind: from the step the
    mask arrives, every step equals that of a run masked from the start."""
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(1))
    data = DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)
    runs = {}
    for hook_from in (0, 4):
        gns = GradientNoiseScale(beta=0.5, mode="microbatch")
        estimates = StepEstimates(gns)
        make_trainer([gns, estimates], accumulate_grad_batches=2, max_epochs=1).fit(MaskedRows(hook_from), data)
        runs[hook_from] = estimates.steps
    assert len(runs[0]) == 6
    assert runs[4][2:] == pytest.approx(runs[0][2:], rel=1e-9)  # the mask arrives with micro-batch 4: step 2


def test_a_gradient_hook_on_a_parameter_leaves_it_out_in_per_example_mode() -> None:
    x = torch.randn(48, 8, generator=torch.Generator().manual_seed(1))
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=3).fit(MaskedRows(0), DataLoader(TensorDataset(x, x.sum(1)), batch_size=8))
    assert list(gns.left_out) == ["net.0.weight"] and "a gradient hook on the parameter" in gns.left_out["net.0.weight"]


class BatchAttentionPooling(LightningModule):
    """Each example weighted by a softmax over the batch of a per-example score (multiple-instance attention), or
    by a per-example sigmoid (the control: nothing pairs the examples)."""

    def __init__(self, over_batch: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head, self.over_batch = nn.Linear(8, 16), nn.Linear(16, 1), over_batch

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        h = torch.tanh(self.lin(x))
        scores = h.sum(1)  # (B,)
        weights = torch.softmax(scores, 0) * len(x) if self.over_batch else torch.sigmoid(scores)
        return F.mse_loss(self.head(h * weights[:, None]).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("over_batch", [True, False])
def test_a_softmax_over_the_batch_of_one_number_per_example_pairs_the_examples(over_batch: bool) -> None:
    """softmax(scores, 0) of a (B,) tensor was not taken for a statistic of the batch (only 2-D ones were): every
    layer below it measured, silently (found by a helper)."""
    x = torch.randn(48, 8, generator=torch.Generator().manual_seed(1))
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=2).fit(
            BatchAttentionPooling(over_batch), DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)
        )
    if over_batch:
        assert set(gns.left_out) == {"lin.weight", "lin.bias", "head.weight", "head.bias"}
        assert all("pairs the examples" in reason for reason in gns.left_out.values())
    else:
        assert gns.left_out == {}


class LayerOnPositionsLater(LightningModule):
    """Layer ``extra`` runs on the examples in epoch 0 and on a broadcast (1, d) buffer from epoch 1 (left out)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.extra, self.head = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 1)
        self.register_buffer("position", torch.randn(1, 16))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        h = torch.tanh(self.body(batch[0]))
        extra = self.extra(h if self.current_epoch == 0 else self.position).mean(-1, keepdim=True)
        return F.mse_loss((self.head(h) + extra).squeeze(-1), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_layer_left_out_mid_run_reads_nan_in_its_per_layer_scalar() -> None:
    """Its per-layer average stopped where it was left out and kept being logged as if current (found by a
    helper); it now reads NaN, the layers still measured go on."""
    x = torch.randn(80, 8, generator=torch.Generator().manual_seed(1))
    gns = GradientNoiseScale(beta=0.8, mode="per_example", per_layer=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_epochs=2).fit(
            LayerOnPositionsLater(), DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)
        )
    assert set(gns.left_out) == {"extra.weight", "extra.bias"}
    layers = gns.layer_b_simple
    assert np.isnan(layers["extra"]) and np.isfinite(layers["body"]) and np.isfinite(layers["head"])


def test_a_post_accumulate_gradient_hook_on_a_parameter_leaves_it_out_in_per_example_mode() -> None:
    """A hook that edits .grad after accumulation (a probe zeroed it: |G|^2 read -0.10 against 0.07) changes the
    big batch but not the per-example gradients: the parameter is left out, named."""
    x = torch.randn(48, 8, generator=torch.Generator().manual_seed(1))
    model = MaskedRows(hook_from=-1)

    def halve(parameter: Tensor) -> None:
        assert parameter.grad is not None
        parameter.grad.mul_(0.5)

    model.net[0].weight.register_post_accumulate_grad_hook(halve)
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=3).fit(model, DataLoader(TensorDataset(x, x.sum(1)), batch_size=8))
    assert (
        list(gns.left_out) == ["net.0.weight"] and "register_post_accumulate_grad_hook" in gns.left_out["net.0.weight"]
    )


def test_a_post_accumulate_gradient_hook_skips_the_steps_in_microbatch_mode() -> None:
    """microbatch reads each micro-batch's gradient before accumulation; a post-accumulate hook that edits .grad
    changed only the big batch (a probe: |G|^2 -0.26 against -0.08, silently). Such steps are skipped, with why."""
    x = torch.randn(48, 8, generator=torch.Generator().manual_seed(1))
    model = MaskedRows(hook_from=-1)

    def zero(parameter: Tensor) -> None:
        assert parameter.grad is not None
        parameter.grad.zero_()

    model.net[0].weight.register_post_accumulate_grad_hook(zero)
    gns = GradientNoiseScale(mode="microbatch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns], max_steps=3, accumulate_grad_batches=2).fit(
            model, DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)
        )
    assert gns.skipped_steps == 3 and int(gns.metric.measured_steps) == 0
    assert any("post-accumulate gradient hook" in str(w.message) for w in caught)


class LayerDropScale(nn.Module):
    """A user layer (replayed per example) that skips its scale at random with Python's generator, as LayerDrop."""

    def __init__(self, draws: str) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((4,), 1.5))
        self.draws = draws

    def forward(self, x: Tensor) -> Tensor:
        draw = random.random() if self.draws == "python" else float(np.random.rand())
        return x * self.gamma if draw < 0.7 else x


@pytest.mark.parametrize("draws", ["python", "numpy"])
def test_a_layer_that_draws_from_pythons_random_is_left_out_and_the_draws_kept(draws: str) -> None:
    """vmap's randomness check sees torch's draws only: the replay drew anew, and where its first draws happened
    to match the forward's the layer stayed measured (per-step errors up to 1e-2 in a probe), and the training's
    own stream of draws moved. Left out now, and the generators are put back."""
    model = nn.Sequential(nn.Linear(3, 4), LayerDropScale(draws), nn.Linear(4, 1))
    x = torch.randn(8, 3)

    def run(with_tracker: bool) -> tuple[float, dict[str, str]]:
        random.seed(0)
        np.random.seed(0)
        tracker = GradientNoiseScaleTracker()
        if with_tracker:
            tracker.attach(model.parameters(), mode="per_example", model=model)
        for _ in range(3):
            tracker.start_micro_batch(units=8)
            model.zero_grad()
            model(x).square().mean().backward()
            tracker.end_micro_batch()
            tracker.measure_step()
        left_out = tracker.left_out if with_tracker else {}
        tracker.detach()
        return (random.random() if draws == "python" else float(np.random.rand())), left_out

    plain, _ = run(False)
    measured, left_out = run(True)
    assert measured == plain  # the training's next draw is the one it would be without the tracker
    assert set(left_out) == {"1.gamma"} and "random generator" in left_out["1.gamma"]


class UserRMSNorm(nn.Module):
    """A norm class of one's own: replayed per example."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_a_non_finite_first_call_does_not_leave_a_replayed_layer_out() -> None:
    """An inf in one example of the first batch made the replay comparison NaN != NaN: the layer was left out for
    the whole run with a false reason. That step is skipped as non-finite; the layer stays measured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), UserRMSNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    tracker = GradientNoiseScaleTracker(beta=0.5)
    tracker.attach(model.parameters(), mode="per_example", model=model)
    for step in range(4):
        x = torch.randn(4, 6, dtype=torch.float64)
        if step == 0:
            x[1, 0] = float("inf")
        tracker.start_micro_batch(units=4)
        model.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
        tracker.end_micro_batch()
        tracker.measure_step()
    assert tracker.left_out == {} and tracker.covered_fraction == 1.0
    assert int(tracker.metric.skipped_steps) == 1 and int(tracker.metric.measured_steps) == 3


class TiedBiasHead(nn.Module):
    """transformers' MLM head: the decoder's bias registered on the head too (head.bias is head.decoder.bias)."""

    def __init__(self, also_added_here: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(6, 6)
        self.decoder = nn.Linear(6, 5)
        self.bias = self.decoder.bias
        self.also_added_here = also_added_here

    def forward(self, x: Tensor) -> Tensor:
        out = self.decoder(torch.tanh(self.dense(x)))
        return out + self.bias if self.also_added_here else out


@pytest.mark.parametrize("also_added_here", [False, True], ids=["decoder-only", "head-adds-it-too"])
def test_a_bias_registered_on_a_head_and_its_decoder_is_the_decoders(also_added_here: bool) -> None:
    """It was left out as a raw parameter of the head (XLM-R, ALBERT, DeBERTa MLM heads: 0.3-0.6% of the model),
    though the head's forward never reads it. Where the head adds it too, the graph finds the use outside the
    decoder and leaves it out."""
    torch.manual_seed(0)
    model = nn.Sequential(TiedBiasHead(also_added_here)).double()
    x = torch.randn(6, 6, dtype=torch.float64)
    tracker = GradientNoiseScaleTracker()
    tracker.attach(model.parameters(), mode="per_example", model=model)
    tracker.start_micro_batch(units=6)
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3, 4, 0]))
    tracker.before_backward(loss)
    loss.backward()
    tracker.end_micro_batch()
    tracker.measure_step()
    if also_added_here:
        assert set(tracker.left_out) == {"0.bias"} and "outside" in tracker.left_out["0.bias"]  # its first name
    else:
        assert tracker.left_out == {} and int(tracker.metric.measured_steps) == 1
