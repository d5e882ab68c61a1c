"""The temperature check: late in training, halving the learning rate or doubling the batch should double B_simple.

McCandlish et al. (2018, section 2.3) argue that the noise scale measured during SGD training scales like
``1/T`` with the temperature ``T = lr / B``: a run at a lower temperature settles deeper and sees a smaller
gradient against the same per-example noise. This script trains the digits example (SGD, momentum 0.9) for
``--base-steps`` optimizer steps, then continues from that state in three branches for ``--branch-steps``
steps each, with a fresh ``GradientNoiseScale`` callback:

- control: the same lr and batch;
- lr / 2 at the same batch (T halved);
- batch x 2 at the same lr (T halved).

B_simple is averaged over the second half of each branch (after the new temperature has had half the branch
to settle) and divided by the control's. Under the temperature model both ratios are about 2. Each seed
repeats the whole procedure (base run included); the table gives the mean, the standard deviation over
seeds and each seed's ratio.

    python benchmarks/temperature.py --seeds 0 1 2                                  # ~1.5 min, 2 CPU cores
    python benchmarks/temperature.py --seeds 0 1 2 --base-steps 100 --branch-steps 100  # mid-run, ~1 min
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "example_projects"))
from digits_sweep import datamodule, model

from lightning_gns import GradientNoiseScale
from lightning_gns.tools.sweep import BranchStart


class _Record(Callback):
    def __init__(self, gns: GradientNoiseScale) -> None:
        self.gns = gns
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.values.append(self.gns.b_simple)


def _fit(module: LightningModule, batch_size: int, seed: int, steps: int, callbacks: list[Callback]) -> None:
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, datamodule=datamodule(batch_size=batch_size, seed=seed))


def run_seed(
    seed: int, lr: float, batch_size: int, base_steps: int, branch_steps: int, beta: float
) -> dict[str, float]:
    """B_simple over the late half of each branch, for one seed."""
    seed_everything(seed, verbose=False)
    base = model(lr=lr)
    _fit(base, batch_size, seed, base_steps, [GradientNoiseScale(beta=beta)])
    state = copy.deepcopy(base.state_dict())
    optimizer_state = copy.deepcopy(base.trainer.optimizers[0].state_dict())
    results = {}
    for name, lr_factor, batch in (
        ("control", 1.0, batch_size),
        ("lr/2", 0.5, batch_size),
        ("2B", 1.0, 2 * batch_size),
    ):
        seed_everything(seed + 1000, verbose=False)
        branch = model(lr=lr)
        branch.load_state_dict(state)
        gns = GradientNoiseScale(beta=beta)
        record = _Record(gns)
        _fit(branch, batch, seed + 1000, branch_steps, [gns, record, BranchStart(optimizer_state, lr_factor)])
        late = [v for v in record.values[branch_steps // 2 :] if math.isfinite(v)]
        results[name] = float(np.mean(late))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--base-steps", type=int, default=300, help="steps before branching (~7 epochs at B=32)")
    parser.add_argument("--branch-steps", type=int, default=200, help="steps of each branch")
    parser.add_argument("--beta", type=float, default=0.95, help="GNS EMA decay (~20 steps)")
    args = parser.parse_args(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    rows = []
    for seed in args.seeds:
        r = run_seed(seed, args.lr, args.batch_size, args.base_steps, args.branch_steps, args.beta)
        rows.append(r)
        print(
            f"seed {seed}: B_simple control {r['control']:.1f}, lr/2 {r['lr/2']:.1f}, 2B {r['2B']:.1f};"
            f" ratios {r['lr/2'] / r['control']:.2f}, {r['2B'] / r['control']:.2f}",
            flush=True,
        )
    print()
    print(f"digits, SGD momentum 0.9, lr {args.lr}, B {args.batch_size}, branch after {args.base_steps} steps,")
    print(f"B_simple averaged over the last {args.branch_steps - args.branch_steps // 2} of {args.branch_steps} steps")
    print()
    print("| branch | temperature | B_simple (mean ± std over seeds) | ratio to control (mean ± std) | per seed |")
    print("|---|---|---|---|---|")
    for name, temp in (("control", "T"), ("lr/2", "T/2"), ("2B", "T/2")):
        values = np.array([r[name] for r in rows])
        ratios = np.array([r[name] / r["control"] for r in rows])
        spread = f" ± {values.std(ddof=1):.1f}" if len(rows) > 1 else ""
        ratio_spread = f" ± {ratios.std(ddof=1):.2f}" if len(rows) > 1 else ""
        per_seed = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"| {name} | {temp} | {values.mean():.1f}{spread} | {ratios.mean():.2f}{ratio_spread} | {per_seed} |")


if __name__ == "__main__":
    main()
