"""Per-example gradient norms (mode="per_example"): exact against torch.func, closed form, float64 recomputation."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_gns import GradientNoiseScale
from lightning_gns.sources import PerExampleSource
from support.models import LinearProblem, LinearRegression, loader
from support.per_example_norms import pop_norms, pop_norms_by_layer
from support.recording import Recorder, assert_matches_reference
from support.trainers import make_trainer


class TiedSequenceModel(nn.Module):
    """Embedding tied to the output layer, Conv1d over the sequence, LayerNorm, a Linear called twice, RMSNorm."""

    def __init__(self, vocab: int = 13, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding="same")
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Linear(width, width)
        self.rms = nn.RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.norm(h)
        h = torch.tanh(self.mlp(h))
        h = torch.tanh(self.mlp(h))  # the same Linear again: its per-example gradient is the sum of both uses
        return self.head(self.rms(h))


class ImageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
        self.conv_valid = nn.Conv2d(3, 4, kernel_size=2, dilation=2)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv_valid(torch.relu(self.conv(x)))).flatten(1))


def sequence_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Per-example loss: mean next-token cross entropy over the sequence."""
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(dim=1)


def image_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def vmap_per_example_sq_norms(model: nn.Module, loss_fn: Any, batch: Any) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(params: dict[str, Tensor], example: Any) -> Tensor:
        unsqueezed = tuple(t.unsqueeze(0) for t in example) if isinstance(example, tuple) else example.unsqueeze(0)
        return loss_fn(lambda *a: functional_call(model, params, a), unsqueezed).squeeze(0)

    grads = vmap(grad(one), in_dims=(None, 0))(params, batch)
    return {n: g.flatten(1).square().sum(dim=1) for n, g in grads.items()}


def source_per_example_sq_norms(model: nn.Module, loss_fn: Any, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
    source = PerExampleSource()
    source.attach(model, model.parameters())
    source.recording = True
    losses = loss_fn(model, batch)
    losses.mean().backward()
    norms, layers = pop_norms_by_layer(source)
    assert norms is not None
    batch_size = losses.shape[0]
    # The source reports the example's share (1/B) of the mean loss: scale back to the per-example loss.
    layer = {name: sq * batch_size**2 for name, sq in layers.items()}
    return (norms * batch_size).square(), layer


def test_per_example_norms_match_torch_func_on_tied_sequence_model() -> None:
    torch.manual_seed(0)
    model = TiedSequenceModel().double()
    tokens = torch.randint(0, 13, (5, 9))
    tokens[0, 3] = tokens[1, 0] = 0  # padding positions give the padding row no gradient
    expected = vmap_per_example_sq_norms(model, sequence_loss, tokens)
    total, layer = source_per_example_sq_norms(model, sequence_loss, tokens)
    torch.testing.assert_close(total, sum(expected.values()), rtol=1e-10, atol=0)
    # Tied weights are reported under their first owner (the embedding).
    torch.testing.assert_close(layer["embed"], expected["embed.weight"], rtol=1e-10, atol=0)
    torch.testing.assert_close(layer["mlp"], expected["mlp.weight"] + expected["mlp.bias"], rtol=1e-10, atol=0)
    torch.testing.assert_close(layer["rms"], expected["rms.weight"], rtol=1e-10, atol=0)
    torch.testing.assert_close(layer["norm"], expected["norm.weight"] + expected["norm.bias"], rtol=1e-10, atol=0)


def test_per_example_norms_match_torch_func_on_conv2d_model() -> None:
    torch.manual_seed(1)
    model = ImageModel().double()
    batch = (torch.randn(6, 2, 9, 9, dtype=torch.float64), torch.randint(0, 5, (6,)))
    expected = vmap_per_example_sq_norms(model, image_loss, batch)
    total, layer = source_per_example_sq_norms(model, image_loss, batch)
    torch.testing.assert_close(total, sum(expected.values()), rtol=1e-10, atol=0)
    torch.testing.assert_close(layer["conv"], expected["conv.weight"] + expected["conv.bias"], rtol=1e-10, atol=0)


@pytest.mark.parametrize("width", [3, 40])
def test_gram_and_materialized_forms_agree(width: int) -> None:
    """Sequence Linear layers take the Gram form when T (d_in + d_out) < d_in d_out, else materialise."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2)).double()
    x = torch.randn(4, 7, width, dtype=torch.float64)

    def loss_fn(m: Any, xb: Tensor) -> Tensor:
        return m(xb).square().mean(dim=(1, 2))

    expected = vmap_per_example_sq_norms(model, loss_fn, x)
    total, _ = source_per_example_sq_norms(model, loss_fn, x)
    torch.testing.assert_close(total, sum(expected.values()), rtol=1e-10, atol=0)


def test_norm_only_layers_cover_just_the_norm_parameters() -> None:
    model = TiedSequenceModel()
    source = PerExampleSource(layers="norm")
    source.attach(model, model.parameters())
    source.recording = True
    sequence_loss(model, torch.randint(0, 13, (3, 5))).mean().backward()
    pop_norms(source)
    covered = {id(p) for p in source.covered_params()}
    assert covered == {id(model.norm.weight), id(model.norm.bias), id(model.rms.weight)}


def test_closed_form_linear_regression_per_example() -> None:
    problem = LinearProblem(dim=8, noise_std=1.0, offset_norm=1.0, seed=30)
    x, y = problem.sample(32 * 600, seed=31)
    gns = GradientNoiseScale(beta=0.995)
    make_trainer([gns]).fit(LinearRegression(problem, lr=0.0), loader(x, y, 32))
    assert gns.mode == "per_example" and gns.source == "per_example"
    assert gns.covered_fraction == 1.0
    assert gns.b_simple == pytest.approx(problem.b_simple, rel=0.1)
    assert gns.trace_cov == pytest.approx(problem.trace_cov, rel=0.1)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_per_example_matches_float64_recomputation(accumulate: int) -> None:
    problem = LinearProblem(dim=5, noise_std=0.5, seed=32)
    x, y = problem.sample(8 * 3 * 6 + 5, seed=33)
    gns = GradientNoiseScale(beta=0.9, mode="per_example")
    recorder = Recorder(gns)
    make_trainer([gns, recorder], accumulate_grad_batches=accumulate, max_epochs=2).fit(
        LinearRegression(problem, lr=0.3), loader(x, y, 8)
    )
    assert gns.skipped_steps == 0
    assert_matches_reference(recorder, world_size=1, beta=0.9, per_example=True)


class TwoLayerRegression(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 1))
        self.unused_scale = nn.Parameter(torch.ones(()))  # used outside any supported layer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return (self.body(x).squeeze(-1) * self.unused_scale - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_per_layer_logging_leaves_b_simple_unchanged_and_reports_coverage() -> None:
    problem = LinearProblem(dim=4, seed=34)
    x, y = problem.sample(16 * 40, seed=35)
    results = {}
    for per_layer in (False, True):
        gns = GradientNoiseScale(beta=0.9, per_layer=per_layer)
        trainer = make_trainer([gns], log_every_n_steps=1, logger=True, default_root_dir="/tmp/lgns-per-layer")
        trainer.fit(TwoLayerRegression(), loader(x, y, 16))
        results[per_layer] = (gns, trainer)
    plain, layered = results[False][0], results[True][0]
    assert layered.b_simple == plain.b_simple
    assert set(layered.layer_b_simple) == {"body.0", "body.2", "body.3"}
    assert all(math.isfinite(v) and v > 0 for v in layered.layer_b_simple.values())
    total = sum(p.numel() for p in TwoLayerRegression().parameters())
    assert layered.covered_fraction == pytest.approx((total - 1) / total)
    logged = results[True][1].logged_metrics
    assert "gns/layer/body.0/b_simple" in logged and "gns/covered_fraction" in logged
