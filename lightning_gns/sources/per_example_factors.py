"""Per-example parameter gradients of common layers, kept factored, and their squared norms.

A layer's weight gradient for example ``i`` is a sum over positions ``t`` (tokens, pixels) of outer
products: for ``nn.Linear`` ``sum_t delta_it x_it^T`` with ``delta`` the gradient of the layer output.
Materialising it costs ``T d_in d_out`` per example; the Gram form
``|sum_t a_t b_t^T|^2 = sum_{t,s} (a_t . a_s)(b_t . b_s)`` costs ``T^2 (d_in + d_out)``. Each factor picks
the cheaper one (the "mixed ghost norm" of Bu et al., fastDP).

Factors are also what makes tied weights exact: when one parameter is used twice (an embedding reused
as the output layer, a module called twice), its per-example gradient is the *sum* of the uses, and
``|u + v|^2 = |u|^2 + |v|^2 + 2 <u, v>``; :func:`factor_inner` computes the cross term from the factors.
All functions return float32 ``(B,)`` tensors and never build a per-example gradient larger than the
parameter times the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_gns.sources.base import upcast_half


@dataclass
class Dense:
    """Per-example gradient ``sum_t a[:, t] b[:, t]^T`` with ``a`` (B, T, m) and ``b`` (B, T, n)."""

    a: Tensor
    b: Tensor


@dataclass
class OneHot:
    """Per-example gradient ``sum_t onehot(index[:, t]) b[:, t]^T``: an embedding's rows, index (B, T), b (B, T, n).

    ``rows`` is the embedding's row count when known: a small table's per-example gradient (B, rows, n) is
    then summed row by row instead of comparing every pair of positions.
    """

    index: Tensor
    b: Tensor
    rows: int | None = None


# Largest per-example gradient (B x rows x n elements) an embedding's norm is allowed to materialise.
MAX_MATERIALIZED_ELEMENTS = 1 << 26


@dataclass
class Materialized:
    """Per-example gradient held as a (B, P) tensor (cheap for normalisation layers and biases), or (B, rows, n).

    The (B, rows, n) form is a fused Linear's per-example weight gradient, kept unflattened so that an
    embedding tied to it can pick its rows.
    """

    value: Tensor


Factor = Dense | OneHot | Materialized


def _sq_sum(t: Tensor) -> Tensor:
    """Sum of squares over all but the first dimension, (B,): one fused reduction, no squared temporary."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1).square()


def _dot(u: Tensor, v: Tensor) -> Tensor:
    """Sum of ``u * v`` over all but the first dimension, (B,), without the product temporary."""
    return torch.linalg.vecdot(u.flatten(1), v.flatten(1))


def factor_sq_norm(factor: Factor) -> Tensor:
    """Per-example squared Frobenius norm of the factored gradient, shape (B,)."""
    if isinstance(factor, Materialized):
        return _sq_sum(upcast_half(factor.value))
    if isinstance(factor, Dense):
        a, b = upcast_half(factor.a), upcast_half(factor.b)
        t, m, n = a.shape[1], a.shape[2], b.shape[2]
        if t == 1:
            return _sq_sum(a) * _sq_sum(b)
        if t * (m + n) < m * n:
            return _dot(a @ a.transpose(1, 2), b @ b.transpose(1, 2))
        return _sq_sum(a.transpose(1, 2) @ b)
    b = upcast_half(factor.b)
    batch, t, n = b.shape
    rows = factor.rows
    # Scattering the positions' rows into (B, rows, n) costs B T n and a pass over B rows n; comparing all
    # pairs of positions costs B T^2 (n + 1).
    if rows is not None and rows * n < t * t * (n + 1) and batch * rows * n <= MAX_MATERIALIZED_ELEMENTS:
        full = b.new_zeros(batch, rows, n).scatter_add_(1, factor.index.unsqueeze(2).expand(-1, -1, n), b)
        return _sq_sum(full)
    same_row = factor.index.unsqueeze(2) == factor.index.unsqueeze(1)
    return _dot(b @ b.transpose(1, 2), same_row.to(b.dtype))


def factor_inner(u: Factor, v: Factor) -> Tensor:
    """Per-example inner product of two factored gradients of the same parameter, shape (B,)."""
    one_hot, full = (u, v) if isinstance(u, OneHot) else (v, u)
    if isinstance(one_hot, OneHot) and isinstance(full, Materialized) and full.value.dim() == 3:
        # (B, rows, n): the rows each one-hot position selects, against its b
        width = full.value.shape[2]
        rows = torch.gather(full.value, 1, one_hot.index.unsqueeze(2).expand(-1, -1, width))
        return _dot(upcast_half(rows), upcast_half(one_hot.b))
    if isinstance(u, Materialized) or isinstance(v, Materialized):
        return _dot(_materialize(u), _materialize(v))
    if isinstance(u, Dense) and isinstance(v, Dense):
        a_gram = upcast_half(u.a) @ upcast_half(v.a).transpose(1, 2)
        return _dot(a_gram, upcast_half(u.b) @ upcast_half(v.b).transpose(1, 2))
    if isinstance(u, OneHot) and isinstance(v, OneHot):
        same_row = u.index.unsqueeze(2) == v.index.unsqueeze(1)
        return (upcast_half(u.b) @ upcast_half(v.b).transpose(1, 2) * same_row).sum(dim=(1, 2))
    one_hot, dense = (u, v) if isinstance(u, OneHot) else (v, u)
    assert isinstance(one_hot, OneHot) and isinstance(dense, Dense)
    # dense.a (B, T, rows) selects the embedding row of each one-hot position s: a[:, t, index[:, s]].
    rows = torch.gather(
        upcast_half(dense.a), 2, one_hot.index.unsqueeze(1).expand(-1, dense.a.shape[1], -1)
    )  # (B, T_dense, T_onehot)
    return (rows * (upcast_half(dense.b) @ upcast_half(one_hot.b).transpose(1, 2))).sum(dim=(1, 2))


def _materialize(factor: Factor) -> Tensor:
    if isinstance(factor, Materialized):
        return upcast_half(factor.value)
    if isinstance(factor, Dense):
        return (upcast_half(factor.a).transpose(1, 2) @ upcast_half(factor.b)).flatten(1)
    raise NotImplementedError("an embedding gradient is never materialised per example (vocabulary x batch)")
