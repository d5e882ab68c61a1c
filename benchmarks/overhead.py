"""Training-step time overhead of the GradientNoiseScale callback, on CPU.

For each configuration the script trains the same MLP (784-1024-512-10, 1,333,770 parameters) with and
without the callback in short alternating fits (without/with, then with/without, ... so drift and order
effects cancel) and reports the median over repetitions. Only the callback differs between the two fits:
both get the same timing callback, data, optimizer (SGD, momentum 0.9) and Trainer flags.

Timed: ``perf_counter`` from ``on_train_batch_start`` (timer is the first callback, so the callback's own
``on_train_batch_start`` is inside) to the LightningModule's ``on_train_batch_end`` (which Lightning calls
after every callback's), summed over the micro-batches of an optimizer step. Per fit, the first steps are
discarded; the rest is cut into blocks of ``measure_every_n_steps`` steps (each block holds exactly one
measured step, so the cost is amortized honestly) and the median block mean is that fit's step time.

The floor is the time of one fused squared-norm pass over all gradients (``torch._foreach_norm``, then the
norm of the norms) relative to one plain-PyTorch training step (forward, backward and optimizer step on one
micro-batch; under DDP including its all-reduce), measured between the fits of the same run. "passes" is
the number of such passes per micro-batch the mode needs: one per small-batch gradient plus this rank's
share of one pass over the accumulated gradient per optimizer step.

``mode="ddp"`` runs in a subprocess (``--ddp-worker``) on 2 processes with gloo: Lightning's DDP strategy
re-executes that subprocess's command line for rank 1, so both ranks run the same sequence of fits.

Example: ``python benchmarks/overhead.py`` (about 4 minutes on 2 cores) or ``--reps 3 --steps 8`` for a smoke run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

import lightning_gns
from lightning_gns import GradientNoiseScale

LAYERS = (784, 1024, 512, 10)
WORLD_SIZE = 2
LR = 0.01
TARGET_RATIO_AT_512 = 1.02
TARGET_MARGIN_OVER_FLOOR = 0.01


@dataclass(frozen=True)
class Config:
    mode: Literal["microbatch", "per_example", "ddp"]  # one process, or WORLD_SIZE processes with gloo
    accumulation: int
    micro_batch: int  # per process
    every: int = 1  # measure_every_n_steps

    @property
    def world_size(self) -> int:
        return WORLD_SIZE if self.mode == "ddp" else 1

    @property
    def passes(self) -> float:
        """Norm passes per micro-batch: k small-batch passes plus this rank's share of the big-batch pass.

        per_example computes no small-batch gradient norm: its per-example norms come from the layers'
        inputs and output gradients (for these 2-D Linear layers, |x|^2 |dy|^2 per example: far cheaper than
        the layer's matmuls), so only the big-batch pass counts.
        """
        k = self.accumulation
        small = 0 if self.mode == "per_example" else k
        return (small + 1 / self.world_size) / k / self.every

    @property
    def label(self) -> str:
        if self.mode == "ddp":
            source = "comm hook" if self.accumulation == 1 else "param hooks"
            text = f"ddp, {WORLD_SIZE} proc gloo, k={self.accumulation} ({source})"
        else:
            text = f"{self.mode}, 1 proc, k={self.accumulation}"
        return text + (f", every {self.every} steps" if self.every > 1 else "")


@dataclass
class Measurement:
    """Per-fit step times (seconds per optimizer step) and floor samples (seconds) of one configuration."""

    config: Config
    without: list[float] = field(default_factory=list)
    with_gns: list[float] = field(default_factory=list)
    plain_step: list[float] = field(default_factory=list)
    norm_pass: list[float] = field(default_factory=list)


def make_mlp() -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(LAYERS):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def random_batches(micro_batch: int, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(micro_batch, LAYERS[0], generator=gen),
            torch.randint(0, LAYERS[-1], (micro_batch,), generator=gen),
        )
        for _ in range(count)
    ]


class CyclingBatches(Dataset):
    """``length`` ready-made batches, cycling through a few distinct ones (no collation cost, little memory)."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]], length: int) -> None:
        self.batches = batches
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.batches[index % len(self.batches)]


class StepTimer(Callback):
    """Wall time of each optimizer step: the sum of its micro-batches' on_train_batch_start -> end spans."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self._start = 0.0
        self._window = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Hooks run in list order: only as the first callback does the span include the GNS callback's hook.
        assert trainer.callbacks[0] is self, "StepTimer must be the first callback"  # type: ignore[attr-defined]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def batch_end(self, trainer: Trainer, batch_idx: int) -> None:
        """Called from the LightningModule's on_train_batch_end, which runs after every callback's."""
        self._window += time.perf_counter() - self._start
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.step_times.append(self._window)
            self._window = 0.0


class BenchModel(LightningModule):
    def __init__(self, timer: StepTimer) -> None:
        super().__init__()
        self.net = make_mlp()
        self.timer = timer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.timer.batch_end(self.trainer, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def rank() -> int:
    # Before the first DDP fit only the launched rank 1 knows its rank (from the environment).
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", "0"))


def fit_once(config: Config, with_gns: bool, warmup: int, steps: int, seed: int) -> float:
    """One short fit; returns its step time (seconds per optimizer step), see the module docstring."""
    torch.manual_seed(seed)  # same initial weights for both variants (DDP broadcasts rank 0's anyway)
    timer = StepTimer()
    model = BenchModel(timer)
    total_steps = warmup + steps
    batches = random_batches(config.micro_batch, count=4, seed=seed + 1000 * (1 + rank()))
    loader = DataLoader(CyclingBatches(batches, total_steps * config.accumulation), batch_size=None)
    callbacks: list[Callback] = [timer]
    if with_gns:
        callbacks.append(GradientNoiseScale(mode=config.mode, measure_every_n_steps=config.every))
    ddp = config.mode == "ddp"
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_steps=total_steps,
        accumulate_grad_batches=config.accumulation,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # each rank already has its own random batches
    )
    trainer.fit(model, loader)
    times = timer.step_times[warmup:]
    assert len(timer.step_times) == total_steps, f"expected {total_steps} steps, timed {len(timer.step_times)}"
    blocks = [statistics.fmean(times[i : i + config.every]) for i in range(0, len(times), config.every)]
    return statistics.median(blocks)


def time_floor(config: Config, iters: int, seed: int) -> tuple[list[float], list[float]]:
    """Plain-PyTorch micro-batch step times and fused norm-pass times, ``iters`` of each after 2 warm-ups."""
    torch.manual_seed(seed)
    net = make_mlp()
    # Under DDP one training step includes its gradient all-reduce; the process group exists after a fit.
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    x, y = random_batches(config.micro_batch, count=1, seed=seed + rank())[0]
    step_times: list[float] = []
    norm_times: list[float] = []
    for i in range(2 + iters):
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        mid = time.perf_counter()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2)))
        end = time.perf_counter()
        if i >= 2:
            step_times.append(mid - start)
            norm_times.append(end - mid)
    return step_times, norm_times


def run_configs(configs: list[Config], args: argparse.Namespace) -> list[Measurement]:
    results = []
    for index, config in enumerate(configs):
        # Round to whole measurement intervals so that every timed block holds exactly one measured step.
        warmup = math.ceil(args.warmup / config.every) * config.every
        steps = math.ceil(args.steps / config.every) * config.every
        result = Measurement(config)
        for rep in range(args.reps):
            seed = 1000 * index + rep
            # Alternate the order (AB, BA, ...) so a slow start or a drifting machine does not favour one side.
            for with_gns in (False, True) if rep % 2 == 0 else (True, False):
                step_time = fit_once(config, with_gns, warmup, steps, seed)
                (result.with_gns if with_gns else result.without).append(step_time)
            plain, norm = time_floor(config, args.floor_iters, seed)
            result.plain_step += plain
            result.norm_pass += norm
        if rank() == 0:
            print(f"  done: {config.label}, micro-batch {config.micro_batch}", file=sys.stderr, flush=True)
        results.append(result)
    return results


def single_process_configs() -> list[Config]:
    configs = [Config("microbatch", k, mb) for k in (2, 4) for mb in (128, 512)]
    configs += [Config("per_example", 1, mb) for mb in (128, 512)]
    # The interval on the configuration with the largest expected overhead (fewest micro-batches, smallest).
    return [*configs, Config("microbatch", 2, 128, every=4)]


def ddp_configs() -> list[Config]:
    return [Config("ddp", k, mb) for k in (1, 2) for mb in (128, 512)]


def quiet_lightning() -> None:
    # Both variants would print the same banners on every fit; only the table matters here.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*num_workers.*")


def run_ddp_subprocess(args: argparse.Namespace) -> list[Measurement]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        forwarded = ["--reps", str(args.reps), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        forwarded += ["--floor-iters", str(args.floor_iters)]
        # A clean environment: LOCAL_RANK etc. would make Lightning think the processes already exist.
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--ddp-worker", out, *forwarded], env=env, check=True
        )
        with open(out) as f:
            raw = json.load(f)
    return [Measurement(Config(**r.pop("config")), **r) for r in raw]


def ddp_worker(out: str, args: argparse.Namespace) -> None:
    """Runs on both ranks (rank 1 is this same command line, re-executed by Lightning)."""
    torch.set_num_threads(1)  # 2 processes on 2 cores
    results = run_configs(ddp_configs(), args)
    if rank() == 0:
        with open(out, "w") as f:
            json.dump([asdict(r) for r in results], f)
    dist.barrier()
    dist.destroy_process_group()


def verdict(config: Config, ratios: list[float], floor: float) -> str:
    """Judged on the median ratio; a miss that the lower quartile meets is marked as within this run's noise."""
    floor_limit = 1 + config.passes * floor + TARGET_MARGIN_OVER_FLOOR
    limits = {f"passes x floor + 1% = {floor_limit:.3f}": floor_limit}
    if config.micro_batch >= 512:
        limits[f"{TARGET_RATIO_AT_512}"] = TARGET_RATIO_AT_512
    ratio, q1 = statistics.median(ratios), quartiles(ratios)[0]
    misses = [
        f"> {name}" + (" (q1 meets it)" if q1 <= limit else "") for name, limit in limits.items() if ratio > limit
    ]
    return "**NO**: " + "; ".join(misses) if misses else "yes"


def quartiles(values: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def table(results: list[Measurement]) -> str:
    lines = [
        "| configuration | micro-batch | step time without (ms) | with (ms) | ratio [q1, q3] | floor"
        " | passes / micro-batch | passes x floor | target met? |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r.config
        ratios = [w / wo for w, wo in zip(r.with_gns, r.without, strict=True)]
        q1, q3 = quartiles(ratios)
        floor = statistics.median(r.norm_pass) / statistics.median(r.plain_step)
        lines.append(
            f"| {c.label} | {c.micro_batch} | {statistics.median(r.without) * 1e3:.1f}"
            f" | {statistics.median(r.with_gns) * 1e3:.1f} | {statistics.median(ratios):.3f} [{q1:.3f}, {q3:.3f}]"
            f" | {floor:.4f} | {c.passes:.3f} | {c.passes * floor:.4f} | {verdict(c, ratios, floor)} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the training-step time overhead of lightning_gns.GradientNoiseScale on CPU "
        "(alternating fits with and without the callback; prints a Markdown table).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=8, help="fit pairs (without, with) per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps discarded at the start of each fit")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per fit")
    parser.add_argument("--floor-iters", type=int, default=5, help="timed floor iterations after each fit pair")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the single-process runs")
    parser.add_argument("--skip-ddp", action="store_true", help="only the single-process (microbatch) runs")
    parser.add_argument("--skip-single", action="store_true", help="only the 2-process DDP runs")
    parser.add_argument("--ddp-worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    quiet_lightning()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args)
        return

    started = time.perf_counter()
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    results: list[Measurement] = []
    if not args.skip_single:
        results += run_configs(single_process_configs(), args)
    if not args.skip_ddp:
        results += run_ddp_subprocess(args)

    params = sum(p.numel() for p in make_mlp().parameters())
    print(
        f"\nMLP {'-'.join(map(str, LAYERS))} ({params:,} parameters), SGD(lr={LR}, momentum=0.9), random data."
        f"\nlightning_gns from {os.path.dirname(lightning_gns.__file__)}; torch {torch.__version__},"
        f" lightning {lightning.__version__}, {os.cpu_count()} CPUs;"
        f" single process: {args.threads} torch thread(s); ddp: {WORLD_SIZE} processes x 1 thread, gloo."
        f"\n{args.reps} alternating fit pairs per row, {args.warmup} warm-up + {args.steps} timed optimizer steps"
        " per fit (rounded up to whole measurement intervals).\n"
    )
    print(table(results))
    print(
        "\nStep time: per optimizer step (k micro-batches), median over fits. Ratio: median over the adjacent"
        " fit pairs of with/without; [q1, q3] are its quartiles, i.e. the noise of this run."
        "\nFloor: one fused gradient-norm pass / one plain micro-batch training step. Passes: norm passes per"
        " micro-batch the mode needs, (k + 1/processes) / k / measure_every_n_steps (per_example: 1 / k, its"
        " per-example norms come from layer inputs and output gradients, not from a gradient pass); compare"
        " ratio - 1 with passes x floor."
        f"\nTargets: ratio <= {TARGET_RATIO_AT_512} at micro-batch 512, and ratio <= 1 + passes x floor +"
        f" {TARGET_MARGIN_OVER_FLOOR:.0%} everywhere."
    )
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    print(
        f"\nTotal runtime {elapsed:.0f} s; 1-minute load average {load_before[0]:.2f} before,"
        f" {load_after[0]:.2f} after (above the CPU count means other processes competed for the cores)."
    )


if __name__ == "__main__":
    main()
