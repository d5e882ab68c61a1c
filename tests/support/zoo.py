"""Models users bring, as LightningModules with a per-example loss for the float64 reference.

Each module's ``example_loss(call, batch)`` is the mean loss of a batch of one example given ``call`` (the
model's forward with substituted parameters); ``training_step`` is the micro-batch loss as users write it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class Scale(nn.Module):
    """A user-written layer (the generic per-example path): ``x * weight``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class ZooModule(LightningModule):
    def __init__(self, lr: float = 0.0) -> None:
        super().__init__()
        self.lr = lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class PaddedTokenModel(ZooModule):
    """Embedding, LayerNorm, Linear head; batches of (tokens, mask) with lengths 2..T; loss = mean over real tokens."""

    def __init__(self, vocab: int = 11, width: int = 6, lr: float = 0.0) -> None:
        super().__init__(lr)
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.embed(tokens)))

    @staticmethod
    def token_losses(call: Any, tokens: Tensor, mask: Tensor) -> Tensor:
        logits = call(tokens[:, :-1])
        losses = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        return losses * mask[:, 1:]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, mask = batch
        return self.token_losses(self, tokens, mask).sum() / mask[:, 1:].sum()

    @classmethod
    def example_loss(cls, call: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
        tokens, mask = batch
        return cls.token_losses(call, tokens, mask).sum() / mask[:, 1:].sum()

    @staticmethod
    def units(batch: tuple[Tensor, Tensor]) -> Tensor:
        """Each example's predicted tokens (its mask without the first position)."""
        return batch[1][:, 1:].sum(dim=1)

    @staticmethod
    def data(examples: int, length: int = 16, vocab: int = 11, batch_size: int = 8, seed: int = 0) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(1, vocab, (examples, length), generator=gen)
        lengths = torch.randint(2, length + 1, (examples,), generator=gen)
        mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return DataLoader(TensorDataset(tokens * mask, mask), batch_size=batch_size)


class TinyGPT(ZooModule):
    """nanoGPT's shape: wte + wpe(arange(T)), pre-norm blocks with causal attention and MLP, tied lm_head."""

    def __init__(self, vocab: int = 13, width: int = 8, heads: int = 2, layers: int = 2, lr: float = 0.0) -> None:
        super().__init__(lr)
        torch.manual_seed(1)
        self.heads = heads
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(32, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "ln_1": nn.LayerNorm(width),
                    "c_attn": nn.Linear(width, 3 * width),
                    "c_proj": nn.Linear(width, width),
                    "ln_2": nn.LayerNorm(width),
                    "c_fc": nn.Linear(width, 4 * width),
                    "mlp_proj": nn.Linear(4 * width, width),
                }
            )
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.blocks:
            h = block["ln_1"](x)
            q, k, v = block["c_attn"](h).split(x.shape[-1], dim=2)
            q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, -1)
            x = x + block["c_proj"](y)
            x = x + block["mlp_proj"](F.gelu(block["c_fc"](block["ln_2"](x))))
        return self.lm_head(self.ln_f(x))

    @staticmethod
    def example_loss(call: Any, tokens: Tensor) -> Tensor:
        logits = call(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.example_loss(self, batch)

    @staticmethod
    def data(examples: int, length: int = 9, vocab: int = 13, batch_size: int = 4, seed: int = 0) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(torch.randint(0, vocab, (examples, length), generator=gen), batch_size=batch_size)


class SequenceRegression(ZooModule):
    """Sequences of 3 vectors of width 4, a scalar target per sequence, squared error."""

    @staticmethod
    def example_loss(call: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return (call(x) - y).square().mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.example_loss(self, batch)

    @staticmethod
    def data(examples: int, batch_size: int = 4) -> DataLoader:
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(examples, 3, 4, generator=gen)
        return DataLoader(TensorDataset(x, x.sum(dim=(1, 2)) * 0.1), batch_size=batch_size)


class FlattenedTokensModel(SequenceRegression):
    """A Linear applied to tokens flattened to (B*T, d): its leading dimension is not the batch."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__(lr)
        torch.manual_seed(2)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = torch.tanh(self.proj(x.reshape(b * t, d))).reshape(b, t, d)
        return self.head(h).mean(dim=(1, 2))


class AttentionModel(SequenceRegression):
    """nn.MultiheadAttention: its out_proj's weight is used functionally, so the layer is replayed whole."""

    def __init__(self, lr: float = 0.0) -> None:
        super().__init__(lr)
        torch.manual_seed(4)
        self.embed = nn.Linear(4, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.head(h).mean(dim=(1, 2))


class BatchNormCNN(ZooModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr)
        torch.manual_seed(5)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    @staticmethod
    def data(examples: int = 64, batch_size: int = 8) -> DataLoader:
        gen = torch.Generator().manual_seed(6)
        x = torch.randn(examples, 1, 6, 6, generator=gen)
        return DataLoader(TensorDataset(x, torch.randint(0, 3, (examples,), generator=gen)), batch_size=batch_size)
