"""The one rule for half precision: reduce float16/bfloat16 in float32, float32 and float64 as they are."""

from __future__ import annotations

import pytest
import torch

from lightning_gns.sources.base import fp32_norm, reduction_dtype, upcast_half
from lightning_gns.sources.per_example_factors import Dense, factor_sq_norm


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
