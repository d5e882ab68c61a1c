"""A small sequence model whose Linear and LayerNorm layers take the fused per-example path, and its torch.func norms.

Shared by tests/test_per_example_fused.py and tests/support/fused_worker.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

from lightning_gns.sources.per_example_fused import LayerNormWithPerExampleGrads, LinearWithPerExampleGrads

VOCAB = 11

# The autograd node types of the fused functions' outputs.
_FUSED_NODES = {f"{cls.__name__}Backward" for cls in (LinearWithPerExampleGrads, LayerNormWithPerExampleGrads)}


def is_fused_output(out: Tensor) -> bool:
    """Whether ``out`` came from one of the fused per-example functions."""
    return out.grad_fn is not None and type(out.grad_fn).__name__ in _FUSED_NODES


class SeqModel(nn.Module):
    """Embedding tied to the output layer, an MLP whose Linear layers take the fused path, a LayerNorm."""

    def __init__(self, width: int = 5, checkpointed: bool = False, reentrant: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.checkpointed, self.reentrant = checkpointed, reentrant

    def block(self, h: Tensor) -> Tensor:
        h = h + self.down(torch.tanh(self.up(h)))
        return h + self.down(torch.tanh(self.up(h)))  # the same two layers again: cross terms

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        h = checkpoint(self.block, h, use_reentrant=self.reentrant) if self.checkpointed else self.block(h)
        return self.head(self.norm(h))


def sequence_loss(model: Any, tokens: Tensor) -> Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(dim=1)


def vmap_sq_norms(model: nn.Module, tokens: Tensor) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(params: dict[str, Tensor], example: Tensor) -> Tensor:
        return sequence_loss(lambda t: functional_call(model, params, (t,)), example.unsqueeze(0)).squeeze(0)

    grads = vmap(grad(one), in_dims=(None, 0))(params, tokens)
    return {n: g.flatten(1).square().sum(dim=1) for n, g in grads.items()}


def fused_layer_names(model: nn.Module) -> set[str]:
    """Filled during the next forwards with the Linear and LayerNorm layers whose output came from a fused function."""
    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)):

            def hook(m: nn.Module, args: Any, out: Tensor, name: str = name) -> None:
                if is_fused_output(out):
                    names.add(name)

            module.register_forward_hook(hook)
    return names
