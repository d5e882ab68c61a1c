"""2-process (gloo, CPU) check of the fused Linear path under DDP and FSDP2, run by tests/test_per_example_fused.py.

Each rank trains one step of a small float64 sequence model (tied embedding/output layer, Linear layers that
take the fused path, a LayerNorm) on its own examples, wrapped in DistributedDataParallel or sharded with
fully_shard, and compares: its per-example squared norms with torch.func on an unwrapped copy, and the
reduced gradient with the plain gradient of both ranks' examples. Writes rank{r}.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Run as a script: tests/ (the support package) and the repository root (lightning_gns) on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gns.sources import PerExampleSource
from support.multiprocess import end_process
from support.per_example_norms import pop_norms
from support.seq_model import SeqModel, fused_layer_names, sequence_loss, vmap_sq_norms

BATCH, LENGTH = 3, 12


def data(rank: int) -> torch.Tensor:
    return torch.randint(0, 11, (BATCH, LENGTH), generator=torch.Generator().manual_seed(100 + rank))


def run(rank: int, out: Path, wrap: str) -> None:
    # A file rendezvous: no port to race for with other tests.
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = SeqModel().double()
    reference = copy.deepcopy(model)
    if wrap == "ddp":
        wrapped: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        for layer in (model.up, model.down, model.norm):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
    source = PerExampleSource()
    source.attach(model, model.parameters())
    source.recording = True
    source.expected_examples = BATCH
    tokens = data(rank)
    fused = fused_layer_names(model)
    losses = sequence_loss(wrapped, tokens)
    losses.mean().backward()
    norms = pop_norms(source)
    assert norms is not None
    got = (norms * BATCH).square()
    want = sum(vmap_sq_norms(reference, tokens).values())
    # The reduced gradient: the plain gradient of the mean loss over both ranks' examples.
    sequence_loss(reference, torch.cat([data(0), data(1)])).mean().backward()
    grad_errors = {}
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grad_errors[name] = ((g - q.grad).abs().max() / q.grad.abs().max()).item()
    result = {
        "fused": sorted(fused),
        "norm_error": ((got - want).abs() / want).max().item(),
        "grad_errors": grad_errors,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    source.detach()
    end_process()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--wrap", choices=["ddp", "fsdp2"], required=True)
    args = parser.parse_args()
    mp.spawn(run, args=(args.out, args.wrap), nprocs=2, join=True)
    end_process()


if __name__ == "__main__":
    main()
