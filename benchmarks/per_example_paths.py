"""Cost of the per-example paths beyond Linear/Embedding/LayerNorm: HF Conv1D and the generic torch.func replay.

For each small model, a training step (``zero_grad``, forward, mean loss, ``backward``, SGD step) without
the per-example source is paired with the same step with it recording (``PerExampleSource`` attached, its
norms popped after ``backward``), on the same batch, order alternating from round to round; reported is the
median [q1, q3] over rounds of the ratio measured step / plain step (CPU, float32). The models:

* ``linear MLP`` and ``Conv1D MLP``: the same two-layer MLP on sequences, once with ``nn.Linear`` and once
  with ``transformers``' ``Conv1D`` (GPT-2's layer): the fused path should cost the same for both.
* ``LSTM``: one ``nn.LSTM`` and an output layer (the LSTM goes through the generic replay).
* ``attention``: ``nn.MultiheadAttention`` (generic replay) between two Linear layers.
* ``custom RMSNorm``: a user-written norm module (generic replay) in a Linear MLP.
* ``weight_norm MLP``: the Linear MLP with ``parametrizations.weight_norm`` on both layers (generic replay).

Before timing, each model's per-example norms are checked against a per-example autograd loop on the same
device (float32, relative 1e-3). Example: ``nice -n 10 python benchmarks/per_example_paths.py --rounds 30``;
on a GPU ``--device cuda`` (cuDNN's recurrent and attention kernels, which the CPU runs do not exercise).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_gns.sources import PerExampleSource
from tests.support.per_example_norms import pop_norms

BATCH, TOKENS, WIDTH = 16, 64, 128


class MLP(nn.Module):
    def __init__(self, layer: Callable[[int, int], nn.Module], norm: nn.Module | None = None) -> None:
        super().__init__()
        self.up, self.down = layer(WIDTH, 4 * WIDTH), layer(4 * WIDTH, WIDTH)
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(self.norm(x))))


class RMSNormModule(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)


class LSTMLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(WIDTH, WIDTH, batch_first=True)
        self.head = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0])


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 4, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        return self.out(self.attn(h, h, h, need_weights=False)[0])


def conv1d(d_in: int, d_out: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(d_out, d_in)


def models() -> dict[str, nn.Module]:
    weight_norm = nn.utils.parametrizations.weight_norm
    return {
        "linear MLP": MLP(nn.Linear),
        "Conv1D MLP": MLP(conv1d),
        "LSTM": LSTMLM(),
        "attention": Attention(),
        "custom RMSNorm": MLP(nn.Linear, RMSNormModule(WIDTH)),
        "weight_norm MLP": MLP(lambda i, o: weight_norm(nn.Linear(i, o))),
    }


def check(model: nn.Module, x: Tensor) -> float:
    """Largest relative difference between the source's per-example norms and a per-example autograd loop."""
    source = PerExampleSource()
    source.attach(model, model.parameters())
    source.recording = True
    source.expected_examples = x.shape[0]
    model.zero_grad(set_to_none=True)
    model(x).square().flatten(1).mean(dim=1).mean().backward()
    got = pop_norms(source)
    source.detach()
    assert got is not None
    got = got * x.shape[0]  # the source sees each example's 1/B share of the mean loss
    covered = source.covered_params()
    want = torch.stack(
        [
            torch.linalg.vector_norm(
                torch.cat([g.flatten() for g in torch.autograd.grad(model(x[i : i + 1]).square().mean(), covered)])
            )
            for i in range(x.shape[0])
        ]
    )
    return float(((got - want).abs() / want).max())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step(model: nn.Module, x: Tensor, source: PerExampleSource | None) -> float:
    sync(x.device)
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    if source is not None:
        norms = pop_norms(source)
        assert norms is not None and bool(torch.isfinite(norms).all())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-1e-4)
    sync(x.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: each model's norms are checked there first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    for name, plain in models().items():
        plain.to(device)
        worst = check(copy.deepcopy(plain), torch.randn(4, TOKENS, WIDTH, device=device))
        assert worst < 1e-3, f"{name}: per-example norms differ from the autograd loop by {worst:.1e}"
        measured = copy.deepcopy(plain)
        source = PerExampleSource()
        source.attach(measured, measured.parameters())
        source.recording = True
        source.expected_examples = BATCH
        total = sum(p.numel() for p in measured.parameters())
        ratios = []
        for r in range(args.rounds + 3):
            x = torch.randn(BATCH, TOKENS, WIDTH, device=device)
            pair: list[tuple[nn.Module, PerExampleSource | None]] = [(plain, None), (measured, source)]
            times = {}
            for model, src in pair if r % 2 else pair[::-1]:
                times[src is not None] = step(model, x, src)
            if r >= 3:  # warm-up rounds
                ratios.append(times[True] / times[False])
        covered = sum(p.numel() for p in source.covered_params()) / total
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(
            f"{name:16s} measured/plain step {statistics.median(ratios):.2f} [{q1:.2f}, {q3:.2f}]"
            f" ({len(ratios)} rounds), covered {covered:.3f}, norms within {worst:.0e} of an autograd loop"
        )
        source.detach()


if __name__ == "__main__":
    main()
