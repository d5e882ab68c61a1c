"""The one rule for half precision: reduce float16/bfloat16 in float32, float32 and float64 as they are."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import GradientNoiseScale
from lightning_gns.sources.base import fp32_norm, reduction_dtype, upcast_half
from lightning_gns.sources.per_example_factors import Dense, factor_sq_norm
from support.trainers import make_trainer


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, None), (torch.float64, None)],
)
def test_reduction_dtype(dtype: torch.dtype, expected: torch.dtype | None) -> None:
    assert reduction_dtype(dtype) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upcast_half_leaves_full_precision_alone_without_a_copy(dtype: torch.dtype) -> None:
    t = torch.randn(5, dtype=dtype)
    assert upcast_half(t) is t


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_reduced_in_float32(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(4096, generator=gen).to(dtype)
    exact = t.double().norm()
    up = upcast_half(t)
    assert up.dtype == torch.float32 and torch.equal(up.double(), t.double())
    norm = fp32_norm(t)
    assert norm.dtype == torch.float32
    assert norm.double() == pytest.approx(exact.item(), rel=1e-6)
    # The factored per-example norms take the same rule: float32 results, exact to float32 rounding.
    a, b = torch.randn(2, 3, 4, generator=gen).to(dtype), torch.randn(2, 3, 5, generator=gen).to(dtype)
    sq = factor_sq_norm(Dense(a, b))
    expected = torch.einsum("btm,btn->bmn", a.double(), b.double()).flatten(1).square().sum(dim=1)
    assert sq.dtype == torch.float32
    torch.testing.assert_close(sq.double(), expected, rtol=1e-5, atol=0.0)


def test_full_precision_norm_is_the_plain_norm() -> None:
    t = torch.randn(100, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert fp32_norm(t).dtype == torch.float64
    assert torch.equal(fp32_norm(t), torch.linalg.vector_norm(t))


class EmbeddedLSTM(LightningModule):
    """A Linear (run in bf16 under autocast) feeding an LSTM: the LSTM's input arrives in bf16."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.rnn, self.head = (
            torch.nn.Linear(4, 8),
            torch.nn.LSTM(8, 8, batch_first=True),
            torch.nn.Linear(8, 1),
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        h = self.rnn(torch.tanh(self.inp(x)))[0]
        return torch.nn.functional.mse_loss(self.head(h[:, -1]).squeeze(-1).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_an_lstm_fed_half_precision_under_bf16_autocast_is_measured() -> None:
    """Its replay ran the bf16 input against float32 weights and failed: the LSTM was left out (coverage 14% in
    a probe). It replays in the weights' dtype now, within bf16's rounding of the float32 run."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, 4, generator=generator), torch.randn(64, generator=generator)
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        gns = GradientNoiseScale(mode="per_example", beta=0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer([gns], precision=precision, max_steps=6).fit(
                EmbeddedLSTM(), DataLoader(TensorDataset(x, y), batch_size=16)
            )
        assert gns.left_out == {}, gns.left_out
        results[precision] = gns.trace_cov
    assert results["bf16-mixed"] == pytest.approx(results["32-true"], rel=0.05)
