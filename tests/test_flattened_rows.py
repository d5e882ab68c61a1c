"""Layers called on tokens flattened to (B*T, d): measured when the rows hold the examples in order, else left out.

OPT's decoder layers (and user code) reshape ``(B, T, d)`` to ``(B*T, d)`` before their MLP. The per-example
source regroups such rows per example only when the autograd graph shows the flatten kept the batch order
(lightning_gns/sources/per_example_rows.py); a flatten of a sequence-first tensor, at ``T == B`` as much as at
``T != B``, is left out and said, never split wrongly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_gns import GradientNoiseScale
from lightning_gns.sources.per_example_rows import FlattenedRows
from support.reference_func import BatchRecorder, assert_histories_match, reference_history
from support.trainers import fit64, param_names
from support.zoo import SequenceRegression

ROW_LAYERS = ("norm", "up", "down", "rms", "narrow")


class RowsModel(SequenceRegression):
    """proj -> tokens flattened to rows -> LayerNorm, Linear, GELU, Linear, RMSNorm on rows -> back -> head.

    ``order="batch"``: ``h.reshape(B*T, d)`` (rows of example b together); ``order="position"``: the flatten of
    ``h.transpose(0, 1)``, rows grouped by position. The row layers take both per-example paths: the LayerNorm
    and the narrow Linear the fused one, the wide Linears (Gram form) and the RMSNorm the hooks.
    """

    def __init__(self, order: str = "batch", checkpointed: str | None = None, lr: float = 0.0) -> None:
        super().__init__(lr)
        torch.manual_seed(5)
        self.order, self.checkpointed = order, checkpointed
        self.proj = nn.Linear(4, 32)
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 32)
        self.rms = nn.RMSNorm(32)
        self.narrow = nn.Linear(32, 2)
        self.head = nn.Linear(32, 1)

    def rows(self, h: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = h.shape
        flat = h.reshape(b * t, d) if self.order == "batch" else h.transpose(0, 1).reshape(t * b, d)
        out = self.rms(flat + self.down(F.gelu(self.up(self.norm(flat)))))
        side = self.narrow(flat)
        if self.order == "batch":
            return out.reshape(b, t, d), side.reshape(b, t, 2)
        return out.reshape(t, b, d).transpose(0, 1), side.reshape(t, b, 2).transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        if self.checkpointed:
            out, side = checkpoint(self.rows, h, use_reentrant=self.checkpointed == "reentrant")
        else:
            out, side = self.rows(h)
        return self.head(out).mean(dim=(1, 2)) + side.mean(dim=(1, 2))


def fit_and_reference(
    model: RowsModel, batch_size: int, left_out: tuple[str, ...]
) -> tuple[GradientNoiseScale, list[str]]:
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    recorder = BatchRecorder(gns)
    messages = fit64([gns, recorder], model, RowsModel.data(batch_size * 5, batch_size=batch_size))
    assert gns.skipped_steps == 0
    model.checkpointed = None  # torch.func (the reference) refuses checkpoints; the arithmetic is the same
    kept = param_names(model, left_out)
    want = reference_history(
        model, recorder.micro_batches, RowsModel.example_loss, lambda step: kept,
        lambda batch: torch.ones(len(batch[0])), beta=0.8,
    )  # fmt: skip
    assert_histories_match(recorder.history, want)
    return gns, messages


@pytest.mark.parametrize("checkpointed", [None, "non-reentrant", "reentrant"])
@pytest.mark.parametrize("batch_size", [4, 3], ids=["T!=B", "T==B"])
def test_rows_flattened_in_batch_order_are_measured_exactly(batch_size: int, checkpointed: str | None) -> None:
    model = RowsModel("batch", checkpointed)
    gns, messages = fit_and_reference(model, batch_size, ())
    assert gns.left_out == {} and gns.covered_fraction == 1.0
    assert not [m for m in messages if "left out" in m.lower()], messages


@pytest.mark.parametrize("batch_size", [4, 3], ids=["T!=B", "T==B"])
def test_rows_flattened_by_position_are_left_out_and_said(batch_size: int) -> None:
    """At T == B the shapes are those of the batch-order flatten: only the graph tells (the transpose)."""
    model = RowsModel("position")
    gns, messages = fit_and_reference(model, batch_size, ROW_LAYERS)
    expected = set(param_names(model)) - set(param_names(model, ROW_LAYERS))
    assert set(gns.left_out) == expected
    assert all("flattened to (B*T, d)" in reason for reason in gns.left_out.values())
    said = [m for m in messages if "left out" in m.lower()]
    assert len(said) == 1 and all(name in said[0] for name in expected), messages


class TimeMajorBlock(RowsModel):
    """A Linear on ``h.transpose(0, 1)`` (a time-major block inside a batch-first model, no ``batch_first=False``
    module to tell), whose ``(T, B, d)`` output is flattened to rows for the row layers."""

    def __init__(self) -> None:
        super().__init__("position")
        self.time = nn.Linear(32, 32)

    def rows(self, h: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = h.shape
        flat = torch.tanh(self.time(h.transpose(0, 1))).reshape(t * b, d)
        out = self.rms(flat + self.down(F.gelu(self.up(self.norm(flat)))))
        return out.reshape(t, b, d).transpose(0, 1), self.narrow(flat).reshape(t, b, 2).transpose(0, 1)


@pytest.mark.parametrize("batch_size", [4, 3], ids=["T!=B", "T==B"])
def test_rows_flattened_from_a_layer_that_took_the_examples_elsewhere_are_left_out(batch_size: int) -> None:
    """At T == B the time-major Linear's (T, B, d) output looks batch-first. The graph check leaves that Linear
    out (its input holds the examples in dimension 1), but its output had already anchored the flatten, and the
    row layers were split by position: B_simple 27 against 43 at every step, nothing said (a probe)."""
    model = TimeMajorBlock()
    gns, messages = fit_and_reference(model, batch_size, ("time", *ROW_LAYERS))
    expected = set(param_names(model)) - set(param_names(model, ("time", *ROW_LAYERS)))
    assert set(gns.left_out) == expected
    said = [m for m in messages if "left out" in m.lower()]
    assert len(said) == 1 and all(name in said[0] for name in expected), messages


class PenalizedNorm(RowsModel):
    """An RMSNorm (hook path) before the flatten, with a penalty on its weight in the loss: left out (a use
    outside its layer) from the first measured micro-batch on, yet its output still holds the examples in order
    for the flatten after it."""

    def __init__(self) -> None:
        super().__init__("batch")
        self.pre = nn.RMSNorm(32)

    def forward(self, x: Tensor) -> Tensor:
        out, side = self.rows(self.pre(self.proj(x)))
        return self.head(out).mean(dim=(1, 2)) + side.mean(dim=(1, 2))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.example_loss(self, batch) + 1e-3 * self.pre.weight.square().sum()


def test_a_left_out_layer_still_anchors_the_rows_after_it() -> None:
    model = PenalizedNorm()
    gns, _ = fit_and_reference(model, 4, ("pre",))
    assert list(gns.left_out) == ["pre.weight"] and "outside the layers" in gns.left_out["pre.weight"]


# ---------------------------------------------------------------- the walk itself, on hand-made graphs
B, T, D = 3, 3, 4


def grouped(make: Any) -> int | None:
    """Rows per example that FlattenedRows finds for ``make(h, bias)``, ``h`` a batch-first layer output."""
    torch.manual_seed(0)
    layer = nn.Linear(D, D)
    h = layer(torch.randn(B, T, D))
    rows = FlattenedRows()
    rows.note_output(h)
    return rows.rows_per_example(make(h, layer.bias), B)


@pytest.mark.parametrize(
    ("make", "want"),
    [
        (lambda h, w: h.reshape(B * T, D), T),
        (lambda h, w: F.dropout(torch.tanh(h.reshape(B * T, D)) * 2 + 1, 0.5), T),
        (lambda h, w: (h * w).flatten(0, 1), T),  # times a parameter, broadcast over the data
        (lambda h, w: h.reshape(B * T, D) + h.reshape(B * T, D).exp(), T),
        (lambda h, w: h.reshape(B * T * 2, D // 2), 2 * T),
        (lambda h, w: h.transpose(0, 1).reshape(T * B, D), None),  # rows grouped by position
        (lambda h, w: h.flip(0).reshape(B * T, D), None),  # an op that moves rows
        (lambda h, w: h.reshape(B * T, D) + h.transpose(0, 1).reshape(B * T, D), None),  # one operand moved
        (lambda h, w: (h.unsqueeze(0) + torch.zeros(2, 1, 1, 1)).reshape(2 * B * T, D), None),  # broadcast
        (lambda h, w: h.mean(dim=1, keepdim=True).expand(B, T, D).reshape(B * T, D), None),
        (lambda h, w: nn.Parameter(torch.randn(B * T, D)) * 2, None),  # parameters only: no example's data
        (lambda h, w: torch.randn(B * T, D), None),  # needs no gradient: cannot be traced
        # Swin's window partition: a permutation that leaves the batch first moves elements within each example
        (lambda h, w: h.reshape(B, T, 2, D // 2).permute(0, 2, 1, 3).reshape(B * T, D), T),
        (lambda h, w: h.roll(1, 1).transpose(1, 2).reshape(B * T, D), T),
        (lambda h, w: h.permute(1, 0, 2).reshape(B * T, D), None),  # the batch moved off the first place
        (lambda h, w: h.roll(1, 0).reshape(B * T, D), None),  # rows moved across examples
        (lambda h, w: F.pad(h, (0, 0, 0, 0)).reshape(B * T, D), T),  # Swin's pad to whole windows, of nothing
        (lambda h, w: F.pad(h, (0, 0, 0, 1))[:, 1:].reshape(B * T, D), None),  # a real pad
        # dimensions counted from the end (saved unsigned in the graph: -3 % 3 read as 1 took them for others)
        (lambda h, w: h.transpose(-3, -2).reshape(T * B, D), None),
        (lambda h, w: h.permute(-3, -1, -2).reshape(B * T, D), T),
        (lambda h, w: h.roll(1, -3).reshape(B * T, D), None),
        (lambda h, w: h.transpose(-1, -2).reshape(B * T, D), T),
    ],
    ids=[
        "reshape", "elementwise", "parameter-broadcast", "two-paths", "finer-rows", "transposed", "flipped",
        "one-operand-moved", "broadcast-leading", "reduction", "parameters-only", "no-grad", "windows",
        "within-example", "permuted-batch", "rolled-batch", "empty-pad", "pad", "transposed-from-end",
        "permuted-from-end", "rolled-batch-from-end", "transposed-last-two",
    ],
)  # fmt: skip
def test_the_walk_accepts_order_keeping_graphs_only(make: Any, want: int | None) -> None:
    assert grouped(make) == want
