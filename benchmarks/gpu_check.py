"""Checks of GradientNoiseScale that need a GPU, in one script that prints one Markdown table.

Run on a CUDA machine: ``python benchmarks/gpu_check.py --out gpu_check.md`` (sized for about 4-6 minutes
on one H100/H200-class GPU). ``--dry-run`` runs every section on CPU with a tiny model in about a minute,
so the script itself is tested without a GPU (tests/test_gpu_check.py).

Sections (one or more table rows each):

(a) Host syncs on non-logging steps, for each mode that runs on one GPU (``microbatch`` with
    ``accumulate_grad_batches=2``, ``per_example``): ``torch.cuda.set_sync_debug_mode("warn")`` is on from
    the first micro-batch's ``on_train_batch_start`` to the last one's ``on_train_batch_end`` of steps 2..n-2
    (the first steps set things up, e.g. host-to-device copies of index tables), and the
    "synchronizing CUDA operation" warnings are counted, in a fit with the callback and one without (what
    Lightning itself does). Expected: the callback adds 0. Skipped on CPU (no sync debug mode there).
(b) fp16 with a GradScaler whose first steps overflow (``init_scale=2**18``): a linear regression with
    ``lr=0`` (the model never changes, so the estimate depends on the batches only), through
    ``MixedPrecision("16-mixed", device, scaler=GradScaler(device, init_scale=2**18))``. A recorder after the
    callback notes which steps had non-finite gradients; the reference fits (fp32, and bf16 for information)
    see exactly the batches of the finite steps, in the same order. Expected: ``gns.skipped_steps`` equals the
    number of overflowed steps (> 0), and B_simple is within 3% of the fp32 run's.
(c) Overhead of each mode on a GPT-2-small-sized nanoGPT (12 layers, d_model 768, 12 heads, sequence 1024,
    vocabulary 50257, tied output layer, ``wpe(torch.arange(T))``), bf16-mixed, measured in pairs (see
    benchmarks/paired.py): ``measure_every_n_steps=2``, each measured step over the mean of its idle
    neighbours; the idle steps' median over the mean of the fits without the callback just before and after
    (fits alternate). The floor is one fused norm pass over the gradients relative to one plain step.
    ``covered_fraction`` of ``per_example`` is reported as the callback gives it.
(d) Peak memory of one training step: plain, plus ``per_example`` norms (tracker), plus ``torch.func``
    ``vmap`` per-example gradients (then their norms), on the same model with attention written out
    (vmap has no batching rule for every fused attention kernel). CUDA: ``max_memory_allocated`` above the
    memory allocated before the step; CPU: the peak of the profiler's allocation events within the step.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset

# This checkout's lightning_gns (not whichever one is installed), and the helpers next to this script.
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]
from paired import StepTimer, floor_ratios, idle_steps, idle_vs_without, measured_vs_idle, summary  # noqa: E402

import lightning_gns  # noqa: E402
from lightning_gns import GradientNoiseScale, GradientNoiseScaleTracker  # noqa: E402

SYNC_WARNING = "synchronizing CUDA operation"
OVERFLOW_TOLERANCE = 0.03
INIT_EXPONENT = 18  # GradScaler(init_scale=2**18): the regression's first few steps overflow in fp16


@dataclass(frozen=True)
class Settings:
    device: str
    n_layer: int
    d_model: int
    n_head: int
    seq_len: int
    vocab: int
    batch: int  # sequences per micro-batch
    memory_batch: int  # sequences in the memory comparison
    sync_steps: int
    warmup: int
    timed_steps: int
    fit_pairs: int
    floor_iters: int
    overflow_steps: int

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


FULL = Settings("cuda", 12, 768, 12, 1024, 50257, 8, 4, 8, 2, 12, 4, 10, 40)
DRY = Settings("cpu", 2, 32, 2, 16, 97, 4, 4, 6, 2, 6, 2, 3, 20)


@dataclass
class Row:
    section: str
    configuration: str
    result: str
    expected: str
    ok: str  # yes / **NO** / info / skipped / **error**


# ---------------------------------------------------------------------------------------------- model
class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, manual: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.manual = manual
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if self.manual:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
            y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, d_model: int, n_head: int, manual: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, manual)
        self.ln_2 = nn.LayerNorm(d_model)
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT-style decoder; the position embedding is called with ``arange(T)`` (shape (T,)), as nanoGPT does."""

    def __init__(self, s: Settings, manual_attention: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(s.vocab, s.d_model)
        self.wpe = nn.Embedding(s.seq_len, s.d_model)
        self.blocks = nn.ModuleList(Block(s.d_model, s.n_head, manual_attention) for _ in range(s.n_layer))
        self.ln_f = nn.LayerNorm(s.d_model)
        self.lm_head = nn.Linear(s.d_model, s.vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class GPTModule(LightningModule):
    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, targets = batch
        return F.cross_entropy(self.model(tokens).flatten(0, 1), targets.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-5)


class Batches(Dataset):
    """Ready-made batches, cycled (the loader adds no collation)."""

    def __init__(self, batches: list[Any], length: int | None = None) -> None:
        self.batches = batches
        self.length = len(batches) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.batches[index % len(self.batches)]


def token_batches(s: Settings, count: int, batch: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        seq = torch.randint(0, s.vocab, (batch, s.seq_len + 1), generator=gen)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def trainer(s: Settings, callbacks: list[Callback], steps: int, accumulation: int = 1, **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "accelerator": s.device,
        "devices": 1,
        "max_steps": steps,
        "accumulate_grad_batches": accumulation,
        "callbacks": callbacks,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return Trainer(**options)


def loader(batches: list[Any], length: int | None = None) -> DataLoader:
    return DataLoader(Batches(batches, length), batch_size=None)


MODES: list[tuple[str, dict[str, Any], int]] = [  # label, GradientNoiseScale kwargs, accumulate_grad_batches
    ("microbatch, k=2", {"mode": "microbatch"}, 2),
    ('per_example, layers="all"', {"mode": "per_example"}, 1),
    ('per_example, layers="norm"', {"mode": "per_example", "layers": "norm"}, 1),
]


# ---------------------------------------------------------------------------------------------- (a) host syncs
class SyncCounter:
    """Turns CUDA sync debug mode on over the steps in ``window`` (as first and last callback)."""

    def __init__(self, window: range) -> None:
        self.window = window
        counter = self

        class _On(Callback):
            def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, idx: int) -> None:
                if trainer.global_step in counter.window:
                    torch.cuda.set_sync_debug_mode("warn")

        class _Off(Callback):
            def on_train_batch_end(
                self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
            ) -> None:
                torch.cuda.set_sync_debug_mode(0)

        self.first: Callback = _On()
        self.last: Callback = _Off()


def count_syncs(s: Settings, gns: GradientNoiseScale | None, accumulation: int) -> int:
    torch.manual_seed(0)
    module = GPTModule(GPT(s))
    counter = SyncCounter(range(2, s.sync_steps - 1))
    callbacks = [counter.first, *([gns] if gns is not None else []), counter.last]
    batches = token_batches(s, 4, s.batch, seed=1)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # A logger that never logs within the run: every counted step is a non-logging step.
        logger = CSVLogger(tmp)
        fit = trainer(
            s, callbacks, s.sync_steps, accumulation, precision="bf16-mixed", logger=logger, log_every_n_steps=10**6
        )
        try:
            fit.fit(module, loader(batches, s.sync_steps * accumulation))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(SYNC_WARNING in str(w.message) for w in caught)


def section_syncs(s: Settings) -> list[Row]:
    rows = []
    for label, kwargs, accumulation in MODES[:2]:
        config = f"{label}, bf16-mixed, steps 2..{s.sync_steps - 2}"
        if not s.cuda:
            rows.append(Row("(a) host syncs", config, "not run", "0 added", "skipped (CPU: no sync debug mode)"))
            continue
        baseline = count_syncs(s, None, accumulation)
        with_gns = count_syncs(s, GradientNoiseScale(**kwargs), accumulation)
        added = with_gns - baseline
        rows.append(
            Row(
                "(a) host syncs",
                config,
                f"{added} added ({with_gns} with the callback, {baseline} without)",
                "0 added",
                "yes" if added == 0 else "**NO**",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------- (b) fp16 overflow
class Regression(LightningModule):
    """Linear regression with lr=0: the weights never change, so B_simple depends on the batches only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(dim, 16), nn.Linear(16, 1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x).squeeze(-1).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class FiniteRecorder(Callback):
    """Whether each optimizer step's (unscaled) gradients were finite; placed after the GNS callback."""

    def __init__(self) -> None:
        self.finite: list[bool] = []

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.finite.append(bool(torch.stack([g.isfinite().all() for g in grads]).all()))


def regression_batches(steps: int, accumulation: int, batch: int = 32, dim: int = 16) -> list[list[Any]]:
    """Per optimizer step, its micro-batches; the target has a large signal so |G|^2 is well above noise."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(dim, generator=gen) * 3
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(accumulation):
            x = torch.randn(batch, dim, generator=gen)
            micro.append((x, x @ w + torch.randn(batch, generator=gen)))
        out.append(micro)
    return out


def fit_regression(
    s: Settings, kwargs: dict[str, Any], accumulation: int, steps: list[list[Any]], precision: str
) -> tuple[GradientNoiseScale, FiniteRecorder]:
    gns = GradientNoiseScale(beta=0.9, **kwargs)
    recorder = FiniteRecorder()
    options: dict[str, Any] = {}
    if precision == "16-mixed":
        # On CPU, precision="16-mixed" would run bf16 without a scaler: pass fp16 and the scaler explicitly.
        scaler = torch.amp.GradScaler(s.device, init_scale=2.0**INIT_EXPONENT)
        options["plugins"] = [MixedPrecision("16-mixed", s.device, scaler=scaler)]
    else:
        options["precision"] = precision
    flat = [b for micro in steps for b in micro]
    fit = trainer(s, [gns, recorder], len(steps), accumulation, **options)
    fit.fit(Regression(16), loader(flat))
    return gns, recorder


def section_overflow(s: Settings) -> list[Row]:
    rows = []
    for label, kwargs, accumulation in MODES[:2]:
        steps = regression_batches(s.overflow_steps, accumulation)
        fp16, recorder = fit_regression(s, kwargs, accumulation, steps, "16-mixed")
        overflowed = recorder.finite.count(False)
        finite_steps = [micro for micro, ok in zip(steps, recorder.finite, strict=True) if ok]
        fp32, _ = fit_regression(s, kwargs, accumulation, finite_steps, "32-true")
        bf16, _ = fit_regression(s, kwargs, accumulation, finite_steps, "bf16-mixed")
        error = abs(fp16.b_simple / fp32.b_simple - 1)
        bf16_error = abs(bf16.b_simple / fp32.b_simple - 1)
        skipped_ok = fp16.skipped_steps == overflowed > 0
        rows.append(
            Row(
                "(b) fp16 overflow",
                f"{label}, lr=0 regression, GradScaler(init_scale=2**{INIT_EXPONENT}), {len(steps)} steps",
                f"skipped {fp16.skipped_steps} of {overflowed} overflowed; B_simple fp16 {fp16.b_simple:.4g},"
                f" fp32 {fp32.b_simple:.4g} (rel. diff {error:.2e}); bf16 {bf16.b_simple:.4g} ({bf16_error:.2e})",
                f"skipped = overflowed > 0; fp16 within {OVERFLOW_TOLERANCE:.0%} of fp32",
                "yes" if skipped_ok and error <= OVERFLOW_TOLERANCE else "**NO**",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------- (c) overhead
def timed_fit(
    s: Settings, module: GPTModule, gns: GradientNoiseScale | None, accumulation: int, batches: list[Any]
) -> dict[int, float]:
    timer = StepTimer(sync=s.cuda)
    steps = s.warmup + s.timed_steps
    callbacks = [timer.first, *([gns] if gns is not None else []), timer.last]
    trainer(s, callbacks, steps, accumulation, precision="bf16-mixed").fit(
        module, loader(batches, steps * accumulation)
    )
    return timer.by_step(skip=s.warmup)


def plain_floor(s: Settings, module: GPTModule, batch: tuple[Tensor, Tensor]) -> list[float]:
    model = module.model.to(s.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens, targets = (t.to(s.device) for t in batch)

    def step() -> list[Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(s.device, dtype=torch.bfloat16):
            logits = model(tokens)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        return [p.grad for p in model.parameters() if p.grad is not None]

    return floor_ratios(step, s.floor_iters, sync=s.cuda)


def section_overhead(s: Settings) -> list[Row]:
    torch.manual_seed(0)
    module = GPTModule(GPT(s))
    params = sum(p.numel() for p in module.parameters())
    batches = token_batches(s, 4, s.batch, seed=2)
    floor = plain_floor(s, module, batches[0])
    floor_text = summary(floor, 4)
    rows = []
    for label, kwargs, accumulation in MODES:
        without: list[float] = []
        idle: list[float] = []
        measured: list[float] = []
        covered = b_simple = float("nan")
        skipped = 0
        for pair in range(s.fit_pairs + 1):
            without.append(statistics.median(timed_fit(s, module, None, accumulation, batches).values()))
            if pair == s.fit_pairs:
                break
            gns = GradientNoiseScale(measure_every_n_steps=2, **kwargs)
            by_step = timed_fit(s, module, gns, accumulation, batches)
            idle.append(statistics.median(idle_steps(by_step)))
            measured += measured_vs_idle(by_step)
            covered, b_simple, skipped = gns.covered_fraction, gns.b_simple, gns.skipped_steps
        idle_ratios = idle_vs_without(idle, without)
        # passes: small-batch norm passes per micro-batch (k of them, plus the big-batch one, per k micro-batches).
        passes = (accumulation + 1) / accumulation if kwargs["mode"] == "microbatch" else 1.0
        rows.append(
            Row(
                "(c) overhead",
                f"{label}, micro-batch {s.batch} x {s.seq_len} tokens, {params / 1e6:.1f}M params, bf16-mixed",
                f"measured / idle neighbours {summary(measured)}; idle / no callback {summary(idle_ratios)};"
                f" step {statistics.median(without) * 1e3:.1f} ms without; covered_fraction {covered:.4f};"
                f" last fit: B_simple {b_simple:.4g}, skipped {skipped}",
                f"measured - 1 near passes x floor = {passes:.2f} x {floor_text}; a finite B_simple",
                "info" if math.isfinite(b_simple) else "**NO** (no estimate)",
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------- (d) memory
@contextlib.contextmanager
def peak_within(device: str) -> Iterator[dict[str, float]]:
    """Peak tensor memory allocated within the block above what was allocated before it, in MiB."""
    result: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield result
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    result["mib"] = peak / 2**20


def vmap_sq_norms(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    """Per-example squared gradient norms from materialised per-example gradients (torch.func)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss_of_one(params: dict[str, Tensor], tokens: Tensor, targets: Tensor) -> Tensor:
        logits = functional_call(model, params, (tokens.unsqueeze(0),))
        return F.cross_entropy(logits.float().flatten(0, 1), targets)

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, tokens, targets)
    return torch.stack([g.flatten(1).float().square().sum(dim=1) for g in grads.values()]).sum(dim=0)


def section_memory(s: Settings) -> list[Row]:
    torch.manual_seed(0)
    model = GPT(s, manual_attention=True).to(s.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    tokens, targets = (t.to(s.device) for t in token_batches(s, 1, s.memory_batch, seed=3)[0])

    def step(variant: str, tracker: GradientNoiseScaleTracker | None) -> None:
        optimizer.zero_grad(set_to_none=True)
        if tracker is not None:
            tracker.start_micro_batch(units=len(tokens))
        with torch.autocast(s.device, dtype=torch.bfloat16):
            logits = model(tokens)
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).backward()
        if tracker is not None:
            tracker.end_micro_batch()
            tracker.measure_step()
        if variant == "vmap":
            with torch.autocast(s.device, dtype=torch.bfloat16):
                vmap_sq_norms(model, tokens, targets)
        optimizer.step()

    peaks: dict[str, float] = {}
    covered = float("nan")
    for variant in ("plain", "per_example", "vmap"):
        tracker = None
        if variant == "per_example":
            tracker = GradientNoiseScaleTracker()
            tracker.attach(model.parameters(), mode="per_example", model=model)
            tracker.to(s.device)
        step(variant, tracker)  # warm-up: optimizer state and allocator caches exist before the measured step
        with peak_within(s.device) as peak:
            step(variant, tracker)
        peaks[variant] = peak["mib"]
        if tracker is not None:
            covered = tracker.covered_fraction
            tracker.detach()
    how = "max_memory_allocated" if s.cuda else "profiler allocation events"
    return [
        Row(
            "(d) peak memory",
            f"one step, {s.memory_batch} x {s.seq_len} tokens, bf16 autocast, attention written out ({how})",
            f"plain {peaks['plain']:.1f} MiB; + per_example {peaks['per_example']:.1f} MiB"
            f" ({peaks['per_example'] - peaks['plain']:+.1f}, covered_fraction {covered:.4f});"
            f" + vmap per-example grads {peaks['vmap']:.1f} MiB ({peaks['vmap'] - peaks['plain']:+.1f})",
            "per_example far below vmap",
            "yes" if peaks["per_example"] < peaks["vmap"] else "**NO**",
        )
    ]


# ---------------------------------------------------------------------------------------------- main
SECTIONS: dict[str, Callable[[Settings], list[Row]]] = {
    "syncs": section_syncs,
    "overflow": section_overflow,
    "overhead": section_overhead,
    "memory": section_memory,
}


def table(rows: list[Row]) -> str:
    lines = ["| check | configuration | result | expected | ok |", "|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.configuration} | {r.result} | {r.expected} | {r.ok} |" for r in rows]
    return "\n".join(lines)


def quiet() -> None:
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(num_workers|log_every_n_steps|does not have many workers).*")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="GPU checks of lightning_gns: host syncs, fp16 overflow skipping, overhead on a GPT-2-small"
        " model, per_example vs vmap memory. Prints one Markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, few steps (about a minute)")
    parser.add_argument("--out", metavar="FILE.md", help="also write the table (and the run's header) to this file")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--seq-len", type=int, help="sequence length of the GPT (default 1024; 512 is quicker)")
    parser.add_argument("--fit-pairs", type=int, help="fits with the callback per mode in (c) (default 4)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    if args.dry_run:
        s = DRY
    elif not torch.cuda.is_available():
        print("No CUDA device: run on a GPU machine, or pass --dry-run for the CPU smoke run.", file=sys.stderr)
        return 2
    else:
        s = FULL
    overrides = {k: v for k, v in (("seq_len", args.seq_len), ("fit_pairs", args.fit_pairs)) if v is not None}
    s = Settings(**{**s.__dict__, **overrides})
    started = time.perf_counter()
    rows: list[Row] = []
    for name, section in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        section_start = time.perf_counter()
        try:
            rows += section(s)
        except Exception as error:  # one broken section must not hide the others' results
            traceback.print_exc()
            rows.append(Row(name, "", f"{type(error).__name__}: {error}".replace("|", "/")[:300], "", "**error**"))
        print(f"  {name}: {time.perf_counter() - section_start:.0f} s", file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name() if s.cuda else "CPU (dry run)"
    header = (
        f"lightning_gns gpu_check{' --dry-run' if args.dry_run else ''}: {device}; torch {torch.__version__};"
        f" lightning_gns from {os.path.dirname(lightning_gns.__file__)}; GPT {s.n_layer} layers, d_model {s.d_model},"
        f" {s.n_head} heads, sequence {s.seq_len}, vocabulary {s.vocab}; total {time.perf_counter() - started:.0f} s."
    )
    text = f"{header}\n\n{table(rows)}\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if all(r.ok in ("yes", "info", "skipped (CPU: no sync debug mode)") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
