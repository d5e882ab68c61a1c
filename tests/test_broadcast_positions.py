"""Outputs with the batch's shape that hold positions shared by the batch: left out at T == B, as at T != B.

A layer called on positions (a relative-position bias of a ``(T, T)`` bucket matrix, as in T5) gives an output
of shape ``(T, T, ...)``. At ``T != B`` its leading dimension is not the batch's and it is left out; at
``T == B`` only what the model does with it tells (it is broadcast over the batch:
lightning_gns/sources/per_example_positions.py). Batch-first outputs at ``T == B`` stay measured, also where
the model transposes the batch away (``nn.MultiheadAttention(batch_first=True)``).
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_gns import GradientNoiseScale
from lightning_gns.sources import per_example
from support.per_example_check import fit_and_check
from support.reference_func import BatchRecorder, assert_histories_match, reference_history
from support.trainers import fit64, make_trainer, param_names
from support.zoo import AttentionModel, SequenceRegression, TinyGPT


class RelativeBias(SequenceRegression):
    """Scores of every pair of positions plus a learned bias per relative position, broadcast over the batch.

    ``unsqueeze``: T5's form, ``bias(buckets).permute(2, 0, 1).unsqueeze(0)``; else the permute alone gives the
    size-one leading dimension (``(T, T, 1) -> (1, T, T)``) that broadcasting expands.
    """

    def __init__(
        self,
        unsqueeze: bool = True,
        checkpointed: str | None = None,
        lr: float = 0.0,
        repeat: bool = False,
        lead: str = "unsqueeze",
    ) -> None:
        super().__init__(lr)
        torch.manual_seed(6)
        self.unsqueeze, self.checkpointed, self.repeat, self.lead = unsqueeze, checkpointed, repeat, lead
        self.proj = nn.Linear(4, 4)
        self.bias = nn.Embedding(5, 2 if unsqueeze else 1)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        if self.checkpointed:
            return checkpoint(self.attend, h, use_reentrant=self.checkpointed == "reentrant")
        return self.attend(h)

    def attend(self, h: Tensor) -> Tensor:
        t = h.shape[1]
        positions = torch.arange(t)
        buckets = (positions[None, :] - positions[:, None]).clamp(-2, 2) + 2  # (T, T)
        relative = self.bias(buckets)  # (T, T, heads)
        if self.unsqueeze:
            scores = h @ h.transpose(1, 2) / 2  # (B, T, T)
            shared = relative.permute(2, 0, 1).unsqueeze(0)  # (1, 2, T, T)
            if self.lead == "view":  # an einops-style rearrange to "1 h i j"
                shared = relative.permute(2, 0, 1).reshape(1, 2, t, t)
            elif self.lead == "expand":  # expanded over the batch before the add (as before a baddbmm)
                shared = shared.expand(len(h), -1, -1, -1)
            if self.repeat:  # WavLM's form: repeated over the batch rather than broadcast
                shared = shared.repeat(len(h), 1, 1, 1)
            scores = scores.unsqueeze(1) + shared  # (B, 2, T, T)
            mixed = torch.softmax(scores, dim=-1).mean(dim=1) @ h
        else:
            mixed = torch.softmax(h @ h.transpose(1, 2) + relative.permute(2, 0, 1), dim=-1) @ h
        return self.head(torch.tanh(mixed)).mean(dim=(1, 2))


@pytest.mark.parametrize(
    ("unsqueeze", "repeat", "lead"),
    [(True, False, "unsqueeze"), (False, False, ""), (True, True, ""), (True, False, "view"), (True, False, "expand")],
    ids=["permute-unsqueeze", "permute", "repeat", "view", "expand"],
)
@pytest.mark.parametrize("batch_size", [4, 3], ids=["T!=B", "T==B"])
def test_a_relative_position_bias_is_left_out_at_any_batch_size(
    batch_size: int, unsqueeze: bool, repeat: bool, lead: str
) -> None:
    """At T == B a bias viewed or expanded to the batch's rank was not followed, and the coupling check took its
    broadcast for examples paired by the model: every parameter left out, every step skipped (a probe)."""
    gns = fit_and_check(RelativeBias(unsqueeze, repeat=repeat, lead=lead), batch_size, ("bias",))
    reason = gns.left_out["bias.weight"]
    if batch_size == 3:  # T == B: found by the broadcast
        op = {"repeat": "RepeatBackward0", "expand": "ExpandBackward0"}.get(
            "repeat" if repeat else lead, "AddBackward0"
        )
        assert f"broadcasts it over the batch ({op})" in reason and "(3, 3, " in reason
    else:
        assert "leading dimension is not" in reason


@pytest.mark.parametrize("checkpointed", ["non-reentrant", "reentrant"])
def test_a_relative_position_bias_inside_an_activation_checkpoint_is_left_out_at_t_equal_b(checkpointed: str) -> None:
    """A reentrant checkpoint runs the bias only inside the backward, after the loss's graph was read: judged by
    the graph of the layers recomputed with it, before its gradient is used."""
    gns = fit_and_check(RelativeBias(checkpointed=checkpointed), 3, ("bias",))
    assert "broadcasts it over the batch" in gns.left_out["bias.weight"]


def test_batch_first_outputs_transposed_inside_attention_stay_measured_at_t_equal_b() -> None:
    """nn.MultiheadAttention(batch_first=True) transposes its (B, T, d) inputs to (T, B, d): no broadcast."""
    fit_and_check(AttentionModel(), 3, ())


@pytest.mark.slow
def test_under_torch_compile_a_square_output_that_cannot_be_judged_is_said_once() -> None:
    """A compiled region hides what the model does with the bias: not judged, and said (once)."""
    torch._dynamo.reset()  # a model compiled by an earlier test can leave this one's forward running eagerly
    torch.manual_seed(0)
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(RelativeBias(), backend="aot_eager")
        make_trainer([gns], max_steps=3).fit(compiled, RelativeBias.data(12, batch_size=3))
    said = [str(w.message) for w in caught if "cannot tell whether the outputs" in str(w.message)]
    assert len(said) == 1 and "'bias'" in said[0] and "torch.compile" in said[0]
    assert "Use a batch size other than the sequence length" in said[0]


@pytest.mark.parametrize("checkpointed", [None, "reentrant"])
def test_a_graph_that_cannot_be_read_is_said_and_training_goes_on(
    checkpointed: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broadcast check runs before the backward, or inside it (reentrant): a failure is said, never raised."""

    def unreadable(*args: Any) -> Any:
        raise RuntimeError("no metadata")

    monkeypatch.setattr(per_example, "broadcast_outputs", unreadable)
    torch.manual_seed(0)
    gns = GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([gns], max_steps=3).fit(RelativeBias(checkpointed=checkpointed), RelativeBias.data(12, 3))
    said = [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)]
    assert any("reading the autograd graph failed (RuntimeError)" in m for m in said), said
    assert any("cannot tell whether the outputs" in m and "'bias'" in m for m in said), said
    assert gns.skipped_steps == 0


class OffsetPositions(TinyGPT):
    """nanoGPT with positions counted from 1: ``wpe(arange(1, T + 1))`` is no ``arange(T)``, yet shared; with
    ``stride`` 2, ``wpe(arange(1, 2 T + 1, 2))``: no consecutive index either, found by the broadcast alone."""

    stride = 1

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        positions = torch.arange(1, self.stride * t + 1, self.stride, device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            h = block["ln_1"](x)
            q, k, v = block["c_attn"](h).split(x.shape[-1], dim=2)
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block["c_proj"](y.transpose(1, 2).reshape(b, t, -1))
            x = x + block["mlp_proj"](torch.nn.functional.gelu(block["c_fc"](block["ln_2"](x))))
        return self.lm_head(self.ln_f(x))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch_size", [4, 8], ids=["T!=B", "T==B"])
def test_positions_with_an_offset_broadcast_over_the_batch_are_left_out(batch_size: int, stride: int) -> None:
    model = OffsetPositions(width=12)  # no dimension of wpe's (T, 12) output equals the batch but T
    model.stride = stride
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    recorder = BatchRecorder(gns)
    fit64([gns, recorder], model, TinyGPT.data(batch_size * 4, batch_size=batch_size))
    assert list(gns.left_out) == ["wpe.weight"] and gns.skipped_steps == 0
    # T == B: found by its index, consecutive positions (per_example_tables), before the broadcast is judged
    want_reason = "leading dimension is not"
    if batch_size == 8:
        want_reason = "holds no examples" if stride == 1 else "broadcasts it over the batch"
    assert want_reason in gns.left_out["wpe.weight"]
    kept = param_names(model, ("wpe",))
    want = reference_history(
        model, recorder.micro_batches, TinyGPT.example_loss, lambda step: kept,
        lambda batch: torch.ones(len(batch)), beta=0.8,
    )  # fmt: skip
    assert_histories_match(recorder.history, want)


@pytest.mark.parametrize("count", ["int", "0-d tensor"])
def test_a_token_count_for_the_whole_micro_batch_splits_per_example_by_its_rows(count: str) -> None:
    """``batch_size_fn=lambda b: b[:, 1:].sum()``-style counts (one 0-d tensor for the micro-batch) take the
    examples from the batch's rows, as an int count does. They were taken for no count at all: every check of a
    layer's leading dimension was off, and at T == B nanoGPT's ``wpe(arange(T))`` was split per example, its 4
    positions taken for the 4 examples (B_simple 1-3% off, no warning)."""
    model = TinyGPT()
    tokens_of: Any = (lambda b: b[:, 1:].numel()) if count == "int" else (lambda b: torch.tensor(b[:, 1:].numel()))
    gns = GradientNoiseScale(beta=0.8, mode="per_example", batch_size_fn=tokens_of)
    recorder = BatchRecorder(gns)
    said = fit64([gns, recorder], model, TinyGPT.data(20, length=5, batch_size=4))  # T = 4 predicted positions = B
    assert gns.skipped_steps == 0
    assert list(gns.left_out) == ["wpe.weight"], gns.left_out
    assert any("counts 16 units in a micro-batch of 4 examples" in m for m in said), said
    kept = param_names(model, ("wpe",))
    want = reference_history(
        model, recorder.micro_batches, TinyGPT.example_loss, lambda step: kept,
        lambda batch: torch.full((len(batch),), batch.shape[1] - 1), beta=0.8,
    )  # fmt: skip
    assert_histories_match(recorder.history, want)
