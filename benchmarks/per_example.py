"""Cost of ``mode="per_example"`` on a small GPT: step time and peak memory against plain training and vmap.

The model is a nanoGPT-style decoder (byte vocabulary of 256, learned position embedding, pre-LayerNorm
blocks with causal self-attention and a GELU MLP, final LayerNorm, output layer tied to the token
embedding). Every parameter belongs to an ``nn.Linear``, ``nn.Embedding`` or ``nn.LayerNorm``, so the
per-example source covers all of them (the script checks ``covered_fraction == 1``). Attention is written
out (``q @ k^T``, causal mask, softmax, ``@ v``) rather than calling ``scaled_dot_product_attention``,
whose CPU kernel has no vmap batching rule and would make the vmap column unfairly slow. Training data:
windows of the bytes of Python standard-library source files; AdamW; CPU; one plain PyTorch loop.

Four variants, each with its own copy of the same initial model and optimizer:

* ``plain``: ``zero_grad``, forward, mean next-token cross entropy, ``backward``, ``optimizer.step()``.
* ``per_example, layers="all"`` / ``layers="norm"``: the same step with a ``GradientNoiseScaleTracker``
  (``mode="per_example"``) around it, measuring every 2nd step: ``start_micro_batch(..., measure=...)``
  before the forward, ``end_micro_batch`` after ``backward`` (the per-example norms are computed inside the
  backward by the source's hooks), ``measure_step`` before ``optimizer.step()`` (big-batch norm and the
  estimator update). On the other steps the hooks are idle.
* ``torch.func vmap``: the plain step plus, between ``backward`` and ``optimizer.step()``, the per-example
  squared gradient norms over all parameters from ``vmap(grad(per-example loss))`` with
  ``functional_call`` (per-example gradients materialised, then squared and summed). vmap gives only the
  norms, so the model still needs its ordinary backward to train: step + vmap norms is what a user of
  vmap would pay, and it is what a measured step of ``per_example, layers="all"`` is compared with (same
  norms, checked).

Timed: ``perf_counter`` around one whole step (everything listed above, from ``zero_grad`` to the end of
``optimizer.step()``); ``--clock cpu`` uses ``process_time`` instead, the CPU time of this process, which
other processes on a busy machine disturb less. A 2-core machine shared with others drifts by tens of
percent within seconds, so variants are compared step by step: each round runs one step of every variant
on the same batch (order rotating, reversed every other round), and a ratio is taken within one round.
Measured and idle steps of a per-example variant alternate from round to round, so each measured step is
also compared with the mean of its variant's idle steps in the rounds before and after. Reported: median
[q1, q3] (samples) of these step-level ratios, the quartiles being this run's noise, and beside them the
floor: one fused norm pass over the gradients (``torch._foreach_norm``) relative to the plain step.

Peak memory, two ways (PyTorch keeps no CPU allocator statistics, and tracemalloc does not see its
allocations):

* Peak tensor memory: one (measured) step of each variant (after warm-up) under ``torch.profiler`` with
  ``profile_memory=True``; the running sum of its allocation (+) and free (-) events in time order peaks at
  the most tensor memory allocated within the step and live at once (activations, gradients, the
  per-example factors and gradients, vmap's per-example gradients). Memory that existed before the step
  (weights, optimizer state) is not in it. This is what the variant adds to the step's working set.
* Peak RSS growth: a fresh subprocess per variant (``--memory-worker``) builds the same model, optimizer
  and data, resets the kernel's peak-RSS mark to the current RSS (writing 5 to ``/proc/self/clear_refs``,
  Linux), runs warm-up + 2 measured steps of that variant only and reads the peak (``VmHWM``) back; reported is
  peak minus the RSS before the steps. This is what the operating system sees, including the C allocator's
  caching and fragmentation (so differences can exceed those of the tensor peak); resetting the mark keeps
  the import-time peak (hundreds of MiB for torch) from hiding it, as it would in ``ru_maxrss``.

Correctness of the comparison: before timing, the script asserts that the source's per-example squared
norms (layers="all", and "norm" against vmap restricted to the LayerNorm parameters) equal the vmap ones
on the benchmark model in float32 (relative 1e-3: float32 reductions in different orders), so both sides
compute the same quantity.

Example: ``nice -n 10 python benchmarks/per_example.py`` (a few minutes on 2 cores) or ``--quick`` for a
smoke run (seconds). ``--profile`` prints where the per-example (measured) step spends its time.
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

# This checkout's lightning_gns (not whichever one is installed), and the helpers next to this script.
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

from paired import measured_vs_idle, norm_pass, quartiles, summary  # noqa: E402

import lightning_gns  # noqa: E402
from lightning_gns import GradientNoiseScaleTracker  # noqa: E402
from tests.support.per_example_norms import pop_norms  # noqa: E402

VOCAB = 256  # bytes
LR = 3e-4
TARGET_ALL = 1.10  # per_example layers="all" / plain
TARGET_NORM = 1.02  # per_example layers="norm" / plain
TARGET_VS_VMAP = 1.0  # per_example layers="all" / vmap: must be faster
VariantName = Literal["plain", "all", "norm", "vmap"]
VARIANTS: tuple[VariantName, ...] = ("plain", "all", "norm", "vmap")
PER_EXAMPLE: tuple[VariantName, ...] = ("all", "norm")
EVERY = 2  # per-example variants measure every 2nd step, so measured and idle steps alternate
PROFILE_STEPS = 4
LABELS: dict[VariantName, str] = {
    "plain": "plain training",
    "all": 'per_example, layers="all"',
    "norm": 'per_example, layers="norm"',
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
        # nanoGPT's initialisation. PyTorch's default N(0, 1) embedding, tied to the output layer, gives logits
        # of +-100 whose softmax gradient is ~70% denormal floats, on which x86 matmuls run 20-100x slower: the
        # output layer's weight gradient took 14 ms instead of 1 ms, in plain and measured steps alike.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * shape.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)

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
        source = tracker._sources.per_example
        assert source is not None
        source.recording = True
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens).transpose(1, 2), targets).backward()
        norms = pop_norms(source)
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
        self.steps_taken = 0
        if name in PER_EXAMPLE:
            self.tracker = GradientNoiseScaleTracker(layers="norm" if name == "norm" else "all")
            self.tracker.attach(self.model.parameters(), mode="per_example", model=self.model)
        self.last_vmap: Tensor | None = None

    def measures(self, step: int) -> bool:
        """Per-example variants measure every EVERY-th step (the hooks of the others return at once)."""
        return self.tracker is not None and step % EVERY == 0

    def step(self, tokens: Tensor, targets: Tensor, measure: bool | None = None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.tracker is not None:
            measure = self.measures(self.steps_taken) if measure is None else measure
            self.tracker.start_micro_batch(units=len(tokens), measure=measure)
        self.steps_taken += 1
        loss = F.cross_entropy(self.model(tokens).transpose(1, 2), targets)
        loss.backward()
        if self.tracker is not None:
            self.tracker.end_micro_batch()
            self.tracker.measure_step()
        if self.name == "vmap":
            self.last_vmap = vmap_total_sq_norms(self.model, tokens, targets)
        self.optimizer.step()

    def run_steps(self, batches: list[tuple[Tensor, Tensor]], count: int, measure: bool | None = None) -> None:
        for i in range(count):
            self.step(*batches[i % len(batches)], measure=measure)


@dataclass
class Timing:
    """Step times (seconds) by round and variant, and the floor ratio of each plain step."""

    times: dict[VariantName, list[float]]
    floor: list[float]


def run_timing(shape: Shape, args: argparse.Namespace) -> Timing:
    """Rounds of one step of every variant (order rotating, reversed every other round), after warm-up rounds.

    A ratio between two variants is taken within one round (steps a few hundred ms apart); measured and idle
    steps of a per-example variant alternate from round to round (its step index is the round index).
    """
    variants = {name: Variant(name, shape, args.seed) for name in VARIANTS}
    batches = stdlib_text_batches(shape, count=4, seed=args.seed + 1)
    clock = CLOCKS[args.clock]
    times: dict[VariantName, list[float]] = {name: [] for name in VARIANTS}
    floor: list[float] = []
    for r in range(args.warmup + args.rounds):
        order = list(VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)])
        if r % 2:
            order.reverse()
        tokens, targets = batches[r % len(batches)]
        for name in order:
            variant = variants[name]
            start = clock()
            variant.step(tokens, targets)
            elapsed = clock() - start
            if name == "plain":
                # The floor: one fused norm pass over the gradients the plain step just produced.
                grads = [p.grad for p in variant.model.parameters() if p.grad is not None]
                norm_start = clock()
                norm_pass(grads)
                ratio = (clock() - norm_start) / elapsed
            if r >= args.warmup:
                times[name].append(elapsed)
                if name == "plain":
                    floor.append(ratio)
        if (r + 1) % 20 == 0:
            print(f"  round {r + 1}/{args.warmup + args.rounds}", file=sys.stderr, flush=True)
    for name in PER_EXAMPLE:
        tracker = variants[name].tracker
        assert tracker is not None and tracker.source == "per_example"
        if name != "norm":
            assert tracker.covered_fraction == 1.0, f"covered fraction {tracker.covered_fraction}"
        assert math.isfinite(tracker.grad_sq_norm), "the tracker produced no estimate"
    return Timing(times, floor)


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
    variant.run_steps(batches, args.warmup + 2, measure=True)
    print(json.dumps({"before_mib": before, "peak_mib": proc_status_mib("VmHWM")}))


def peak_tensor_mib(shape: Shape, args: argparse.Namespace) -> dict[VariantName, float]:
    """Peak of the tensor memory allocated within one step (after warm-up) of each variant, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    batches = stdlib_text_batches(shape, count=4, seed=args.seed + 1)
    peaks: dict[VariantName, float] = {}
    for name in VARIANTS:
        variant = Variant(name, shape, args.seed)
        variant.run_steps(batches, args.warmup, measure=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            variant.run_steps(batches, 1, measure=True)
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
        variant.run_steps(batches, args.warmup, measure=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            variant.run_steps(batches, PROFILE_STEPS, measure=True)
        print(f"\n### profile: {LABELS[name]} ({PROFILE_STEPS} measured steps)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


# ---------------------------------------------------------------------------------------------- report
def round_ratios(timing: Timing, a: VariantName, b: VariantName, measured: bool | None, warmup: int) -> list[float]:
    """a / b within each round; ``measured`` picks a's measured (True) or idle (False) rounds, None all rounds."""
    out = []
    for i, (x, y) in enumerate(zip(timing.times[a], timing.times[b], strict=True)):
        is_measured = (warmup + i) % EVERY == 0
        if measured is None or measured == is_measured:
            out.append(x / y)
    return out


def neighbour_ratios(timing: Timing, name: VariantName, warmup: int) -> list[float]:
    """Each measured step of ``name`` over the mean of its idle steps in the rounds before and after."""
    steps = {warmup + i: t for i, t in enumerate(timing.times[name])}
    return measured_vs_idle(steps, EVERY)


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
    timing: Timing,
    warmup: int,
    tensor_peaks: dict[VariantName, float] | None,
    rss_peaks: dict[VariantName, float] | None,
) -> str:
    lines = [
        "| variant | step time (ms) | measured / idle neighbours | measured / plain (same round)"
        " | idle / plain (same round) | measured / vmap (same round) | every 2 vs plain (est.)"
        " | peak tensor memory, MiB (vs plain) | peak RSS growth, MiB (vs plain) | target | target met? |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    targets = {"all": TARGET_ALL, "norm": TARGET_NORM}
    for name in VARIANTS:
        median_ms = statistics.median(timing.times[name]) * 1e3
        memory = f" | {memory_cell(tensor_peaks, name)} | {memory_cell(rss_peaks, name)}"
        if name not in PER_EXAMPLE:
            vs_plain = summary(round_ratios(timing, name, "plain", None, warmup)) if name != "plain" else ""
            lines.append(f"| {LABELS[name]} | {median_ms:.1f} |  | {vs_plain} |  |  | {memory} |  |  |")
            continue
        measured = round_ratios(timing, name, "plain", True, warmup)
        idle = round_ratios(timing, name, "plain", False, warmup)
        vs_vmap = round_ratios(timing, name, "vmap", True, warmup)
        every2 = (statistics.median(measured) + statistics.median(idle)) / 2
        checks = [(measured, targets[name], "measured vs plain")]
        if name == "all":
            checks.append((vs_vmap, TARGET_VS_VMAP, "vs vmap"))
        lines.append(
            f"| {LABELS[name]} | {median_ms:.1f} | {summary(neighbour_ratios(timing, name, warmup))}"
            f" | {summary(measured)} | {summary(idle)} | {summary(vs_vmap)} | {every2:.3f}{memory}"
            f" | measured ≤ {targets[name]}x plain{', < vmap' if name == 'all' else ''} | {verdict(checks)} |"
        )
    return "\n".join(lines)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
SHAPE_ARGS = ["n_layer", "d_model", "n_head", "seq_len", "batch"]
RUN_ARGS = ["warmup", "rounds", "threads", "seed"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Step time and peak memory of mode='per_example' (layers 'all' and 'norm') on a small GPT, "
        "against plain training and torch.func vmap norms, step by step in one process; prints a Markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--n-head", type=int, default=4, help="attention heads")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence")
    parser.add_argument("--batch", type=int, default=16, help="sequences per batch")
    parser.add_argument("--rounds", type=int, default=60, help="timed rounds (one step of every variant each)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed rounds first (and untimed steps in memory runs)")
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
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers, batch 8, 8 rounds, no memory runs")
    parser.add_argument("--memory-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n_layer, args.batch, args.rounds, args.warmup, args.skip_memory = 2, 8, 8, 2, True
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
    timing = run_timing(shape, args)
    tensor_peaks = None if args.skip_memory else peak_tensor_mib(shape, args)
    rss_peaks = None if args.skip_memory else run_memory(args)
    params = sum(p.numel() for p in GPT(shape).parameters())
    print(
        f"\nGPT: {shape.n_layer} layers, d_model {shape.d_model}, {shape.n_head} heads, sequence {shape.seq_len},"
        f" batch {shape.batch}, byte vocabulary {VOCAB}, tied output layer ({params:,} parameters); AdamW; CPU."
        f"\nlightning_gns from {os.path.dirname(lightning_gns.__file__)}; torch {torch.__version__},"
        f" {os.cpu_count()} CPUs, {args.threads} torch thread(s)."
        f"\n{args.warmup} warm-up + {args.rounds} timed rounds of one step of each variant, order rotating;"
        f" per-example variants measure every {EVERY}nd step; clock: {args.clock}."
        f"\nPer-example squared norms equal vmap's (float32): {check}.\n"
    )
    print(table(timing, args.warmup, tensor_peaks, rss_peaks))
    print(
        f"\nFloor: one fused norm pass over the gradients / the plain step before it: {summary(timing.floor, 4)}."
        "\nStep time: median over all timed rounds (measured and idle steps together for per-example variants)."
        " Ratios: median [q1, q3] (samples) of step-level ratios: a measured step over the mean of its idle"
        " neighbours (same variant, rounds before and after); a measured or idle step over the plain (or vmap)"
        " step of the same round. Every 2 (est.): mean of the measured and idle medians vs plain, the cost with"
        f" measure_every_n_steps={EVERY}. Peak tensor memory: the most tensor memory allocated within one measured"
        " step and live at once (torch.profiler). Peak RSS growth: peak RSS minus RSS before the steps, in a"
        " fresh process running that variant only, measuring every step (includes the C allocator's caching"
        " and fragmentation)."
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
