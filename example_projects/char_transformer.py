"""A character-level transformer language model on Python's own standard library, with the noise scale.

The text is the source of a fixed list of standard-library modules, read from the running interpreter's
``sysconfig.get_paths()["stdlib"]``: nothing is downloaded, and a given Python version always trains on
the same characters (UTF-8 bytes: a 256-symbol vocabulary). The defaults (a 2-layer, d_model 64,
context 64 model, 600 optimizer steps) finish in about 25 s on two idle CPU cores:

    python example_projects/char_transformer.py
    lightning-gns report lightning_logs/char_transformer -o char_transformer.png

The loss is the mean over every token of the micro-batch, so ``GradientNoiseScale`` counts tokens
(``batch_size_fn`` returns B x T) and ``gns/b_simple`` is in tokens. Tokens of one sequence are not
independent, so the noise scale in sequences, ``gns/b_simple_sequences`` = tokens / context, is logged too.
McCandlish et al. (2018) observe that the noise scale grows as the loss falls; the run ends with a table
of B_simple and the loss at a few points of training to check that here.

Every parameter sits in an ``nn.Linear``, ``nn.Embedding`` or ``nn.LayerNorm`` called directly, so
``mode="per_example"`` (the default on one device without accumulation) covers the whole model: the
attention is written nanoGPT style with ``nn.Linear`` projections, because ``nn.MultiheadAttention``
calls its projections through ``F.linear``, which the per-example hooks cannot see.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.scalars import B_SIMPLE
from lightning_gns.tools.report import Scalars, load_runs, loss_at

VOCAB_SIZE = 256  # UTF-8 bytes
# A fixed list, so the corpus only changes with the Python version (~0.95 MB of source on 3.11).
STDLIB_FILES: tuple[str, ...] = (
    "argparse.py",
    "textwrap.py",
    "dataclasses.py",
    "functools.py",
    "difflib.py",
    "fractions.py",
    "heapq.py",
    "string.py",
    "shlex.py",
    "statistics.py",
    "pprint.py",
    "inspect.py",
    "typing.py",
    "enum.py",
    "configparser.py",
    "calendar.py",
    "csv.py",
    "json/decoder.py",
    "json/encoder.py",
    "collections/__init__.py",
)
VAL_FRACTION = 0.05
B_SIMPLE_SEQUENCES = "gns/b_simple_sequences"
LOSS_TAG = "train_loss"


# ------------------------------------------------------------------------------------------------- data
def stdlib_text(files: tuple[str, ...] = STDLIB_FILES) -> bytes:
    """The concatenated source of ``files`` from this interpreter's standard library, as bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise SystemExit(
            f"The standard library at {root} lacks {', '.join(missing)} (a Python without its .py sources?)."
            " Install the full Python distribution, or edit STDLIB_FILES in this script."
        )
    return b"\n".join((root / name).read_bytes() for name in files)


class ChunkDataset(Dataset[tuple[Tensor, Tensor]]):
    """Non-overlapping windows of ``context`` tokens; the target is the window shifted by one token."""

    def __init__(self, tokens: Tensor, context: int) -> None:
        self.tokens = tokens
        self.context = context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.context
        window = self.tokens[start : start + self.context + 1]
        return window[:-1], window[1:]


def datasets(context: int) -> tuple[ChunkDataset, ChunkDataset]:
    """Train on the first 95% of the corpus, validate on the rest."""
    tokens = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8).long()
    split = int(len(tokens) * (1 - VAL_FRACTION))
    return ChunkDataset(tokens[:split], context), ChunkDataset(tokens[split:], context)


def count_tokens(batch: tuple[Tensor, Tensor]) -> int:
    """The tokens of a micro-batch: the loss is a mean over its B x T tokens."""
    return batch[0].numel()


def tokens_per_sequence(batch: tuple[Tensor, Tensor]) -> Tensor:
    """``batch_size_fn``: each sequence's tokens (all T here; a padded batch would return mask.sum(dim=1)).

    One count per example tells per-example measurement how the micro-batch's tokens and loss split between
    its sequences, so B_simple is counted in tokens.
    """
    inputs = batch[0]
    return torch.full((inputs.shape[0],), inputs.shape[1], dtype=torch.long, device=inputs.device)


# ------------------------------------------------------------------------------------------------ model
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with ``nn.Linear`` projections (covered by per-example mode)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of the number of heads ({num_heads})")
        self.num_heads = num_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, time, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, time, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(batch, time, channels))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class CharTransformer(LightningModule):
    """A small GPT over bytes, trained with AdamW at a constant learning rate.

    Constant, because a decaying learning rate lowers the "temperature" and inflates the measured noise
    scale on its own (McCandlish et al. 2018, section 2.3): the growth seen here is then the loss's doing.
    """

    def __init__(
        self, context: int = 64, d_model: int = 64, num_layers: int = 2, num_heads: int = 4, lr: float = 2e-3
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok_emb = nn.Embedding(VOCAB_SIZE, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, VOCAB_SIZE, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        batch, time = idx.shape
        # Positions expanded to (batch, time): per-example gradients read the batch from a layer's input.
        positions = torch.arange(time, device=idx.device).expand(batch, time)
        x = self.tok_emb(idx) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        logits = self(x)
        # Mean over every token of the micro-batch: the unit count_tokens reports.
        return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), y.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log(LOSS_TAG, loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], betas=(0.9, 0.99), weight_decay=0.01)


class NoiseScaleInSequences(Callback):
    """Logs ``gns/b_simple_sequences``: the noise scale in sequences (tokens / context).

    Placed after ``GradientNoiseScale`` in the callback list, it reads the estimate that callback has just
    updated in the same hook. The value stays a tensor: Lightning converts it only on logging steps.
    """

    def __init__(self, gns: GradientNoiseScale, context: int) -> None:
        self.gns = gns
        self.context = context

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        value = self.gns.metric.b_simple.float() / self.context
        pl_module.log(B_SIMPLE_SEQUENCES, value, on_step=True, on_epoch=False, batch_size=1)


# -------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a character-level transformer on Python's standard-library sources and log the"
        " gradient noise scale in tokens (gns/b_simple) and sequences (gns/b_simple_sequences) to TensorBoard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--max-steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch (per process)")
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--d-model", type=int, default=64, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (constant)")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches accumulated per optimizer step")
    parser.add_argument(
        "--devices", type=int, default=1, help="CPU processes; 2 or more train with DDP (strategy='ddp', gloo)"
    )
    parser.add_argument(
        "--mode",
        choices=["auto", "ddp", "microbatch", "per_example"],
        default="auto",
        help="GNS mode; auto: ddp with several devices, microbatch with --accumulate > 1, else per_example",
    )
    parser.add_argument(
        "--beta", type=float, default=0.95, help="GNS EMA decay per optimizer step (0.95 averages ~20 steps)"
    )
    parser.add_argument(
        "--adaptive-accumulation",
        action="store_true",
        help="let lightning_gns.AdaptiveBatchSize grow the accumulation with its defaults (target 0.25 x B_simple at"
        " the estimate's lower confidence bound, at most doubling per change; AdamW learning rate x sqrt(batch"
        " ratio): the defaults chosen with benchmarks/adaptive_lm.py); logs gns/effective_batch_size,"
        " gns/accumulation, gns/lr_factor",
    )
    parser.add_argument("--max-accumulation", type=int, default=16, help="upper bound for --adaptive-accumulation")
    parser.add_argument("--logdir", default="lightning_logs", help="TensorBoard log directory")
    parser.add_argument("--name", default="char_transformer", help="experiment name (a subfolder of --logdir)")
    parser.add_argument("--log-every-n-steps", type=int, default=10, help="log every n optimizer steps")
    parser.add_argument("--val-every", type=int, default=200, help="validate every n micro-batches (0: never)")
    parser.add_argument("--val-batches", type=int, default=8, help="validation micro-batches per validation")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model and the shuffling")
    parser.add_argument(
        "--num-threads",
        type=int,
        default=0,
        help="torch CPU threads per process (0: torch's default on one device, 1 per process with DDP)",
    )
    parser.add_argument("--no-progress-bar", action="store_true", help="disable the progress bar")
    return parser.parse_args(argv)


def adaptive_callbacks(args: argparse.Namespace) -> list[Callback]:
    """``AdaptiveBatchSize`` when ``--adaptive-accumulation`` is given."""
    if not args.adaptive_accumulation:
        return []
    # The library's target, calibration and learning-rate rule (chosen in docs/adaptive.md); sized to the run:
    # the first change after a tenth of it, at most every twentieth.
    return [
        AdaptiveBatchSize(
            max_accumulation=args.max_accumulation,
            warmup_steps=max(1, args.max_steps // 10),
            min_steps_between_changes=max(1, args.max_steps // 20),
            check_every_n_steps=max(1, min(10, args.max_steps // 60)),
            prog_bar=True,
        )
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print the B_simple trajectory on the main process, and return the final numbers."""
    args = parse_args(argv)
    extra_callbacks = adaptive_callbacks(args)
    # The data set lives in memory; worker processes would only add start-up time.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    if args.num_threads or args.devices > 1:
        # Each DDP process gets one core of a small machine instead of fighting over all of them.
        torch.set_num_threads(args.num_threads or 1)
    seed_everything(args.seed, workers=True, verbose=False)

    train_set, val_set = datasets(args.context)
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        # Equal micro-batches: a short last one would carry fewer tokens (counted right, but noisier).
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_loader = DataLoader(val_set, batch_size=args.batch_size)

    gns = GradientNoiseScale(beta=args.beta, mode=args.mode, batch_size_fn=tokens_per_sequence, prog_bar=True)
    logger = TensorBoardLogger(save_dir=args.logdir, name=args.name)
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        log_every_n_steps=args.log_every_n_steps,
        val_check_interval=args.val_every if args.val_every else None,
        check_val_every_n_epoch=None if args.val_every else 1,
        limit_val_batches=args.val_batches if args.val_every else 0,
        num_sanity_val_steps=0,
        callbacks=[gns, NoiseScaleInSequences(gns, args.context), *extra_callbacks],
        logger=logger,
        enable_checkpointing=False,  # a demo; nothing to resume
        enable_progress_bar=not args.no_progress_bar,
        enable_model_summary=False,
    )
    model = CharTransformer(args.context, args.d_model, args.layers, args.heads, args.lr)
    trainer.fit(model, train_loader, val_loader)

    results: dict[str, Any] = {
        "b_simple_tokens": gns.b_simple,
        "b_simple_sequences": gns.b_simple / args.context,
        "skipped_steps": gns.skipped_steps,
        "mode": gns.mode,
        "optimizer_steps": trainer.global_step,
        "log_dir": logger.log_dir,
    }
    if trainer.is_global_zero:
        parameters = sum(p.numel() for p in model.parameters())
        tokens_per_step = args.batch_size * args.context * args.accumulate * args.devices
        print(f"\n{parameters:,} parameters, {len(train_set) * args.context:,} training tokens,", end=" ")
        print(f"{tokens_per_step} tokens per optimizer step, GNS mode {gns.mode!r}, skipped steps {gns.skipped_steps}")
        for callback in extra_callbacks:
            if isinstance(callback, AdaptiveBatchSize):
                changes = ", ".join(f"{int(h['accumulation'])} from step {int(h['step'])}" for h in callback.history)
                print(f"adaptive accumulation: {changes} (learning-rate factor now {callback.lr_factor:.3g})")
        # Read back what TensorBoard got, as `lightning-gns report` would.
        run = next(iter(load_runs(logger.log_dir).values()))
        print(format_trajectory(run, args.context))
        print(f"TensorBoard logs: {logger.log_dir}")
        print(f"Picture: lightning-gns report {args.logdir} -o {args.name}.png")
    return results


def format_trajectory(run: Scalars, context: int, points: int = 5) -> str:
    """B_simple (tokens and sequences) and the smoothed training loss at ``points`` logged steps."""
    series = run.get(B_SIMPLE)
    if series is None or not np.isfinite(series.values).any():
        return "No finite B_simple was logged: train for more steps or lower --log-every-n-steps."
    finite = np.isfinite(series.values)
    steps, values = series.steps[finite], series.values[finite]
    picks = sorted(set(np.linspace(0, len(steps) - 1, min(points, len(steps))).round().astype(int).tolist()))
    losses = loss_at(steps, run.get(LOSS_TAG), smoothing=0.6)
    lines = [f"{'step':>6}  {'train loss':>10}  {'B_simple tokens':>15}  {'B_simple sequences':>18}"]
    lines += [f"{steps[i]:>6}  {losses[i]:>10.3f}  {values[i]:>15.1f}  {values[i] / context:>18.2f}" for i in picks]
    first, last = picks[0], picks[-1]
    ratio = values[last] / values[first]
    trend = "grew" if ratio > 1 else "did not grow"
    lines.append(
        f"B_simple {trend} {ratio:.2g}x from step {steps[first]} to {steps[last]} while the loss went from"
        f" {losses[first]:.3f} to {losses[last]:.3f} (McCandlish et al. 2018: it grows as the loss falls)."
    )
    return "\n".join(lines) if not math.isnan(ratio) else "\n".join(lines[:-1])


if __name__ == "__main__":
    main()
