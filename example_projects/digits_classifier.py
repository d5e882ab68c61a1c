"""Train a small conv net on scikit-learn's 8x8 digits and log the gradient noise scale to TensorBoard.

The data ships inside scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded. The
defaults (20 epochs, 220 optimizer steps) finish in well under a minute on two CPU cores:

    python example_projects/digits_classifier.py
    tensorboard --logdir lightning_logs

Each optimizer step accumulates ``--accumulate`` micro-batches of ``--batch-size`` examples; the callback
uses every micro-batch gradient as a small batch and the accumulated gradient as the big batch
(``mode="microbatch"``). With ``--devices 2 --strategy ddp`` each rank's micro-batch is a small batch instead
(``mode="ddp"``). ``--adaptive-accumulation`` lets ``AdaptiveBatchSize`` grow the accumulation as the
measured noise scale grows.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale

NUM_CLASSES = 10
VAL_FRACTION = 0.2


class DigitsClassifier(LightningModule):
    """Two 3x3 convolutions and an MLP head: ~38k parameters, enough for >95% on 8x8 digits."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _loss_and_accuracy(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        # The mean over the micro-batch's examples: GradientNoiseScale counts batch sizes in examples.
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        return loss, accuracy

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, accuracy = self._loss_and_accuracy(batch)
        # sync_dist: the epoch averages cover every DDP rank's examples, not rank 0's alone.
        self.log("train/loss", loss, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/acc", accuracy, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, accuracy = self._loss_and_accuracy(batch)
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/acc", accuracy, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # SGD: B_simple measured during training depends on the "temperature" lr / batch size, so a learning
        # rate far too small inflates it (see the README).
        return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=self.hparams["momentum"])


def digits_datasets(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """The 1797 bundled 8x8 digits, pixel values scaled to [0, 1], split train/val with a fixed permutation."""
    from sklearn.datasets import load_digits  # imported here so `--help` works without scikit-learn

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    num_val = int(len(y) * VAL_FRACTION)
    val_idx, train_idx = order[:num_val], order[num_val:]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])


def _int_or_float(text: str) -> int | float:
    # Lightning reads an int as a number of batches and a float as a fraction of the epoch.
    return float(text) if "." in text else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a small conv net on the 8x8 digits bundled with scikit-learn and log the gradient"
        " noise scale (gns/* scalars) to TensorBoard.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--max-epochs", type=int, default=20, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch size (the small batch, in examples)")
    parser.add_argument(
        "--accumulate",
        type=int,
        default=4,
        help="micro-batches accumulated per optimizer step (big batch = batch-size x accumulate x devices)",
    )
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument(
        "--beta",
        type=float,
        default=0.95,
        help="GNS EMA decay per optimizer step (0.95 averages ~20 steps; the default run has 220 steps)",
    )
    parser.add_argument("--mode", choices=["auto", "ddp", "microbatch"], default="auto", help="GNS mode")
    parser.add_argument(
        "--adaptive-accumulation",
        action="store_true",
        help="let lightning_gns.AdaptiveBatchSize grow the accumulation from --accumulate (its default target,"
        " 0.25 x B_simple at the estimate's lower confidence bound, at most doubling per change; SGD learning rate x"
        " batch ratio); logs gns/effective_batch_size, gns/accumulation, gns/lr_factor. From the default"
        " --accumulate 4 (128 examples) the target stays below the batch in this run's 20 epochs; from"
        " --accumulate 1 it grows to 2",
    )
    parser.add_argument("--max-accumulation", type=int, default=16, help="upper bound for --adaptive-accumulation")
    parser.add_argument("--logdir", type=str, default="lightning_logs", help="TensorBoard log directory")
    parser.add_argument("--name", type=str, default="digits", help="experiment name (a subfolder of --logdir)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the model and the shuffling")
    parser.add_argument(
        "--limit-train-batches",
        type=_int_or_float,
        default=1.0,
        help="micro-batches per epoch (int) or fraction of the epoch (float), for quick runs",
    )
    parser.add_argument(
        "--limit-val-batches",
        type=_int_or_float,
        default=1.0,
        help="validation batches per epoch (int) or fraction (float)",
    )
    parser.add_argument("--log-every-n-steps", type=int, default=2, help="log every n optimizer steps")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (use 2 with --strategy ddp)")
    parser.add_argument("--strategy", choices=["auto", "ddp"], default="auto", help="Lightning strategy")
    parser.add_argument(
        "--num-threads", type=int, default=1, help="torch CPU threads per process (1 is fastest for 8x8 images)"
    )
    parser.add_argument("--no-progress-bar", action="store_true", help="disable the progress bar")
    return parser.parse_args(argv)


def adaptive_callbacks(args: argparse.Namespace) -> list[AdaptiveBatchSize]:
    """``AdaptiveBatchSize`` when ``--adaptive-accumulation`` is given."""
    if not args.adaptive_accumulation:
        return []
    # The default run has 220 optimizer steps: first change after 20, then at most every 20.
    return [
        AdaptiveBatchSize(
            max_accumulation=args.max_accumulation,
            warmup_steps=20,
            min_steps_between_changes=20,
            check_every_n_steps=5,
            lr_scaling="linear",
            prog_bar=True,
        )
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print a summary on the main process, and return the final numbers (used by the tests)."""
    args = parse_args(argv)
    # The data set lives in memory; worker processes would only add start-up time.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # The tensors are tiny: synchronising several threads costs more than it saves (several times slower on a
    # busy 2-core machine), and one thread per process leaves a core to each DDP rank.
    torch.set_num_threads(args.num_threads)
    seed_everything(args.seed, workers=True, verbose=False)

    train_set, val_set = digits_datasets(args.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=True,
        # Full accumulation windows only: a one-micro-batch window at the end of an epoch has no second small
        # batch to compare with, and the callback would skip (and count) it.
        drop_last=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_loader = DataLoader(val_set, batch_size=256)

    gns = GradientNoiseScale(beta=args.beta, mode=args.mode, prog_bar=True)
    logger = TensorBoardLogger(save_dir=args.logdir, name=args.name)
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy,
        max_epochs=args.max_epochs,
        accumulate_grad_batches=args.accumulate,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=args.limit_val_batches,
        log_every_n_steps=args.log_every_n_steps,
        callbacks=[gns, *adaptive_callbacks(args)],
        logger=logger,
        enable_checkpointing=False,  # a demo; nothing to resume
        enable_progress_bar=not args.no_progress_bar,
        enable_model_summary=False,
    )
    model = DigitsClassifier(lr=args.lr, momentum=args.momentum)
    trainer.fit(model, train_loader, val_loader)

    metrics = trainer.callback_metrics
    results: dict[str, Any] = {
        "train_loss": _metric(metrics, "train/loss_epoch"),
        "train_acc": _metric(metrics, "train/acc"),
        "val_loss": _metric(metrics, "val/loss"),
        "val_acc": _metric(metrics, "val/acc"),
        "b_simple": gns.b_simple,
        "grad_sq_norm": gns.grad_sq_norm,
        "trace_cov": gns.trace_cov,
        "skipped_steps": gns.skipped_steps,
        "mode": gns.mode,
        "optimizer_steps": trainer.global_step,
        "accumulation": trainer.accumulate_grad_batches,
        "log_dir": logger.log_dir,
    }
    if trainer.is_global_zero:
        _print_summary(results, args.logdir)
    return results


def _metric(metrics: dict[str, Any], name: str) -> float:
    value = metrics.get(name)
    return float(value) if value is not None else float("nan")


def _print_summary(results: dict[str, Any], logdir: str) -> None:
    print()
    print(f"optimizer steps:  {results['optimizer_steps']} (GNS mode {results['mode']!r})")
    print(f"accumulation:     {results['accumulation']} micro-batches per optimizer step at the end")
    print(f"train loss / acc: {results['train_loss']:.4f} / {results['train_acc']:.4f}  (last epoch)")
    print(f"val loss / acc:   {results['val_loss']:.4f} / {results['val_acc']:.4f}")
    print(f"gns.b_simple:     {results['b_simple']:.1f} examples")
    print(f"  |G|^2 = {results['grad_sq_norm']:.4g}, tr(Sigma) = {results['trace_cov']:.4g},", end=" ")
    print(f"skipped steps = {results['skipped_steps']}")
    print(f"TensorBoard logs: {results['log_dir']}")
    print(f"View them with:   {_tensorboard_command()} --logdir {shlex.quote(logdir)}")


def _tensorboard_command() -> str:
    # Prefer the tensorboard next to this interpreter (.venv/bin/tensorboard after `make demo`), which need
    # not be on PATH.
    candidate = Path(sys.executable).parent / "tensorboard"
    if not candidate.exists():
        return shutil.which("tensorboard") or "tensorboard"
    cwd = Path.cwd()
    return str(candidate.relative_to(cwd)) if candidate.is_relative_to(cwd) else str(candidate)


if __name__ == "__main__":
    main()
