"""Models and data shared by the tests: the closed-form linear-regression problem of the theory notes."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class LinearProblem:
    """x ~ N(0, I_dim), y = w_star . x + noise_std * N(0, 1); the model sits at w = w_star + offset."""

    def __init__(self, dim: int = 8, noise_std: float = 1.0, offset_norm: float = 1.0, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.noise_std = noise_std
        self.w_star = torch.randn(dim, generator=gen, dtype=torch.float64)
        offset = torch.randn(dim, generator=gen, dtype=torch.float64)
        self.offset = offset / offset.norm() * offset_norm
        self.w = self.w_star + self.offset

    @property
    def b_simple(self) -> float:
        """Closed form for per-example loss 0.5 (w.x - y)^2 with C = I: dim + 1 + dim s^2 / |d|^2."""
        d_sq = float(self.offset.square().sum())
        return self.dim + 1 + self.dim * self.noise_std**2 / d_sq

    @property
    def grad_sq_norm(self) -> float:
        return float(self.offset.square().sum())

    @property
    def trace_cov(self) -> float:
        d_sq = float(self.offset.square().sum())
        return (d_sq + self.noise_std**2) * self.dim + d_sq

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.dim, generator=gen, dtype=torch.float64)
        y = x @ self.w_star + self.noise_std * torch.randn(n, generator=gen, dtype=torch.float64)
        return x.float(), y.float()

    def mean_loss_grad(self, x: Tensor, y: Tensor) -> Tensor:
        """float64 gradient of the mean of 0.5 (w.x - y)^2 over the rows of x, at the model's w."""
        x, y = x.double(), y.double()
        return x.T @ (x @ self.w - y) / x.shape[0]


class LinearRegression(LightningModule):
    """0.5 * mean squared error of a bias-free linear model, trained with plain SGD."""

    def __init__(self, problem: LinearProblem, lr: float = 0.0) -> None:
        super().__init__()
        self.lr = lr
        self.linear = nn.Linear(problem.dim, 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(problem.w.float().unsqueeze(0))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return 0.5 * (self.linear(x).squeeze(-1) - y).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class ManualRegression(LinearRegression):
    """LinearRegression with manual optimization (``automatic_optimization = False``)."""

    def __init__(self, problem: LinearProblem) -> None:
        super().__init__(problem)
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return loss
