"""Losses (and models) that compare the examples of a batch: found in the first measured graph, layers left out.

CLIP's symmetric InfoNCE over a (B, B) similarity, the same through einsum, a triplet-style loss on
``torch.cdist`` distances, Barlow Twins' (d, d) correlation over the batch and a similarity through ``F.linear``
make each example's gradient depend on the others, as do ``F.cosine_similarity`` and differences of views broadcast
against the batch (``a.unsqueeze(1)``, ``b.unsqueeze(0)``): per-example norms would be silently wrong. Negatives from a
detached queue (MoCo) and a loss on each example's own pair are one term per example and stay measured. A
statistic over the batch broadcast back over it inside the model (centring on the batch mean) couples the layers
before it (their gradients) and after it (their inputs). So does a recurrence over the examples' slices.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseScale, GradientNoiseScaleTracker
from lightning_gns.sources.per_example import EVERYTHING_LEFT_OUT
from support.multiprocess import run_worker
from support.per_example_check import fit_and_check
from support.trainers import fit64, make_trainer
from support.zoo import SequenceRegression

TOWERS = [
    "image.0.weight", "image.0.bias", "image.2.weight", "image.2.bias",
    "text.0.weight", "text.1.weight", "text.1.bias", "text.2.weight", "text.2.bias",
]  # fmt: skip
RAW_SCALE = "logit_scale"  # a raw parameter of the top module: left out as such in every case


class TwoTowers(nn.Module):
    """An image-like tower and a token tower whose embeddings the loss compares as ``pairing`` says."""

    def __init__(self, pairing: str, reentrant_text: bool = False) -> None:
        super().__init__()
        self.pairing = pairing
        self.reentrant_text = reentrant_text
        self.image = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5))
        self.text = nn.Sequential(nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 5))
        self.logit_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        a = F.normalize(self.image(x), dim=-1)
        if self.reentrant_text:
            embedded = self.text[0](tokens)
            rest = checkpoint(lambda h: self.text[2](self.text[1](h)), embedded, use_reentrant=True)
            b = F.normalize(rest.mean(1), dim=-1)
        else:
            b = F.normalize(self.text(tokens).mean(1), dim=-1)
        labels = torch.arange(len(a))
        if self.pairing == "queue":  # MoCo: the negatives are a detached queue, the positive the example's own pair
            queue = torch.randn(7, a.shape[1])
            logits = torch.cat([(a * b).sum(1, keepdim=True), a @ queue.T], dim=1) * self.logit_scale.exp()
            return F.cross_entropy(logits, torch.zeros_like(labels))
        if self.pairing == "own pair":
            return (1 - (a * b).sum(dim=1)).mean()
        if self.pairing == "barlow":  # the (d, d) correlation of the two embeddings over the batch
            correlation = a.T @ b / len(a)
            return (correlation - torch.eye(len(correlation))).square().sum()
        if self.pairing == "matmul":
            logits = a @ b.T * self.logit_scale.exp()
        elif self.pairing == "einsum":
            logits = torch.einsum("id,jd->ij", a, b) * self.logit_scale.exp()
        elif self.pairing == "cdist":
            logits = -torch.cdist(a, b) * self.logit_scale.exp()
        elif self.pairing == "cosine":  # SimCLR-style, by broadcasting
            logits = F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1) * self.logit_scale.exp()
        elif self.pairing == "differences":
            logits = -(a[:, None] - b[None]).square().sum(-1) * self.logit_scale.exp()
        else:
            assert self.pairing == "linear"
            logits = F.linear(a, b) * self.logit_scale.exp()
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def measured(
    model: nn.Module, loss_of: Callable[[], Tensor], steps: int = 1, examples: int = 4
) -> GradientNoiseScaleTracker:
    """``steps`` measured steps of ``examples`` examples, each on the loss ``loss_of()`` computes."""
    tracker = GradientNoiseScaleTracker()
    tracker.attach(model.parameters(), mode="per_example", model=model)
    for _ in range(steps):
        tracker.start_micro_batch(units=examples)
        loss = loss_of()
        tracker.before_backward(loss)
        model.zero_grad()
        loss.backward()
        tracker.end_micro_batch()
        tracker.measure_step()
    return tracker


def tracked(model: TwoTowers, steps: int = 3, examples: int = 4) -> GradientNoiseScaleTracker:
    return measured(
        model, lambda: model(torch.randn(examples, 6), torch.randint(0, 11, (examples, 3))), steps, examples
    )


@pytest.mark.parametrize(
    ("pairing", "node"),
    [
        ("matmul", "MmBackward0"),
        ("einsum", "BmmBackward0"),
        ("cdist", "CdistBackward0"),
        ("barlow", "MmBackward0"),
        ("linear", "MmBackward0"),
        ("cosine", "ExpandBackward0"),
        ("differences", "SubBackward0"),
    ],
)
def test_a_loss_that_pairs_examples_leaves_out_every_layer_below_it(pairing: str, node: str) -> None:
    torch.manual_seed(0)
    tracker = tracked(TwoTowers(pairing))
    assert set(tracker.left_out) == {*TOWERS, RAW_SCALE}
    for name in TOWERS:
        reason = tracker.left_out[name]
        assert reason.startswith("its gradient or its input depends on several examples through an operation that")
        assert f"pairs the examples of the batch ({node}: an in-batch" in reason
        assert "mode='microbatch'" in reason and "mode='ddp'" in reason
    # Left out from the first measured micro-batch on: no step enters the averages.
    assert int(tracker.metric.measured_steps) == 0 and int(tracker.metric.skipped_steps) == 3


@pytest.mark.parametrize("pairing", ["queue", "own pair"])
def test_one_term_per_example_is_no_coupling(pairing: str) -> None:
    torch.manual_seed(0)
    tracker = tracked(TwoTowers(pairing))
    assert list(tracker.left_out) == [RAW_SCALE]
    assert int(tracker.metric.measured_steps) == 3 and int(tracker.metric.skipped_steps) == 0


def test_a_single_example_pairs_with_nothing() -> None:
    torch.manual_seed(0)
    tracker = tracked(TwoTowers("matmul"), examples=1)
    assert list(tracker.left_out) == [RAW_SCALE]


def test_layers_recomputed_in_a_reentrant_checkpoint_below_the_pairing_are_left_out_too() -> None:
    # The checkpointed layers run without a graph in the forward: no hook records them before the backward, yet
    # their gradients come through the pairing.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice about use_reentrant
        tracker = tracked(TwoTowers("matmul", reentrant_text=True))
    assert set(tracker.left_out) == {*TOWERS, RAW_SCALE}
    assert int(tracker.metric.measured_steps) == 0


class Clip(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TwoTowers("matmul")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.net(*batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_callback_says_why_nothing_is_measured_and_how_to_measure_it() -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 6), torch.randint(0, 11, (32, 3))), batch_size=8)
    gns = GradientNoiseScale()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns], max_steps=4).fit(Clip(), data)
    said = [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)]
    left_out = [m for m in said if "Left out" in m]
    assert len(left_out) == 1 and "pairs the examples of the batch (MmBackward0" in left_out[0]
    assert all(f"net.{name}" in left_out[0] for name in TOWERS)
    assert sum("NOT the model's noise scale" in m for m in said) == 1
    nothing = [m for m in said if "no optimizer step could be measured" in m]
    assert len(nothing) == 1 and EVERYTHING_LEFT_OUT in nothing[0] and "one example" not in nothing[0]
    assert gns.covered_fraction == 0.0 and gns.skipped_steps == 4
    # Accumulation measures it in microbatch mode, whose small batches (the micro-batches) are independent.
    gns = GradientNoiseScale()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=4, accumulate_grad_batches=2).fit(Clip(), data)
    assert gns.mode == "microbatch" and gns.skipped_steps == 0 and gns.left_out == {}


def test_transformers_clip_with_its_own_loss_is_left_out_below_the_similarity() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, projection_dim=8,
    )  # fmt: skip
    vision = transformers.CLIPVisionConfig(
        image_size=8, patch_size=4, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=8,
    )  # fmt: skip
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    tracker = measured(
        model,
        lambda: (
            model(input_ids=torch.randint(0, 50, (4, 6)), pixel_values=torch.randn(4, 3, 8, 8), return_loss=True).loss
        ),
    )
    coupled = {n for n, reason in tracker.left_out.items() if "pairs the examples of the batch" in reason}
    layers = {n for n, _ in model.named_parameters() if n.startswith(("text_model.encoder.", "vision_model.encoder."))}
    assert layers and layers <= coupled
    assert {"text_projection.weight", "visual_projection.weight"} <= coupled
    assert int(tracker.metric.measured_steps) == 0


class PerExampleLoop(nn.Module):
    """A Gram matrix per example, in a Python loop over the examples (``pair`` picks whose features meet)."""

    def __init__(self, pair: str) -> None:
        super().__init__()
        self.pair = pair
        self.features = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.features(x))  # (B, T, 4)
        if self.pair == "own, indexed":
            grams = [h[i] @ h[i].T for i in range(len(h))]
        elif self.pair == "own, iterated":
            grams = [hi @ hi.T for hi in h]
        elif self.pair == "own, counted from the end":
            grams = [h[i - len(h)] @ h[i].T for i in range(len(h))]
        else:  # each example against the next one
            grams = [h[i] @ h[(i + 1) % len(h)].T for i in range(len(h))]
        return torch.stack(grams).square().mean()


@pytest.mark.parametrize(
    ("pair", "coupled"),
    [("own, indexed", False), ("own, iterated", False), ("own, counted from the end", False), ("next", True)],
)
def test_slices_of_one_example_pair_nothing_and_of_two_examples_pair_them(pair: str, coupled: bool) -> None:
    torch.manual_seed(0)
    model = PerExampleLoop(pair)
    tracker = measured(model, lambda: model(torch.randn(4, 3, 6)), steps=2)
    assert set(tracker.left_out) == ({"features.weight", "features.bias"} if coupled else set())
    assert int(tracker.metric.measured_steps) == (0 if coupled else 2)


class CenteredInBatch(nn.Module):
    """Features centred on the batch mean inside the model, between two layers (as a BatchNorm without scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        return self.second(h - h.mean(dim=0))


class ThirdTowerInTheSimilarity(TwoTowers):
    """CLIP's similarity plus a per-example bias from a third layer, inside the softmax: that layer's gradient
    depends on the other examples through the softmax too, though it is no operand of the product."""

    def __init__(self) -> None:
        super().__init__("matmul")
        self.bias = nn.Linear(6, 1)

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        a = F.normalize(self.image(x), dim=-1)
        b = F.normalize(self.text(tokens).mean(1), dim=-1)
        logits = a @ b.T + self.bias(x)
        return F.cross_entropy(logits, torch.arange(len(a)))


def test_a_statistic_over_the_batch_in_the_model_leaves_out_the_layers_before_and_after_it() -> None:
    torch.manual_seed(0)
    model = CenteredInBatch()
    tracker = measured(model, lambda: F.cross_entropy(model(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])))
    assert set(tracker.left_out) == {"first.weight", "first.bias", "second.weight", "second.bias"}
    assert all("(SubBackward0: an in-batch" in reason for reason in tracker.left_out.values())
    assert int(tracker.metric.measured_steps) == 0


class AgainstConstantKeys(nn.Module):
    """A trained tower against keys outside the graph: a frozen tower's on the same batch (LiT; MoCo v3's momentum
    encoder under no_grad), a queue of another length (MoCo's), or a frozen classifier of as many classes as
    examples (a parameter: no examples in it)."""

    def __init__(self, keys: str) -> None:
        super().__init__()
        self.tower = nn.Linear(6, 8)
        self.frozen = nn.Linear(6, 8).requires_grad_(False)
        self.classes = nn.Parameter(torch.randn(4, 8), requires_grad=False)
        self.keys = keys

    def forward(self, x: Tensor) -> Tensor:
        q = F.normalize(self.tower(x), dim=-1)
        if self.keys == "same batch, frozen tower":
            k = F.normalize(self.frozen(x), dim=-1)
        elif self.keys == "same batch, no_grad":
            with torch.no_grad():
                k = F.normalize(self.tower(x), dim=-1)
        elif self.keys == "queue of 16":
            k = F.normalize(torch.randn(16, 8), dim=-1)
        else:  # frozen classifier
            return F.cross_entropy(q @ self.classes.T, torch.arange(len(x)))
        return F.cross_entropy(q @ k.T / 0.1, torch.arange(len(x)))


@pytest.mark.parametrize(
    ("keys", "coupled"),
    [
        ("same batch, frozen tower", True),
        ("same batch, no_grad", True),
        ("queue of 16", False),
        ("frozen classifier", False),
    ],
)
def test_in_batch_negatives_without_gradient_couple_the_examples(keys: str, coupled: bool) -> None:
    """The keys' side of q @ k.T needs no gradient, so the graph held only the query side, and every layer was
    measured: B_simple 141 against 19.7 from independent micro-batches (a MoCo v3 probe, 1500 steps)."""
    torch.manual_seed(0)
    model = AgainstConstantKeys(keys)
    tracker = measured(model, lambda: model(torch.randn(4, 6)))
    if coupled:
        assert set(tracker.left_out) == {"tower.weight", "tower.bias"}
        assert all("MmBackward0" in reason for reason in tracker.left_out.values())
    else:
        assert tracker.left_out == {} and int(tracker.metric.measured_steps) == 1


class FunctionalBatchNorm(nn.Module):
    """A batch norm of one's own: ``F.batch_norm(training=True)`` (no BatchNorm module for the setup to see),
    before a per-channel scale and shift that the norm of the next layer's input cancels, and a head."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.second = nn.Linear(8, 3)
        self.form = form

    def forward(self, x: Tensor) -> Tensor:
        h = self.first(x)  # (B, T, 8)
        if self.form == "running-statistics":
            h = F.batch_norm(h.transpose(1, 2), torch.zeros(8), torch.ones(8), training=False).transpose(1, 2)
        elif self.form == "batch-statistics":
            h = F.batch_norm(h.transpose(1, 2), None, None, training=True).transpose(1, 2)
        elif self.form == "flattened-rows":  # (B * T, 8)
            h = F.batch_norm(h.reshape(-1, 8), None, None, training=True).reshape(h.shape)
        elif self.form == "ghost-batches":  # chunks of 2 examples
            h = torch.cat([F.batch_norm(c.transpose(1, 2), None, None, training=True) for c in h.split(2)])
            h = h.transpose(1, 2)
        elif self.form == "instance-norm":  # batch_norm on a (1, B * C, T) view: each example on its own
            h = F.instance_norm(h.transpose(1, 2)).transpose(1, 2)
        return self.second(torch.tanh(h)).mean(1)


FORMS = ["batch-statistics", "flattened-rows", "ghost-batches", "running-statistics", "instance-norm"]


@pytest.mark.parametrize("form", FORMS)
def test_a_functional_batch_norm_leaves_out_the_layers_it_couples(form: str) -> None:
    """F.batch_norm over the batch was measured at full coverage: the layer below it got per-example
    "gradients" whose spread is no noise (a probe: tr(Sigma) ~1 where the true batch gradient was ~5e-6, B_simple
    inf), also over flattened rows or a ghost batch's chunks. With running statistics it is an elementwise affine
    map, and instance norm normalises each example alone: every layer is measured."""
    torch.manual_seed(0)
    model = FunctionalBatchNorm(form)
    tracker = measured(model, lambda: F.cross_entropy(model(torch.randn(4, 5, 6)), torch.tensor([0, 1, 2, 0])))
    if form in ("batch-statistics", "flattened-rows", "ghost-batches"):
        assert set(tracker.left_out) == {"first.weight", "first.bias", "second.weight", "second.bias"}
        assert all("NativeBatchNormBackward0" in reason for reason in tracker.left_out.values())
        assert int(tracker.metric.measured_steps) == 0
    else:
        assert tracker.left_out == {} and int(tracker.metric.measured_steps) > 0


def test_a_layer_that_joins_the_similarity_before_the_softmax_is_coupled_too() -> None:
    torch.manual_seed(0)
    tracker = tracked(ThirdTowerInTheSimilarity(), steps=1)
    assert set(tracker.left_out) == {*TOWERS, RAW_SCALE, "bias.weight", "bias.bias"}


WORKER = Path(__file__).parent / "support" / "coupled_ddp_worker.py"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_under_ddp_both_ranks_leave_out_the_coupled_layers_and_measure_the_head(tmp_path: Path) -> None:
    run_worker(WORKER, "--out", str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    coupled = {"trunk.0.weight", "trunk.0.bias", "project.weight", "project.bias"}
    assert set(rank0["left_out"]) == set(rank1["left_out"]) == coupled
    assert all("pairs the examples of the batch (MmBackward0" in r for r in rank0["left_out"].values())
    # The head: 16 * 3 + 3 of 6 * 16 + 16 + 51 + 16 * 8 + 8 elements.
    assert rank0["covered_fraction"] == rank1["covered_fraction"] == pytest.approx(51 / 299)
    assert rank0["measured_steps"] == rank1["measured_steps"] == 6
    assert rank0["b_simple"] == rank1["b_simple"] and math.isfinite(rank0["b_simple"])


class TrunkAndHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.trunk(x)
        return z, self.head(z)


LABELS = torch.tensor([0, 1, 2, 0])
STATISTIC_LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], set[str]]] = {
    # VICReg's variance term beside a classifier: the trunk's gradient depends on the batch's spread.
    "variance term": (lambda z, y: F.cross_entropy(y, LABELS) + F.relu(1 - z.std(dim=0)).mean(), {"trunk.0"}),
    "square of the batch mean": (lambda z, y: (z.mean(dim=0) ** 2).sum() + F.cross_entropy(y, LABELS), {"trunk.0"}),
    "softmax over the batch": (lambda z, y: (torch.softmax(y, dim=0) * y).sum(), {"trunk.0", "head"}),
    # Controls: a mean over the batch that reaches the loss linearly, and a function of the scalar loss (one factor
    # shared by every example's gradient).
    "per-feature mean, summed": (lambda z, y: ((y - 1) ** 2).mean(dim=0).sum(), set()),
    "root of the mean square": (lambda z, y: ((y - 1) ** 2).mean().sqrt(), set()),
}


@pytest.mark.parametrize("name", list(STATISTIC_LOSSES))
def test_a_statistic_over_the_batch_couples_only_through_an_operation_that_depends_on_it(name: str) -> None:
    loss_of, coupled = STATISTIC_LOSSES[name]
    torch.manual_seed(0)
    model = TrunkAndHead()
    tracker = measured(model, lambda: loss_of(*model(torch.randn(4, 6))))
    assert set(tracker.left_out) == {f"{layer}.{p}" for layer in coupled for p in ("weight", "bias")}
    assert int(tracker.metric.measured_steps) == (0 if coupled == {"trunk.0", "head"} else 1)  # nothing left to measure


class ScaledInputs(TwoTowers):
    """CLIP's similarity with the image tower's input scaled by a learned raw parameter first: the data enters the
    graph through the product, where only an empty edge shows it."""

    def __init__(self) -> None:
        super().__init__("matmul")
        self.input_scale = nn.Parameter(torch.ones(6))

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        return super().forward(x * self.input_scale, tokens)


def test_data_that_enters_through_a_product_with_a_parameter_still_holds_examples() -> None:
    torch.manual_seed(0)
    tracker = tracked(ScaledInputs(), steps=1)
    assert set(tracker.left_out) == {*TOWERS, RAW_SCALE, "input_scale"}
    assert all("pairs the examples" in tracker.left_out[name] for name in TOWERS if name.startswith("image."))


class RawEmbeddingTower(TwoTowers):
    """CLIP's similarity with the token tower's embedding a raw parameter looked up in the model's own forward
    (``F.embedding(tokens, self.token_table)``): the tokens, an integer index, hide in ``EmbeddingBackward0``, so
    the layers above look computed from parameters alone."""

    def __init__(self) -> None:
        super().__init__("matmul")
        self.token_table = nn.Parameter(torch.randn(11, 8))

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        a = F.normalize(self.image(x), dim=-1)
        b = F.normalize(self.text[2](self.text[1](F.embedding(tokens, self.token_table))).mean(1), dim=-1)
        logits = a @ b.T * self.logit_scale.exp()
        labels = torch.arange(len(a))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_layers_on_a_lookup_of_data_in_a_raw_parameter_still_hold_examples() -> None:
    torch.manual_seed(0)
    tracker = tracked(RawEmbeddingTower(), steps=1)
    towers = [name for name in TOWERS if not name.startswith("text.0.")]  # text[0] is unused here
    assert set(tracker.left_out) == {*towers, RAW_SCALE, "token_table"}
    assert all("pairs the examples" in tracker.left_out[name] for name in towers), tracker.left_out


class RawLookupTower(TwoTowers):
    """CLIP's similarity against a token tower that is only a lookup in a raw parameter (``table[tokens]`` or
    ``F.embedding``), no hooked layer above it: the tokens enter the graph as the index the lookup saved."""

    def __init__(self, lookup: str) -> None:
        super().__init__("matmul")
        self.lookup = lookup
        self.token_table = nn.Parameter(torch.randn(11, 5))

    def forward(self, x: Tensor, tokens: Tensor) -> Tensor:
        a = F.normalize(self.image(x), dim=-1)
        rows = F.embedding(tokens, self.token_table) if self.lookup == "embedding" else self.token_table[tokens]
        b = F.normalize(rows.mean(1), dim=-1)
        logits = a @ b.T * self.logit_scale.exp()
        labels = torch.arange(len(a))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("lookup", ["embedding", "index"])
def test_a_lookup_of_tokens_in_a_raw_parameter_holds_examples(lookup: str) -> None:
    torch.manual_seed(0)
    tracker = tracked(RawLookupTower(lookup), steps=1)
    image = [name for name in TOWERS if name.startswith("image.")]
    assert set(tracker.left_out) == {*image, RAW_SCALE, "token_table"}
    assert all("pairs the examples" in tracker.left_out[name] for name in image), tracker.left_out


class MixedRows(nn.Module):
    """Manifold mixup inside the model: a hidden layer's rows mixed with other examples' (``roll``, ``flip``, a
    permutation), or, as a control, only reordered and put back (a sort for packing pairs nothing)."""

    def __init__(self, mixing: str) -> None:
        super().__init__()
        self.mixing = mixing
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        order = torch.tensor([2, 0, 3, 1])
        if self.mixing == "roll":
            h = 0.7 * h + 0.3 * h.roll(1, 0)
        elif self.mixing == "flip":
            h = 0.7 * h + 0.3 * h.flip(0)
        elif self.mixing == "permutation":
            h = 0.7 * h + 0.3 * h[order]
        elif self.mixing == "index_select":
            h = 0.7 * h + 0.3 * h.index_select(0, order)
        elif self.mixing == "roll, dimension from the end":  # -3 of (B, 2, 4): the batch
            h3 = h.view(4, 2, 4)
            h = (0.7 * h3 + 0.3 * h3.roll(1, -3)).view(4, 8)
        elif self.mixing == "index_select, dimension from the end":
            h3 = h.view(4, 2, 4)
            h = (0.7 * h3 + 0.3 * h3.index_select(-3, order)).view(4, 8)
        elif self.mixing == "filter keeping every example":  # h[keep] beside h itself, keep == arange(4)
            keep = torch.nonzero(h.detach().abs().sum(1) >= 0).squeeze(1)
            h = h + torch.tanh(h[keep])
        else:  # reordered, transformed row by row, and put back in place
            h = torch.tanh(h[order])[torch.argsort(order)]
        return self.b(h).square().mean()


@pytest.mark.parametrize(
    "mixing",
    [
        "roll", "flip", "permutation", "index_select", "reorder", "roll, dimension from the end",
        "index_select, dimension from the end", "filter keeping every example",
    ],
)  # fmt: skip
def test_rows_mixed_with_other_examples_couple_them(mixing: str) -> None:
    torch.manual_seed(0)
    model = MixedRows(mixing)
    tracker = measured(model, lambda: model(torch.randn(4, 6)))
    if mixing in ("reorder", "filter keeping every example"):
        assert tracker.left_out == {} and int(tracker.metric.measured_steps) == 1
    else:
        assert set(tracker.left_out) == {"a.weight", "a.bias", "b.weight", "b.bias"}
        assert all("pairs the examples" in reason for reason in tracker.left_out.values())


class SortedByLength(LightningModule):
    """A token model that sorts its examples by length before a layer and puts them back after it, as packing
    does. ``sorting``: "hidden" sorts the embedding's output (``emb(t)[order]``); "tokens" sorts the tokens before
    the embedding (a reordering the graph does not show: the tokens need no gradient); "none" keeps every example
    in its place through the same operation (``h[keep]`` of a filter that keeps them all). ``tied``: the output
    layer shares the embedding's weight."""

    def __init__(self, tied: bool, sorting: str = "hidden") -> None:
        super().__init__()
        torch.manual_seed(3)
        self.sorting = sorting
        self.emb, self.mid, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, mask = batch
        order = torch.argsort(mask.sum(1), descending=True, stable=True)
        if self.sorting == "none":
            order = torch.nonzero(mask.sum(1) > 0).squeeze(1)  # every example has a token: all kept, in order
        h = self.emb(tokens[order]) if self.sorting == "tokens" else self.emb(tokens)[order]
        logits = self.head(torch.tanh(self.mid(h))[torch.argsort(order)])
        per_token = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none") * mask
        return per_token.sum() / mask.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    @staticmethod
    def data() -> DataLoader:
        lengths = torch.tensor([6, 2, 4, 3, 5, 2, 6, 3] * 2)
        mask = (torch.arange(6)[None] < lengths[:, None]).long()
        return DataLoader(TensorDataset(torch.randint(0, 11, (16, 6)) * mask, mask), batch_size=4)


def test_examples_reordered_in_the_model_with_per_example_counts_skip_the_steps_and_say_why() -> None:
    """Each layer's per-example norms hold the examples in the order the layer saw them: with one count per example
    they would be weighted by other examples' counts (B_simple inf against 211 in a probe). The steps are skipped
    with the reason; with one count for the micro-batch every example weighs alike, and the order is harmless."""
    gns = GradientNoiseScale(batch_size_fn=lambda batch: batch[1].sum(dim=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns], max_steps=4).fit(SortedByLength(tied=True), SortedByLength.data())
    said = " ".join(str(w.message) for w in caught)
    assert gns.skipped_steps == 4 and "puts the examples of the batch in another order (IndexBackward0" in said
    assert "batch_size_fn gives one count per example" in said and gns.left_out == {}
    gns = GradientNoiseScale(batch_size_fn=lambda batch: batch[1].sum())
    make_trainer([gns], max_steps=4).fit(SortedByLength(tied=False), SortedByLength.data())
    assert gns.skipped_steps == 0 and gns.left_out == {} and int(gns.metric.measured_steps) == 4


def test_a_tied_weight_in_a_model_that_reorders_its_examples_is_left_out() -> None:
    """The embedding sees the examples sorted, the output layer sharing its weight sees them in their order: the
    cross term of the two uses would pair different examples (B_simple 3% high in a probe)."""
    gns = GradientNoiseScale()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=4).fit(SortedByLength(tied=True, sorting="tokens"), SortedByLength.data())
    assert set(gns.left_out) == {"emb.weight"} and gns.skipped_steps == 0
    assert "used by layer calls that see the examples of the batch in different orders" in gns.left_out["emb.weight"]


@pytest.mark.parametrize("counts", ["per example", "per micro-batch"])
def test_layers_that_see_the_batchs_order_stay_measured_beside_a_reordering(counts: str) -> None:
    """Only the layers that see another order matter: a filter that keeps every example in its place is no
    reordering (per-example counts measured), and a tied embedding and output layer on either side of a sort and
    its inverse both see the batch's order (measured: only the layer between them sees the sorted order, which
    per-example counts cannot weight). A sort of an already sorted batch is judged again on the next batch."""
    fn = (lambda batch: batch[1].sum(dim=1)) if counts == "per example" else (lambda batch: batch[1].sum())
    kept, sorted_between = GradientNoiseScale(batch_size_fn=fn), GradientNoiseScale(batch_size_fn=fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([kept], max_steps=4).fit(SortedByLength(tied=True, sorting="none"), SortedByLength.data())
        make_trainer([sorted_between], max_steps=4).fit(SortedByLength(tied=True), SortedByLength.data())
    assert kept.left_out == {} and kept.skipped_steps == 0
    assert sorted_between.left_out == {}
    assert sorted_between.skipped_steps == (4 if counts == "per example" else 0)


class SlicesCombined(SequenceRegression):
    """One prediction per example from a Python loop over the examples' slices ``x[i]``: kept apart (stacked,
    written in place, per-example losses summed as scalars) or carried from one example to the next (a
    recurrence over the batch, as an ``nn.LSTMCell`` loop over a time-major batch counted by its first dimension
    does)."""

    def __init__(self, combine: str) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.combine = combine
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 1)
        self.mid = nn.Linear(4, 4)  # called on each example's (3, 4) slice by "layer on each slice"

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)  # (B, 3, 4): measured per example unless a pairing is found above it
        if self.combine == "layer on each slice":
            return self.head(torch.stack([torch.tanh(self.mid(hi)) for hi in h])).mean(dim=(1, 2))
        if self.combine == "attention within each slice":  # q and k computed from the slice: no views of it
            rows = [torch.softmax(torch.tanh(hi) @ (2 * hi).T, dim=-1) @ hi for hi in h]
            return self.head(torch.stack(rows)).mean(dim=(1, 2))
        if self.combine == "in place":
            out = torch.zeros_like(h)
            for i in range(len(h)):
                out[i] = torch.tanh(h[i])
        else:
            carried, rows = torch.zeros_like(h[0]), []
            for hi in h:
                carried = torch.tanh(hi + (0.5 * carried if self.combine == "recurrence" else 0.0))
                rows.append(carried)
            out = torch.stack(rows)
        return self.head(out).mean(dim=(1, 2))


@pytest.mark.parametrize("combine", ["stacked", "in place", "attention within each slice", "recurrence"])
def test_slices_of_examples_combined_pair_them_and_put_side_by_side_pair_nothing(combine: str) -> None:
    # The recurrence was measured: each h[i] depends on examples 0..i, and the norms came out silently wrong.
    # Attention within each slice was taken for a pairing (q and k are no views of the slice): all left out.
    model = SlicesCombined(combine).double()
    if combine != "recurrence":
        fit_and_check(model, 4, ())
        return
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    fit64([gns], model, SlicesCombined.data(8, batch_size=4))
    assert set(gns.left_out) == {"a.weight", "a.bias", "head.weight", "head.bias"}
    assert all("AddBackward0" in reason and "pairs the examples" in reason for reason in gns.left_out.values())
    assert gns.skipped_steps == 2


@pytest.mark.parametrize("batch_size", [4, 3], ids=["T!=B", "T==B"])
def test_a_layer_called_on_one_examples_slice_is_left_out(batch_size: int) -> None:
    # mid(h[i]) sees (T, d): at T == B its rows, that example's positions, were taken for the batch (silently wrong).
    gns = fit_and_check(SlicesCombined("layer on each slice").double(), batch_size, ("mid",))
    assert ("one example's slice" in gns.left_out["mid.weight"]) == (batch_size == 3)


def test_a_sort_judged_on_a_batch_already_in_order_is_judged_again() -> None:
    """The first batch is sorted by length already, so its sort is the batch's order: the graph is judged again
    on the next batch (judged once, the later reorderings went unseen), and per-example counts skip from there."""
    lengths = torch.tensor([6, 5, 4, 3] + [2, 6, 3, 4] * 3)
    mask = (torch.arange(6)[None] < lengths[:, None]).long()
    data = DataLoader(TensorDataset(torch.randint(1, 11, (16, 6)) * mask, mask), batch_size=4)
    gns = GradientNoiseScale(batch_size_fn=lambda batch: batch[1].sum(dim=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer([gns], max_steps=4).fit(SortedByLength(tied=False), data)
    assert int(gns.metric.measured_steps) == 1 and gns.skipped_steps == 3
