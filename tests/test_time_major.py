"""Time-major batches, as PyTorch's ``word_language_model`` example feeds its LSTM: ``(T, B)`` token batches.

Counted by their leading dimension such batches hold ``T`` "examples": ``B_simple`` came out in positions
(``T / B`` times too large), and ``per_example`` mode split the embedding's and the decoder's gradients along
the sequence while leaving the LSTM out, silently. The ``batch_first=False`` layers show it (their sequence
dimension is the count, their batch dimension is not): every such step is skipped and the fix named once
(lightning_gns/time_major.py).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader

from lightning_gns import GradientNoiseScale
from support.reference_func import BatchRecorder, assert_histories_match, reference_history
from support.reference_loop import loop_reference_history
from support.trainers import fit64, param_names
from support.zoo import SequenceRegression, ZooModule

VOCAB, WIDTH, B = 11, 6, 4


class TokenModel(ZooModule):
    """A model of batch-first ``(B, T)`` tokens trained on next-token cross entropy (``example_loss`` is the loss of
    any batch, one example's included, for the float64 reference)."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.example_loss(self, batch)

    @staticmethod
    def example_loss(call: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
        tokens, targets = batch
        return F.cross_entropy(call(tokens).reshape(-1, VOCAB), targets.reshape(-1))


class WordLanguageModel(ZooModule):
    """Embedding, a sequence-first ``layer`` (LSTM or a transformer encoder layer), decoder; on ``(T, B)`` tokens.
    ``batches`` says how the loader hands them: ``"time-major"`` as they are, ``"batch-first"`` as ``(B, T)``,
    transposed in ``training_step``."""

    def __init__(self, layer: str = "lstm", batches: str = "time-major") -> None:
        super().__init__()
        torch.manual_seed(5)
        self.batches = batches
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.packed = layer == "packed gru"
        if layer == "lstm":
            self.layer: nn.Module = nn.LSTM(WIDTH, WIDTH)
        elif self.packed:
            self.layer = nn.GRU(WIDTH, WIDTH)
        else:
            self.layer = nn.TransformerEncoderLayer(WIDTH, 2, dim_feedforward=8, dropout=0.0)
        self.decoder = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:  # (T, B) -> (T, B, VOCAB)
        return self.decoder(self.sequence_first(self.embed(tokens)))

    def sequence_first(self, h: Tensor) -> Tensor:
        if self.packed:  # every sequence whole: the GRU's batch is only in the PackedSequence's batch sizes
            lengths = torch.full((h.shape[1],), h.shape[0])
            return pad_packed_sequence(self.layer(pack_padded_sequence(h, lengths))[0])[0]
        out = self.layer(h)
        return out[0] if isinstance(out, tuple) else out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, targets = (t.t() for t in batch) if self.batches == "batch-first" else batch
        return F.cross_entropy(self(tokens).reshape(-1, VOCAB), targets.reshape(-1))


class BatchFirstOutside(TokenModel, WordLanguageModel):
    """The same layers called from a batch-first forward (``(B, T)`` in and out), as most ports write it."""

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(self.sequence_first(self.embed(tokens).transpose(0, 1)).transpose(0, 1))


def token_batches(length: int, steps: int, time_major: bool) -> DataLoader:
    """``steps`` batches of B sequences of ``length`` tokens and their next tokens, ``(T, B)`` if ``time_major``."""
    ids = torch.randint(0, VOCAB, (B * steps, length + 1), generator=torch.Generator().manual_seed(1))
    batches = []
    for i in range(steps):
        rows = ids[i * B : (i + 1) * B]
        x, y = rows[:, :-1], rows[:, 1:]
        batches.append((x.t().contiguous(), y.t().contiguous()) if time_major else (x, y))
    return DataLoader(batches, batch_size=None)


@pytest.mark.parametrize(
    ("layer", "mode"),
    [("lstm", "per_example"), ("encoder", "per_example"), ("lstm", "microbatch"), ("packed gru", "microbatch")],
)
def test_a_time_major_batch_counted_by_its_leading_dimension_is_skipped_and_named(layer: str, mode: str) -> None:
    gns = GradientNoiseScale(mode=mode, beta=0.8)
    accumulation = 2 if mode == "microbatch" else 1
    said = fit64(
        [gns], WordLanguageModel(layer), token_batches(6, 4 * accumulation, True), accumulate_grad_batches=accumulation
    )
    named = [m for m in said if "looks time-major" in m and "no optimizer step" not in m]
    assert len(named) == 1, said
    assert "leading dimension (6)" in named[0] and "batch dimension holds 4" in named[0]
    assert "batch_size_fn=lambda batch: batch[0].shape[1]" in named[0]
    assert gns.skipped_steps == 4
    assert math.isnan(gns.b_simple)


@pytest.mark.parametrize("layer", ["lstm", "encoder"])
def test_time_major_batches_with_their_examples_counted_measure_as_batch_first_ones(layer: str) -> None:
    # microbatch mode: the same data and loss, handed over time-major (counted by batch_size_fn) and batch-first
    # (counted by default), give the same estimates; the time-major run counted by default would be skipped.
    model = WordLanguageModel(layer)
    runs = {}
    for batches in ("time-major", "batch-first"):
        gns = GradientNoiseScale(
            mode="microbatch", beta=0.8, batch_size_fn=(lambda b: b[0].shape[1]) if batches == "time-major" else None
        )
        twin = copy.deepcopy(model)
        twin.batches, twin.lr = batches, 0.1
        said = fit64([gns], twin, token_batches(6, 8, batches == "time-major"), accumulate_grad_batches=2)
        assert not [m for m in said if "time-major" in m] and gns.skipped_steps == 0
        runs[batches] = gns.compute()
    for key in ("gns/b_simple", "gns/grad_sq_norm", "gns/trace_cov", "gns/b_small", "gns/b_big"):
        assert runs["time-major"][key] == pytest.approx(runs["batch-first"][key], rel=1e-12), key
    assert runs["time-major"]["gns/b_small"] == 4


@pytest.mark.parametrize("length", [6, 4])
def test_sequence_first_layers_fed_batch_first_batches_are_measured_exactly(length: int) -> None:
    # The check watches the LSTM with a pre-hook of its own: per_example's replay of the LSTM takes it for what it
    # is (a reader of shapes), and at T == B (nothing to tell) the batch is not called time-major.
    model = BatchFirstOutside("lstm").double()
    gns = GradientNoiseScale(mode="per_example", beta=0.8)
    recorder = BatchRecorder(gns)
    said = fit64([gns, recorder], model, token_batches(length, 5, False))
    assert not [m for m in said if "time-major" in m] and gns.skipped_steps == 0
    left_out = () if length != B else ("embed.", "decoder.")  # (B, B, d) beside a batch_first=False layer
    assert set(gns.left_out) == set(param_names(model)) - set(param_names(model, left_out)), gns.left_out
    kept = param_names(model, left_out)
    want = loop_reference_history(
        model, recorder.micro_batches, TokenModel.example_loss, kept, lambda b: torch.ones(len(b[0])), beta=0.8
    )
    assert_histories_match(recorder.history, want)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the check's hooks end with the fit


class AcrossTheBatch(ZooModule):
    """BatchFormer's idea: a batch_first=False encoder layer over ``h[:, None]`` attends across the examples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.proj = nn.Linear(5, WIDTH)
        self.layer = nn.TransformerEncoderLayer(WIDTH, 2, dim_feedforward=8, dropout=0.0)
        self.head = nn.Linear(WIDTH, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # x: (B, 5), a second dimension that a (B, 1, d) call does not have
        h = self.layer(self.proj(x)[:, None]).squeeze(1)
        return F.mse_loss(self.head(h).squeeze(1), y)


def test_a_layer_attending_across_the_examples_is_no_time_major_batch() -> None:
    gns = GradientNoiseScale(mode="microbatch", beta=0.8)
    x = torch.randn(4 * B * 2, 5, generator=torch.Generator().manual_seed(2))
    data = DataLoader(torch.utils.data.TensorDataset(x, x.sum(dim=1)), batch_size=B)
    said = fit64([gns], AcrossTheBatch(), data, accumulate_grad_batches=2)
    assert not [m for m in said if "time-major" in m] and gns.skipped_steps == 0
    assert gns.compute()["gns/b_small"] == B and math.isfinite(gns.b_simple)


class CellLoop(TokenModel):
    """An ``nn.LSTMCell`` stepped over the positions (no batch_first=False layer to tell the layout): over ``h[t]``
    of time-major batches, or over ``h[:, t]`` of batch-first ones."""

    def __init__(self, batches: str) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.batches = batches
        self.embed, self.cell = nn.Embedding(VOCAB, WIDTH), nn.LSTMCell(WIDTH, WIDTH)
        self.decoder = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        steps = h.unbind(0) if self.batches == "time-major" else h.unbind(1)
        state = (h.new_zeros(steps[0].shape), h.new_zeros(steps[0].shape))
        outs = []
        for x in steps:
            state = self.cell(x, state)
            outs.append(state[0])
        return self.decoder(torch.stack(outs, dim=0 if self.batches == "time-major" else 1))


@pytest.mark.parametrize("batches", ["time-major", "batch-first"])
def test_a_cell_stepped_over_a_time_major_batch_couples_its_positions(batches: str) -> None:
    # Counted by its leading dimension, a time-major batch makes positions of the examples, and the recurrence
    # carries each "example" into the next: per_example measured the embedding and decoder, silently wrong. The
    # recurrence shows as a pairing of examples; batch-first, the same loop is measured exactly.
    model = CellLoop(batches).double()
    gns = GradientNoiseScale(mode="per_example", beta=0.8)
    recorder = BatchRecorder(gns)
    fit64([gns, recorder], model, token_batches(6, 4, batches == "time-major"))
    if batches == "time-major":
        assert set(gns.left_out) == set(param_names(model))
        assert all("pairs the examples" in gns.left_out[n] for n in param_names(model, ("cell.",)))
        assert gns.skipped_steps == 4
        return
    assert gns.left_out == {} and gns.skipped_steps == 0
    want = loop_reference_history(
        model, recorder.micro_batches, TokenModel.example_loss, param_names(model), lambda b: torch.ones(len(b[0])), 0.8
    )
    assert_histories_match(recorder.history, want)


class FairseqAttention(TokenModel):
    """A model that is time-major inside, as fairseq's (and transformers' FSMT's) attention is written: batch-first
    tokens, ``(T, B, d)`` projections, ``view(T, B * heads, d).transpose(0, 1)``, a batched product per head."""

    heads = 2

    def __init__(self, time_major: bool = True) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.time_major = time_major
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.q, self.k, self.v, self.out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.decoder = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        if not self.time_major:  # the same attention written batch-first: (B * heads, T, d / heads) products
            x = self.embed(tokens)
            b, t, d = x.shape

            def split(h: Tensor) -> Tensor:
                return h.view(b, t, self.heads, d // self.heads).transpose(1, 2).reshape(b * self.heads, t, -1)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            mixed = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)
            return self.decoder(x + self.out(mixed.view(b, self.heads, t, -1).transpose(1, 2).reshape(b, t, d)))
        x = self.embed(tokens).transpose(0, 1)  # (T, B, d)
        t, b, d = x.shape

        def heads(h: Tensor) -> Tensor:
            return h.contiguous().view(t, b * self.heads, d // self.heads).transpose(0, 1)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        mixed = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v)
        y = x + self.out(mixed.transpose(0, 1).contiguous().view(t, b, d))
        return self.decoder(y.transpose(0, 1))


def fsmt() -> nn.Module:
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    config = FSMTConfig(
        langs=["en", "de"], src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, d_model=8, encoder_layers=1,
        decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
        decoder_ffn_dim=16, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, use_cache=False,
        tie_word_embeddings=False,
    )  # fmt: skip
    return FSMTForConditionalGeneration(config)


def xlnet() -> nn.Module:
    from transformers import XLNetConfig, XLNetLMHeadModel

    config = XLNetConfig(
        vocab_size=VOCAB, d_model=8, n_layer=1, n_head=2, d_inner=16, dropout=0.0, mem_len=None, pad_token_id=0,
        bos_token_id=0, eos_token_id=0, use_mems_train=False,
    )  # fmt: skip
    return XLNetLMHeadModel(config)


class Transformers(TokenModel):
    """transformers' FSMT (``input_ids`` and ``decoder_input_ids``: the batch's tokens twice) or XLNet."""

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(10)
        self.name = name
        self.net = fsmt() if name == "fsmt" else xlnet()

    def forward(self, tokens: Tensor) -> Tensor:
        if self.name == "fsmt":
            return self.net(input_ids=tokens, decoder_input_ids=tokens).logits
        return self.net(input_ids=tokens).logits


def float64_fsmt_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers' FSMT fills its causal mask with float("-inf") * 1 in float32 and adds it in the model's dtype;
    # in float64 it overflows to NaN in the softmax of a padded row. Its own dtype's minimum is the same mask.
    import transformers.models.fsmt.modeling_fsmt as modeling

    monkeypatch.setattr(modeling, "fill_with_neg_inf", lambda t: t.fill_(torch.finfo(t.dtype).min))


@pytest.mark.parametrize("name", ["hand-written", "fsmt", "xlnet"])
@pytest.mark.parametrize("length", [B, 7])
def test_a_model_time_major_inside_is_left_out_where_its_positions_look_like_examples(
    name: str, length: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At T == B its (T, B, d) layers have the shape of a batch: split along the sequence, they were silently wrong
    # (FSMT and XLNet covered 30-100% of their parameters). Their attention multiplies along that dimension,
    # followed from the layers' outputs through views and transposes into the rows of a batched product, and the
    # layers right after their transpose take inputs whose examples are second: every layer is left out, the
    # reasons name the layout. At T != B the shapes decide, and the rest is exact.
    float64_fsmt_masks(monkeypatch)
    model = (FairseqAttention() if name == "hand-written" else Transformers(name)).double()
    if length == B and name == "hand-written":  # control: the same attention batch-first is measured, exactly
        control = FairseqAttention(time_major=False).double()
        fit_and_check_loop(control, token_batches(length, 3, False), ())
    gns = GradientNoiseScale(mode="per_example", beta=0.8)
    recorder = BatchRecorder(gns)
    fit64([gns, recorder], model, token_batches(length, 3, False))
    if length == B:
        assert set(gns.left_out) == set(param_names(model)) and gns.skipped_steps == 3
        time_major = {n for n, reason in gns.left_out.items() if "time-major inside" in reason}
        moved = {n for n, reason in gns.left_out.items() if "another dimension than the first" in reason}
        raw = {n for n, reason in gns.left_out.items() if reason.startswith("raw parameter")}  # XLNet's attention
        assert time_major and moved and time_major | moved | raw == set(gns.left_out) and (name == "xlnet" or not raw)
        return
    fit_and_check_loop(model, token_batches(length, 3, False), tuple(gns.left_out))


def fit_and_check_loop(model: ZooModule, data: DataLoader, left_out: tuple[str, ...]) -> GradientNoiseScale:
    """Fit in per_example mode: exactly ``left_out`` left out, the rest equal to the float64 loop reference."""
    gns = GradientNoiseScale(mode="per_example", beta=0.8)
    recorder = BatchRecorder(gns)
    fit64([gns, recorder], model, data)
    assert set(gns.left_out) == set(left_out) and gns.skipped_steps == 0
    kept = [n for n in param_names(model) if n not in gns.left_out]
    want = loop_reference_history(
        model, recorder.micro_batches, TokenModel.example_loss, kept, lambda b: torch.ones(len(b[0])), 0.8
    )
    assert_histories_match(recorder.history, want)
    return gns


class CharRNN(TokenModel):
    """PyTorch's char-RNN tutorial cell, ``h = tanh(i2h(cat([x_t, h], 1)))``, stepped over the positions of ``(T, B)``
    or ``(B, T)`` tokens (no batch_first=False layer), or its additive form ``tanh(w(x_t) + u(h))``."""

    def __init__(self, batches: str, form: str) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.batches, self.form = batches, form
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.i2h = nn.Linear(2 * WIDTH, WIDTH) if form == "cat" else None
        self.w, self.u = (nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)) if form == "add" else (None, None)
        self.decoder = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        steps = self.embed(tokens).unbind(0 if self.batches == "time-major" else 1)
        h, outs = steps[0].new_zeros(steps[0].shape), []
        for x in steps:
            if self.i2h is not None:
                h = torch.tanh(self.i2h(torch.cat([x, h], 1)))
            else:
                assert self.w is not None and self.u is not None
                h = torch.tanh(self.w(x) + self.u(h))
            outs.append(h)
        return self.decoder(torch.stack(outs, 0 if self.batches == "time-major" else 1))


@pytest.mark.parametrize("form", ["cat", "add"])
@pytest.mark.parametrize("length", [6, B])
def test_a_hand_written_recurrence_over_a_time_major_batch_couples_its_positions(form: str, length: int) -> None:
    # The layer before the loop (the embedding) was split along the positions, silently: at T != B for the cat
    # form (cat([x_t, h], 1) was taken for putting slices back together), at T == B for both (the first state
    # u(zeros) held no example's slice). Batch-first, the same loops are measured exactly.
    model = CharRNN("time-major", form).double()
    gns = GradientNoiseScale(mode="per_example", beta=0.8)
    fit64([gns], model, token_batches(length, 3, True))
    assert gns.skipped_steps == 3 and "embed.weight" in gns.left_out
    assert "pairs the examples" in gns.left_out["embed.weight"]
    fit_and_check_loop(CharRNN("batch-first", form).double(), token_batches(length, 3, False), ())


class TransposedProjection(TokenModel):
    """Longformer's and LED's attention input: the batch-first hidden states transposed to ``(T, B, d)`` before a
    projection, transposed back after it; nothing multiplies along the positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(12)
        self.embed, self.proj = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.decoder = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        return self.decoder(h + torch.tanh(self.proj(h.transpose(0, 1))).transpose(0, 1))


@pytest.mark.parametrize("length", [6, B])
def test_a_layer_on_examples_moved_off_the_first_dimension_is_left_out(length: int) -> None:
    # At T == B the projection's (T, B, d) input and output have the shape of a batch: it was measured along the
    # positions (transformers' Longformer and LED, silently wrong). Its input is followed back to the embedding's
    # batch-first output through the transpose: the examples are in its second dimension.
    model = TransposedProjection().double()
    gns = fit_and_check_loop(model, token_batches(length, 3, False), ("proj.weight", "proj.bias"))
    reason = gns.left_out["proj.weight"]
    assert ("another dimension than the first" in reason) == (length == B), reason


class TimeMajorInside(SequenceRegression):
    """A Linear on a (T, B, d) tensor that a batch-first model builds without a transpose: a stack of the positions'
    slices, a cat of them, or an index along the positions. At T == B its shape is a batch's."""

    def __init__(self, how: str) -> None:
        super().__init__(0.0)
        torch.manual_seed(0)
        self.how = how
        self.inp = nn.Linear(4, 4)
        self.time = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        steps = range(h.shape[1])
        if self.how == "stack":
            z = torch.stack(h.unbind(1))
        elif self.how == "cat":
            z = torch.cat([h[:, t : t + 1].transpose(0, 1) for t in steps])
        elif self.how == "index":
            z = h[:, torch.arange(h.shape[1])].transpose(0, 1)
        else:
            raise ValueError(self.how)
        return self.head(h + torch.tanh(self.time(z)).transpose(0, 1)).mean(dim=(1, 2))


@pytest.mark.parametrize("how", ["stack", "cat", "index"])
def test_a_time_major_layer_built_without_a_transpose_is_left_out_at_t_equal_b(how: str) -> None:
    """At T == B the time-major Linear was measured with positions taken for examples (B_simple off by up to 10x,
    nothing said, a probe): the examples' dimension was not followed through stack, cat or index. What stays measured
    is exact."""
    model = TimeMajorInside(how)
    gns = GradientNoiseScale(beta=0.8, mode="per_example")
    recorder = BatchRecorder(gns)
    fit64([gns, recorder], model, SequenceRegression.data(15, batch_size=3))
    assert {"time.weight", "time.bias"} <= set(gns.left_out)
    kept = [name for name in param_names(model) if name not in gns.left_out]
    assert "inp.weight" in kept
    want = reference_history(
        model, recorder.micro_batches, SequenceRegression.example_loss, lambda step: kept,
        lambda batch: torch.ones(len(batch[0])), beta=0.8,
    )  # fmt: skip
    assert_histories_match(recorder.history, want)
