"""Training-step time overhead of the GradientNoiseScale callback, on CPU, measured in pairs of nearby steps.

A 2-core machine shared with others drifts by tens of percent within seconds, so the ratio of two whole fits
mostly measures the drift. Every ratio here compares steps that ran close together instead (helpers in
benchmarks/paired.py):

* measured / idle neighbours: with ``measure_every_n_steps=2``, measured and idle optimizer steps alternate;
  each measured step's time is divided by the mean of the idle steps just before and after it. This is the
  cost of measuring (norm passes, estimator update) over a step whose hooks are idle.
* idle / no callback: fits with the callback (every 2) and without it alternate, W0 G0 W1 G1 ... Wn, each a
  few seconds long; the median idle step of G_i is divided by the mean of the median steps of W_i and
  W_{i+1}. This is the cost of the idle hooks (callback hooks, tensor hooks that return at once).

Their product estimates the step time ratio when measuring every step (``measure_every_n_steps=1``), and
``idle x (1 + (measured - 1) / n)`` that when measuring every n-th step. Medians and quartiles [q1, q3] are
over the samples (the number of samples in parentheses); the quartiles are this run's noise.

Model: an MLP (784-1024-512-10, 1,333,770 parameters), SGD (momentum 0.9), random data; every fit builds
the same model from the same seed. Timed: ``perf_counter`` from the first micro-batch's
``on_train_batch_start`` (first callback) to the last micro-batch's ``on_train_batch_end`` (last callback),
so the span holds every hook of the callback and the optimizer step; the first ``--warmup`` steps of each
fit are dropped.

The floor is the time of one fused squared-norm pass over all gradients (``torch._foreach_norm``) relative
to the plain-PyTorch training step just before it (forward, backward and optimizer step on one micro-batch;
under DDP including its all-reduce), measured between fits. "passes" is the number of such passes per
micro-batch a measured step needs: one per small-batch gradient plus this rank's share of one pass over the
accumulated gradient, so a measured step should cost about ``1 + passes x floor`` idle steps.

``mode="ddp"`` runs in a subprocess (``--ddp-worker``) on 2 processes with gloo (1 thread each): Lightning's
DDP strategy re-executes that subprocess's command line for rank 1, so both ranks run the same sequence of
fits; the times are rank 0's.

Example: ``nice -n 10 python benchmarks/overhead.py`` (a few minutes on 2 cores) or ``--quick`` (seconds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal

# This checkout's lightning_gns (not whichever one is installed), and the helpers next to this script.
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import lightning  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from paired import StepTimer, floor_ratios, idle_steps, idle_vs_without, measured_vs_idle, summary  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import lightning_gns  # noqa: E402
from lightning_gns import GradientNoiseScale  # noqa: E402

LAYERS = (784, 1024, 512, 10)
WORLD_SIZE = 2
LR = 0.01
EVERY = 2  # measured and idle steps alternate
TARGET_RATIO_AT_512 = 1.02  # every-step estimate at micro-batch 512
TARGET_MARGIN_OVER_FLOOR = 0.01  # measured / idle <= 1 + passes x floor + this


@dataclass(frozen=True)
class Config:
    mode: Literal["microbatch", "per_example", "ddp"]  # one process, or WORLD_SIZE processes with gloo
    accumulation: int
    micro_batch: int  # per process

    @property
    def world_size(self) -> int:
        return WORLD_SIZE if self.mode == "ddp" else 1

    @property
    def passes(self) -> float:
        """Norm passes per micro-batch of a measured step: k small-batch passes plus this rank's share of the big one.

        per_example computes no small-batch gradient norm: its per-example norms come from the layers'
        inputs and output gradients (for these 2-D Linear layers, |x|^2 |dy|^2 per example: far cheaper than
        the layer's matmuls), so only the big-batch pass counts.
        """
        k = self.accumulation
        small = 0 if self.mode == "per_example" else k
        return (small + 1 / self.world_size) / k

    @property
    def label(self) -> str:
        if self.mode == "ddp":
            source = "comm hook" if self.accumulation == 1 else "param hooks"
            return f"ddp, {WORLD_SIZE} proc gloo, k={self.accumulation} ({source})"
        return f"{self.mode}, 1 proc, k={self.accumulation}"


@dataclass
class Measurement:
    """Samples of one configuration: ratios (see the module docstring) and step times in seconds."""

    config: Config
    measured_vs_idle: list[float] = field(default_factory=list)
    idle_vs_without: list[float] = field(default_factory=list)
    without: list[float] = field(default_factory=list)  # median step of each fit without the callback
    floor: list[float] = field(default_factory=list)


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


class BenchModel(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def rank() -> int:
    # Before the first DDP fit only the launched rank 1 knows its rank (from the environment).
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", "0"))


def fit_once(config: Config, with_gns: bool, warmup: int, steps: int, seed: int) -> dict[int, float]:
    """One short fit; returns the time (seconds) of each optimizer step after the warm-up, by step index."""
    torch.manual_seed(seed)  # same initial weights for both variants (DDP broadcasts rank 0's anyway)
    timer = StepTimer()
    model = BenchModel()
    total_steps = warmup + steps
    batches = random_batches(config.micro_batch, count=4, seed=seed + 1000 * (1 + rank()))
    loader = DataLoader(CyclingBatches(batches, total_steps * config.accumulation), batch_size=None)
    gns: list[Callback] = [GradientNoiseScale(mode=config.mode, measure_every_n_steps=EVERY)] if with_gns else []
    ddp = config.mode == "ddp"
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE if ddp else 1,
        strategy="ddp" if ddp else "auto",
        max_steps=total_steps,
        accumulate_grad_batches=config.accumulation,
        callbacks=[timer.first, *gns, timer.last],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # each rank already has its own random batches
    )
    trainer.fit(model, loader)
    assert len(timer.times) == total_steps, f"expected {total_steps} steps, timed {len(timer.times)}"
    return timer.by_step(skip=warmup)


def time_floor(config: Config, iters: int, seed: int) -> list[float]:
    """Fused norm pass over the gradients / the plain-PyTorch micro-batch step before it, per iteration."""
    torch.manual_seed(seed)
    net = make_mlp()
    # Under DDP one training step includes its gradient all-reduce; the process group exists after a fit.
    model: nn.Module = nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    x, y = random_batches(config.micro_batch, count=1, seed=seed + rank())[0]

    def step() -> list[Tensor]:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return [p.grad for p in net.parameters() if p.grad is not None]

    return floor_ratios(step, iters)


def run_configs(configs: list[Config], args: argparse.Namespace) -> list[Measurement]:
    results = []
    for index, config in enumerate(configs):
        result = Measurement(config)
        idle_medians: list[float] = []
        # W0 G0 W1 G1 ... Wn: each fit with the callback sits between two fits without it.
        for pair in range(args.reps + 1):
            seed = 1000 * index + pair
            result.without.append(statistics.median(fit_once(config, False, args.warmup, args.steps, seed).values()))
            if pair == args.reps:
                break
            by_step = fit_once(config, True, args.warmup, args.steps, seed)
            idle_medians.append(statistics.median(idle_steps(by_step, EVERY)))
            result.measured_vs_idle += measured_vs_idle(by_step, EVERY)
            result.floor += time_floor(config, args.floor_iters, seed)
        result.idle_vs_without = idle_vs_without(idle_medians, result.without)
        if rank() == 0:
            print(f"  done: {config.label}, micro-batch {config.micro_batch}", file=sys.stderr, flush=True)
        results.append(result)
    return results


def single_process_configs(quick: bool) -> list[Config]:
    if quick:
        return [Config("microbatch", 2, 128), Config("per_example", 1, 128)]
    configs = [Config("microbatch", k, mb) for k in (2, 4) for mb in (128, 512)]
    return configs + [Config("per_example", 1, mb) for mb in (128, 512)]


def ddp_configs(quick: bool) -> list[Config]:
    return [Config("ddp", 1, mb) for mb in ((128,) if quick else (128, 512))]


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
        forwarded += ["--floor-iters", str(args.floor_iters)] + (["--quick"] if args.quick else [])
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
    results = run_configs(ddp_configs(args.quick), args)
    if rank() == 0:
        with open(out, "w") as f:
            json.dump([asdict(r) for r in results], f)
    dist.barrier()
    dist.destroy_process_group()


def every_n(idle: float, measured: float, n: int) -> float:
    """Step time ratio to no callback when measuring every n-th step."""
    return idle * (1 + (measured - 1) / n)


def verdict(r: Measurement) -> str:
    """Judged on medians; a miss that the lower quartile meets is marked as within this run's noise."""
    c = r.config
    floor = statistics.median(r.floor)
    checks = [(r.measured_vs_idle, 1 + c.passes * floor + TARGET_MARGIN_OVER_FLOOR, "measured / idle")]
    if c.micro_batch >= 512:
        every_step = [every_n(i, statistics.median(r.measured_vs_idle), 1) for i in r.idle_vs_without]
        checks.append((every_step, TARGET_RATIO_AT_512, "every step"))
    misses = []
    for values, limit, what in checks:
        if statistics.median(values) > limit:
            q1 = statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) > 1 else values[0]
            misses.append(f"{what} > {limit:.3f}" + (" (q1 meets it)" if q1 <= limit else ""))
    return "**NO**: " + "; ".join(misses) if misses else "yes"


def table(results: list[Measurement]) -> str:
    lines = [
        "| configuration | micro-batch | step without (ms) | measured / idle neighbours [q1, q3] (n)"
        " | idle / no callback [q1, q3] (n) | floor | passes | 1 + passes x floor | every step (est.)"
        " | every 2 (est.) | target met? |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r.config
        floor = statistics.median(r.floor)
        measured, idle = statistics.median(r.measured_vs_idle), statistics.median(r.idle_vs_without)
        lines.append(
            f"| {c.label} | {c.micro_batch} | {statistics.median(r.without) * 1e3:.1f}"
            f" | {summary(r.measured_vs_idle)} | {summary(r.idle_vs_without)} | {floor:.4f} | {c.passes:.3f}"
            f" | {1 + c.passes * floor:.4f} | {every_n(idle, measured, 1):.3f} | {every_n(idle, measured, 2):.3f}"
            f" | {verdict(r)} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the training-step time overhead of lightning_gns.GradientNoiseScale on CPU "
        "(step-level paired ratios; prints a Markdown table).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=4, help="fits with the callback per configuration (n+1 without)")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps dropped at the start of each fit")
    parser.add_argument("--steps", type=int, default=12, help="timed optimizer steps per fit")
    parser.add_argument("--floor-iters", type=int, default=4, help="timed floor iterations after each fit pair")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the single-process runs")
    parser.add_argument("--skip-ddp", action="store_true", help="only the single-process runs")
    parser.add_argument("--skip-single", action="store_true", help="only the 2-process DDP runs")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: micro-batch 128, 1 fit pair of 4 steps, no DDP unless --skip-single",
    )
    parser.add_argument("--ddp-worker", metavar="OUT_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.reps, args.warmup, args.steps, args.floor_iters = 1, 1, 4, 2
    return args


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
        results += run_configs(single_process_configs(args.quick), args)
    if not args.skip_ddp and not (args.quick and not args.skip_single):
        results += run_ddp_subprocess(args)

    params = sum(p.numel() for p in make_mlp().parameters())
    print(
        f"\nMLP {'-'.join(map(str, LAYERS))} ({params:,} parameters), SGD(lr={LR}, momentum=0.9), random data."
        f"\nlightning_gns from {os.path.dirname(lightning_gns.__file__)}; torch {torch.__version__},"
        f" lightning {lightning.__version__}, {os.cpu_count()} CPUs;"
        f" single process: {args.threads} torch thread(s); ddp: {WORLD_SIZE} processes x 1 thread, gloo."
        f"\nPer configuration: {args.reps} fits with the callback (measure_every_n_steps={EVERY}) between"
        f" {args.reps + 1} without, each {args.warmup} warm-up + {args.steps} timed optimizer steps.\n"
    )
    print(table(results))
    print(
        "\nStep without: median optimizer step (k micro-batches) of the fits without the callback."
        " Measured / idle neighbours: each measured step over the mean of the idle steps before and after it."
        " Idle / no callback: median idle step of a fit with the callback over the mean of the median steps of"
        " the fits without it just before and after. Median [q1, q3] (samples)."
        "\nFloor: one fused gradient-norm pass / one plain micro-batch training step. Passes: norm passes per"
        " micro-batch of a measured step, (k + 1/processes) / k (per_example: 1 / k, its per-example norms come"
        " from layer inputs and output gradients, not from a gradient pass); a measured step should cost about"
        " 1 + passes x floor idle steps."
        "\nEvery step (est.) = idle x measured; every 2 (est.) = idle x (1 + (measured - 1) / 2): the step time"
        " ratio to no callback with measure_every_n_steps = 1 or 2."
        f"\nTargets: measured / idle <= 1 + passes x floor + {TARGET_MARGIN_OVER_FLOOR:.0%}, and every step <="
        f" {TARGET_RATIO_AT_512} at micro-batch 512."
    )
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    print(
        f"\nTotal runtime {elapsed:.0f} s; 1-minute load average {load_before[0]:.2f} before,"
        f" {load_after[0]:.2f} after (above the CPU count means other processes competed for the cores)."
    )


if __name__ == "__main__":
    main()
