"""Cost of ``mode="per_example"`` on a small GPT: step time and peak memory against plain training and vmap.

The model is a nanoGPT-style decoder (byte vocabulary of 256, learned position embedding, pre-LayerNorm
blocks with causal self-attention and a GELU MLP, final LayerNorm, output layer tied to the token
embedding). Every parameter belongs to an ``nn.Linear``, ``nn.Embedding`` or ``nn.LayerNorm``, so the
per-example source covers all of them (the script checks ``covered_fraction == 1``). Attention is written
out (``q @ k^T``, causal mask, softmax, ``@ v``) rather than calling ``scaled_dot_product_attention``,
whose CPU kernel has no vmap batching rule and would make the vmap column unfairly slow. Training data:
windows of the bytes of Python standard-library source files; AdamW; CPU; one plain PyTorch loop.

Five variants, each with its own copy of the same initial model and optimizer:

* ``plain``: ``zero_grad``, forward, mean next-token cross entropy, ``backward``, ``optimizer.step()``.
* ``per_example, layers="all"`` / ``layers="norm"``: the same step with a ``GradientNoiseScaleTracker``
  (``mode="per_example"``) around it, measuring every step: ``start_micro_batch`` before the forward,
  ``end_micro_batch`` after ``backward`` (the per-example norms are computed inside the backward by the
  source's hooks), ``measure_step`` before ``optimizer.step()`` (big-batch norm and the estimator update).
* ``per_example, layers="all", measure_every_n_steps=4``: the same tracker measuring every 4th step
  (``start_micro_batch(..., measure=False)`` otherwise, which leaves the hooks idle); its step time is the
  mean over whole intervals of 4 steps, so the measured step's cost is spread over the interval.
* ``torch.func vmap``: the plain step plus, between ``backward`` and ``optimizer.step()``, the per-example
  squared gradient norms over all parameters from ``vmap(grad(per-example loss))`` with
  ``functional_call`` (per-example gradients materialised, then squared and summed). vmap gives only the
  norms, so the model still needs its ordinary backward to train: step + vmap norms is what a user of
  vmap would pay, and it is what ``per_example, layers="all"`` is compared with (same norms, checked).

Timed: ``perf_counter`` around one whole step (everything listed above, from ``zero_grad`` to the end of
``optimizer.step()``); ``--clock cpu`` uses ``process_time`` instead, the CPU time of this process, which
other processes on a busy machine disturb less. Each repetition runs every variant for ``--warmup``
untimed and ``--steps`` timed steps on the same batches; the block's median step is its step time.
Variant order rotates each repetition and reverses on every other one (ABCD, DCBA rotated, ...) so drift
and order effects cancel. Reported: the median over repetitions of each block's step time, and of the
ratios taken within one repetition (variant / plain and per_example / vmap), with their quartiles as this
run's noise.

Peak memory, two ways (PyTorch keeps no CPU allocator statistics, and tracemalloc does not see its
allocations):

* Peak tensor memory: one step of each variant (after warm-up) under ``torch.profiler`` with
  ``profile_memory=True``; the running sum of its allocation (+) and free (-) events in time order peaks at
  the most tensor memory allocated within the step and live at once (activations, gradients, the
  per-example factors and gradients, vmap's per-example gradients). Memory that existed before the step
  (weights, optimizer state) is not in it. This is what the variant adds to the step's working set.
* Peak RSS growth: a fresh subprocess per variant (``--memory-worker``) builds the same model, optimizer
  and data, resets the kernel's peak-RSS mark to the current RSS (writing 5 to ``/proc/self/clear_refs``,
  Linux), runs warm-up + timed steps of that variant only and reads the peak (``VmHWM``) back; reported is
  peak minus the RSS before the steps. This is what the operating system sees, including the C allocator's
  caching and fragmentation (so differences can exceed those of the tensor peak); resetting the mark keeps
  the import-time peak (hundreds of MiB for torch) from hiding it, as it would in ``ru_maxrss``.

Correctness of the comparison: before timing, the script asserts that the source's per-example squared
norms (layers="all", and "norm" against vmap restricted to the LayerNorm parameters) equal the vmap ones
on the benchmark model in float32 (relative 1e-3: float32 reductions in different orders), so both sides
compute the same quantity.

Example: ``python benchmarks/per_example.py`` (about 3 minutes on 2 quiet cores) or ``--quick`` for a
smoke run (under a minute). ``--profile`` prints where the per-example step spends its time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import lightning_gns
from lightning_gns import GradientNoiseScaleTracker

VOCAB = 256  # bytes
LR = 3e-4
TARGET_ALL = 1.15  # per_example layers="all" / plain
TARGET_NORM = 1.03  # per_example layers="norm" / plain
TARGET_VS_VMAP = 1.0  # per_example layers="all" / vmap: must be faster
VariantName = Literal["plain", "all", "norm", "all_every4", "vmap"]
VARIANTS: tuple[VariantName, ...] = ("plain", "all", "norm", "all_every4", "vmap")
PER_EXAMPLE: tuple[VariantName, ...] = ("all", "norm", "all_every4")
EVERY = 4  # measure_every_n_steps of the all_every4 variant
LABELS: dict[VariantName, str] = {
    "plain": "plain training",
    "all": 'per_example, layers="all"',
    "norm": 'per_example, layers="norm"',
    "all_every4": f'per_example, layers="all", measure_every_n_steps={EVERY} (mean step)',
    "vmap": "plain step + torch.func vmap norms",
}


@dataclass(frozen=True)
class Shape:
    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    batch: int


# ---------------------------------------------------------------------------------------------- model
class CausalSelfAttention(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.n_head = shape.n_head
        self.c_attn = nn.Linear(shape.d_model, 3 * shape.d_model)
        self.c_proj = nn.Linear(shape.d_model, shape.d_model)
        self.mask: Tensor
        self.register_buffer("mask", torch.ones(shape.seq_len, shape.seq_len, dtype=torch.bool).tril(), False)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
        att = att.masked_fill(~self.mask[:length, :length], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(batch, length, width)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.d_model)
        self.attn = CausalSelfAttention(shape)
        self.ln_2 = nn.LayerNorm(shape.d_model)
        self.c_fc = nn.Linear(shape.d_model, 4 * shape.d_model)
        self.c_proj = nn.Linear(4 * shape.d_model, shape.d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, shape.d_model)
        self.wpe = nn.Embedding(shape.seq_len, shape.d_model)  # an Embedding, so the source covers it
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.lm_head = nn.Linear(shape.d_model, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def per_example_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross entropy of each sequence, shape (B,); the batch loss is their mean."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)


def stdlib_text_batches(shape: Shape, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches of random windows (input, next-byte target) from standard-library sources."""
    stdlib = sysconfig.get_paths()["stdlib"]
    data = b"".join(Path(stdlib, name).read_bytes() for name in ("argparse.py", "typing.py", "inspect.py"))
    text = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        starts = torch.randint(0, len(text) - shape.seq_len - 1, (shape.batch,), generator=gen)
        windows = torch.stack([text[s : s + shape.seq_len + 1] for s in starts.tolist()])
        batches.append((windows[:, :-1].contiguous(), windows[:, 1:].contiguous()))
    return batches


# ---------------------------------------------------------------------------------------------- norms
def vmap_sq_norms(model: nn.Module, tokens: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Per-example squared gradient norm of each parameter (name -> (B,)) of the per-example loss."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(params: dict[str, Tensor], tokens: Tensor, targets: Tensor) -> Tensor:
        logits = functional_call(model, params, (tokens.unsqueeze(0),))
        return per_example_loss(logits, targets.unsqueeze(0)).squeeze(0)

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, tokens, targets)
    return {name: g.flatten(1).square().sum(dim=1) for name, g in grads.items()}


def vmap_total_sq_norms(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    return torch.stack(list(vmap_sq_norms(model, tokens, targets).values())).sum(dim=0)


def check_against_vmap(shape: Shape, seed: int) -> str:
    """Assert the tracker's source gives vmap's per-example squared norms on this model (float32)."""
    torch.manual_seed(seed)
    model = GPT(shape)
    tokens, targets = stdlib_text_batches(shape, count=1, seed=seed)[0]
    expected = vmap_sq_norms(model, tokens, targets)
    norm_names = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    lines = []
    for layers in ("all", "norm"):
        tracker = GradientNoiseScaleTracker(layers=layers)
        tracker.attach(model.parameters(), mode="per_example", model=model)
        source = tracker._per_example_source
        assert source is not None
        source.recording = True
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens).transpose(1, 2), targets).backward()
        norms = source.pop_norms()
        tracker.detach()
        assert norms is not None
        # The source reports the norms of each example's share (1/B) of the batch mean loss.
        got = (norms * shape.batch).square()
        wanted = [n for n in expected if layers == "all" or n.rpartition(".")[0] in norm_names]
        want = torch.stack([expected[n] for n in wanted]).sum(dim=0)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
        error = ((got - want).abs() / want).max().item()
        lines.append(f'layers="{layers}": {len(wanted)} parameter tensors, max relative difference {error:.1e}')
    return "; ".join(lines)


# ---------------------------------------------------------------------------------------------- variants
class Variant:
    """One model copy, its optimizer and, for per-example variants, its tracker; ``step`` is what is timed."""

    def __init__(self, name: VariantName, shape: Shape, seed: int) -> None:
        torch.manual_seed(seed)  # same initial weights for every variant
        self.name = name
        self.shape = shape
        self.model = GPT(shape)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.tracker: GradientNoiseScaleTracker | None = None
        # The hooks of an unmeasured step return at once, so measuring every n-th step costs ~1/n per step.
        self.every = EVERY if name == "all_every4" else 1
        self.steps_taken = 0
        if name in PER_EXAMPLE:
            self.tracker = GradientNoiseScaleTracker(layers="norm" if name == "norm" else "all")
            self.tracker.attach(self.model.parameters(), mode="per_example", model=self.model)
        self.last_vmap: Tensor | None = None

    def step(self, tokens: Tensor, targets: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.tracker is not None:
            self.tracker.start_micro_batch(units=len(tokens), measure=self.steps_taken % self.every == 0)
        self.steps_taken += 1
        loss = F.cross_entropy(self.model(tokens).transpose(1, 2), targets)
        loss.backward()
        if self.tracker is not None:
            self.tracker.end_micro_batch()
            self.tracker.measure_step()
        if self.name == "vmap":
            self.last_vmap = vmap_total_sq_norms(self.model, tokens, targets)
        self.optimizer.step()

    def timed_block(
        self,
        batches: list[tuple[Tensor, Tensor]],
        warmup: int,
        steps: int,
        clock: Callable[[], float] = time.perf_counter,
    ) -> float:
        """Median step time (seconds) over ``steps`` timed steps after ``warmup`` untimed ones.

        With a measurement interval the median is over the means of whole intervals (each holding one
        measured step), so the cost of the measured step is amortised honestly rather than dropped.
        """
        every = self.every
        warmup = math.ceil(warmup / every) * every
        steps = math.ceil(steps / every) * every
        # Start the timed steps on an interval boundary: the tracker measures when steps_taken % every == 0.
        warmup += -(self.steps_taken + warmup) % every
        times = []
        for i in range(warmup + steps):
            tokens, targets = batches[i % len(batches)]
            start = clock()
            self.step(tokens, targets)
            if i >= warmup:
                times.append(clock() - start)
        blocks = [statistics.fmean(times[i : i + every]) for i in range(0, len(times), every)]
        return statistics.median(blocks)


def run_timing(shape: Shape, args: argparse.Namespace) -> dict[VariantName, list[float]]:
    variants = {name: Variant(name, shape, args.seed) for name in VARIANTS}
    batches = stdlib_text_batches(shape, count=4, seed=args.seed + 1)
    times: dict[VariantName, list[float]] = {name: [] for name in VARIANTS}
    for rep in range(args.reps):
        order = list(VARIANTS[rep // 2 % len(VARIANTS) :] + VARIANTS[: rep // 2 % len(VARIANTS)])
        if rep % 2:
            order.reverse()
        for name in order:
            times[name].append(variants[name].timed_block(batches, args.warmup, args.steps, CLOCKS[args.clock]))
        done = ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in VARIANTS)
        print(f"  rep {rep + 1}/{args.reps}: {done}", file=sys.stderr, flush=True)
    for name in PER_EXAMPLE:
        tracker = variants[name].tracker
        assert tracker is not None and tracker.source == "per_example"
        if name != "norm":
            assert tracker.covered_fraction == 1.0, f"covered fraction {tracker.covered_fraction}"
        assert math.isfinite(tracker.grad_sq_norm), "the tracker produced no estimate"
    return times


# ---------------------------------------------------------------------------------------------- memory
def proc_status_mib(field: str) -> float:
    """A memory line of /proc/self/status (Linux), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(name: VariantName, shape: Shape, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    variant = Variant(name, shape, args.seed)
    batches = stdlib_text_batches(shape, count=4, seed=args.seed + 1)
    # Reset the peak-RSS mark (VmHWM) to the current RSS: the peak read afterwards is that of the steps alone,
    # not of the imports before them.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status_mib("VmRSS")
    variant.timed_block(batches, args.warmup, args.steps)
    print(json.dumps({"before_mib": before, "peak_mib": proc_status_mib("VmHWM")}))


def peak_tensor_mib(shape: Shape, args: argparse.Namespace) -> dict[VariantName, float]:
    """Peak of the tensor memory allocated within one step (after warm-up) of each variant, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    batches = stdlib_text_batches(shape, count=4, seed=args.seed + 1)
    peaks: dict[VariantName, float] = {}
    for name in VARIANTS:
        variant = Variant(name, shape, args.seed)
        variant.timed_block(batches, args.warmup, 1)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            variant.timed_block(batches, 0, 1)
        # Allocations (+) and frees (-) in time order; frees of blocks from before the step are not reported.
        events = sorted(
            (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
            key=lambda e: e.start_ns(),
        )
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        peaks[name] = peak / 2**20
    return peaks


def run_memory(args: argparse.Namespace) -> dict[VariantName, float]:
    """Peak RSS growth (MiB) over the steps of each variant, each in a fresh process."""
    peaks: dict[VariantName, float] = {}
    for name in VARIANTS:
        forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE_ARGS + RUN_ARGS]
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--memory-worker", name, *forwarded],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        peaks[name] = result["peak_mib"] - result["before_mib"]
    return peaks


# ---------------------------------------------------------------------------------------------- profile
def run_profile(shape: Shape, args: argparse.Namespace) -> None:
    from torch.profiler import ProfilerActivity, profile

    batches = stdlib_text_batches(shape, count=4, seed=args.seed + 1)
    for name in ("plain", "norm", "all"):
        variant = Variant(name, shape, args.seed)
        variant.timed_block(batches, args.warmup, 1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            variant.timed_block(batches, 0, args.steps)
        print(f"\n### profile: {LABELS[name]} ({args.steps} steps)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


# ---------------------------------------------------------------------------------------------- report
def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def ratio_cell(values: list[float]) -> str:
    q1, q3 = quartiles(values)
    return f"{statistics.median(values):.3f} [{q1:.3f}, {q3:.3f}]"


def verdict(checks: list[tuple[list[float], float, str]]) -> str:
    """Judged on the median ratio; a miss that the lower quartile meets is marked as within this run's noise."""
    misses = []
    for ratios, limit, what in checks:
        if statistics.median(ratios) > limit:
            misses.append(f"{what} > {limit}" + (" (q1 meets it)" if quartiles(ratios)[0] <= limit else ""))
    return "**NO**: " + "; ".join(misses) if misses else "yes"


def memory_cell(values: dict[VariantName, float] | None, name: VariantName) -> str:
    if values is None:
        return "not measured"
    return f"{values[name]:.0f}" + (f" ({values[name] - values['plain']:+.0f})" if name != "plain" else "")


def table(
    times: dict[VariantName, list[float]],
    tensor_peaks: dict[VariantName, float] | None,
    rss_peaks: dict[VariantName, float] | None,
) -> str:
    def ratios(a: VariantName, b: VariantName) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b], strict=True)]

    lines = [
        "| variant | step time (ms) | vs plain [q1, q3] | vs vmap [q1, q3] | peak tensor memory, MiB (vs plain)"
        " | peak RSS growth, MiB (vs plain) | target | target met? |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    targets: dict[VariantName, tuple[str, list[tuple[list[float], float, str]]]] = {
        "plain": ("", []),
        "all": (
            f"≤ {TARGET_ALL}x plain, < vmap",
            [(ratios("all", "plain"), TARGET_ALL, "vs plain"), (ratios("all", "vmap"), TARGET_VS_VMAP, "vs vmap")],
        ),
        "norm": (f"≤ {TARGET_NORM}x plain", [(ratios("norm", "plain"), TARGET_NORM, "vs plain")]),
        "all_every4": (f"≤ {TARGET_ALL}x plain", [(ratios("all_every4", "plain"), TARGET_ALL, "vs plain")]),
        "vmap": ("", []),
    }
    for name in VARIANTS:
        target, checks = targets[name]
        vs_vmap = ratio_cell(ratios(name, "vmap")) if name in PER_EXAMPLE else ""
        lines.append(
            f"| {LABELS[name]} | {statistics.median(times[name]) * 1e3:.1f} | {ratio_cell(ratios(name, 'plain'))}"
            f" | {vs_vmap} | {memory_cell(tensor_peaks, name)} | {memory_cell(rss_peaks, name)} | {target}"
            f" | {verdict(checks) if checks else ''} |"
        )
    return "\n".join(lines)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
SHAPE_ARGS = ["n_layer", "d_model", "n_head", "seq_len", "batch"]
RUN_ARGS = ["warmup", "steps", "threads", "seed"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Step time and peak memory of mode='per_example' (layers 'all' and 'norm') on a small GPT, "
        "against plain training and torch.func vmap norms, alternating in one run; prints a Markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--reps", type=int, default=16, help="repetitions (one block of each variant each)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each block")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: perf_counter; cpu: process_time, the CPU time this process used (less disturbed by other"
        " processes on a busy machine; equal to wall time on a quiet one with 1 thread)",
    )
    parser.add_argument("--skip-memory", action="store_true", help="no memory measurements (profiler and subprocesses)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables (plain, norm, all)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers, batch 8, 2 reps of 2 steps")
    parser.add_argument("--memory-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n_layer, args.batch, args.reps, args.warmup, args.steps = 2, 8, 2, 1, 2
    return args


def main() -> None:
    args = parse_args()
    shape = Shape(*(getattr(args, k) for k in SHAPE_ARGS))
    if args.memory_worker:
        memory_worker(args.memory_worker, shape, args)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    check = check_against_vmap(shape, args.seed)
    times = run_timing(shape, args)
    tensor_peaks = None if args.skip_memory else peak_tensor_mib(shape, args)
    rss_peaks = None if args.skip_memory else run_memory(args)
    params = sum(p.numel() for p in GPT(shape).parameters())
    print(
        f"\nGPT: {shape.n_layer} layers, d_model {shape.d_model}, {shape.n_head} heads, sequence {shape.seq_len},"
        f" batch {shape.batch}, byte vocabulary {VOCAB}, tied output layer ({params:,} parameters); AdamW; CPU."
        f"\nlightning_gns from {os.path.dirname(lightning_gns.__file__)}; torch {torch.__version__},"
        f" {os.cpu_count()} CPUs, {args.threads} torch thread(s)."
        f"\n{args.reps} repetitions, each {args.warmup} warm-up + {args.steps} timed steps per variant, alternating;"
        f" clock: {args.clock}."
        f"\nPer-example squared norms equal vmap's (float32): {check}.\n"
    )
    print(table(times, tensor_peaks, rss_peaks))
    print(
        "\nStep time: one training step including the variant's norm work, median over repetitions of each"
        " block's median. Ratios: median over repetitions of the ratio within the repetition; [q1, q3] are its"
        " quartiles, i.e. the noise of this run. Peak tensor memory: the most tensor memory allocated within one"
        " step and live at once (torch.profiler). Peak RSS growth: peak RSS minus RSS before the steps, in a"
        " fresh process running that variant only (includes the C allocator's caching and fragmentation)."
    )
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()
    print(
        f"\nTotal runtime {elapsed:.0f} s; 1-minute load average {load_before[0]:.2f} before,"
        f" {load_after[0]:.2f} after (above the CPU count means other processes competed for the cores)."
    )
    if args.profile:
        run_profile(shape, args)


if __name__ == "__main__":
    main()
