"""No host synchronisation from the package on steps that do not log.

On CUDA, reading a device value on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``)
waits for the GPU, and so do ``torch.tensor(python_values, device=cuda)`` and item assignment of a host number
(``t[i] = 3.0`` copies a host scalar to the device and waits; ``t[i].fill_(3.0)`` does not). This test records
every such call made from lightning_gns code during training without a logger; there must be none after setup.
"""

from __future__ import annotations

import pytest
import torch

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from support.models import LinearProblem, LinearRegression, loader
from support.syncs import SyncWatcher, record_package_syncs
from support.trainers import make_trainer


@pytest.mark.parametrize(
    ("mode", "accumulate", "per_layer"),
    [("microbatch", 2, False), ("per_example", 1, False), ("per_example", 2, True)],
)
def test_no_host_sync_on_steps_that_do_not_log(mode: str, accumulate: int, per_layer: bool) -> None:
    problem = LinearProblem(dim=4, seed=60)
    x, y = problem.sample(8 * accumulate * 12, seed=61)
    gns = GradientNoiseScale(beta=0.9, mode=mode, per_layer=per_layer)  # type: ignore[arg-type]
    watcher = SyncWatcher()
    # The watcher first: its on_train_end stops recording before the callback's end-of-training check reads.
    make_trainer([watcher, gns], accumulate_grad_batches=accumulate).fit(
        LinearRegression(problem, lr=0.1), loader(x, y, 8)
    )
    assert watcher.context is not None
    assert int(gns.metric.measured_steps) == 12
    assert dict(watcher.calls) == {}


def test_adaptive_batch_size_reads_no_count_on_steps_that_neither_log_nor_decide() -> None:
    """AdaptiveBatchSize adds every micro-batch's units (here a tensor, as attention_mask.sum() gives) on the device;
    it reads their mean on logging and deciding steps only (none here: no logger, no decision in the run)."""
    problem = LinearProblem(dim=4, seed=62)
    x, y = problem.sample(8 * 2 * 12, seed=63)
    gns = GradientNoiseScale(beta=0.9, batch_size_fn=lambda batch: torch.ones(len(batch[0]), dtype=torch.long))
    adaptive = AdaptiveBatchSize(warmup_steps=1000)
    watcher = SyncWatcher()
    make_trainer([watcher, gns, adaptive], accumulate_grad_batches=2).fit(
        LinearRegression(problem, lr=0.1), loader(x, y, 8)
    )
    assert watcher.context is not None
    assert int(gns.metric.measured_steps) == 12 and adaptive.micro_batch_size == 8.0
    assert dict(watcher.calls) == {}


def test_the_watcher_sees_a_sync() -> None:
    """The recorder itself works: reading the callback's float property syncs, from package code."""
    gns = GradientNoiseScale()
    with record_package_syncs() as calls:
        _ = gns.b_simple
    assert any(key.startswith("__float__") for key in calls)


def test_the_watcher_sees_a_host_value_assigned_into_a_tensor() -> None:
    """Item assignment of a host number is recorded (a copy and a wait on CUDA); a tensor value is not."""
    from lightning_gns import tracker as tracker_module

    buffer = torch.zeros(3)
    with record_package_syncs() as calls:
        exec(compile("buffer[0] = 1.0\nbuffer[1] = buffer[2]", tracker_module.__file__, "exec"), {"buffer": buffer})
    assert sum(calls.values()) == 1 and next(iter(calls)).startswith("__setitem__ of a host value"), calls


def test_tracker_to_moves_the_per_example_bookkeeping() -> None:
    """``to(device)`` after ``attach`` moves every tensor the step uses (on CUDA a CPU leftover crashed the step)."""
    from torch import nn

    from lightning_gns.tracker import GradientNoiseScaleTracker

    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    tracker = GradientNoiseScaleTracker()
    tracker.attach(model.parameters(), mode="per_example", model=model)
    tracker.to("meta")
    owners = {"tracker": tracker, "bookkeeping": tracker._book}
    tensors = {
        f"{owner}.{name}": value
        for owner, holder in owners.items()
        for name, value in vars(holder).items()
        if isinstance(value, torch.Tensor)
    }
    assert tensors and {name: t.device.type for name, t in tensors.items()} == dict.fromkeys(tensors, "meta")
