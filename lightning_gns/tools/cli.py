"""The ``lightning-gns`` console script: ``report``, ``sweep`` and ``branch``.

The console script's entry point is ``main`` here: one argparse parser, each command's arguments added by
its module's public ``add_arguments`` or here. Lightning is imported only when a sweep or branch actually
runs, so ``--help`` is quick.

    lightning-gns sweep --model pkg.models:make_model --data pkg.data:make_datamodule \\
        --batch-sizes 16 64 256 --target-loss 0.3 --seeds 0 1 2 -o sweep_out
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_gns.batch_schedule import FIXED_LR_SCALINGS
from lightning_gns.tools import report
from lightning_gns.tools.critical_batch import CriticalBatchError

if TYPE_CHECKING:  # lightning_gns.tools.sweep imports Lightning: only when a sweep runs
    from lightning_gns.tools.sweep import SweepRun

EXIT_USAGE = 2


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="MODULE:FACTORY or FILE.py:FACTORY; FACTORY(lr=...) returns a LightningModule"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="MODULE:FACTORY or FILE.py:FACTORY; FACTORY(batch_size=..., seed=...) returns a LightningDataModule",
    )
    parser.add_argument("--monitor", default="val/loss", help="validation loss the model logs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (data order and init)")
    parser.add_argument("--beta", type=float, default=0.95, help="GradientNoiseScale EMA decay per step")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("-o", "--output", required=True, help="output directory (table, CSV, JSON, plot)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the whole console script: ``report``, ``sweep`` and ``branch``."""
    parser = argparse.ArgumentParser(
        prog="lightning-gns", description="Tools for the gradient noise scale logged by lightning_gns."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report_parser = commands.add_parser(
        "report",
        help="summarize and plot the gns/ scalars of TensorBoard runs",
        description=report.REPORT_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    report.add_arguments(report_parser)
    sweep = commands.add_parser(
        "sweep",
        help="batch-size sweep: steps and examples to a target loss, fitted B_crit beside B_simple",
        description="For each batch size (and learning rate), train until the monitored validation loss first"
        " reaches --target-loss; fit (S/S_min - 1)(E/E_min - 1) = 1 (McCandlish et al. 2018, eq. 2.11) and report"
        " B_crit = E_min / S_min beside the run-averaged B_simple of the GradientNoiseScale callback.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_common(sweep)
    sweep.add_argument("--batch-sizes", type=int, nargs="+", required=True, help="batch sizes to sweep")
    sweep.add_argument("--target-loss", type=float, required=True, help="target value of --monitor")
    sweep.add_argument("--lr", type=float, required=True, help="learning rate at --base-batch-size")
    sweep.add_argument("--base-batch-size", type=int, required=True, help="batch size that --lr belongs to")
    sweep.add_argument("--lr-rule", choices=FIXED_LR_SCALINGS, default="linear", help="lr scaling with B")
    sweep.add_argument(
        "--lr-grid",
        type=float,
        nargs="+",
        default=[1.0],
        help="factors on the rule's lr to try per batch size; the fastest (median steps) is kept",
    )
    sweep.add_argument("--max-examples", type=int, default=200_000, help="example budget of one run")
    sweep.add_argument("--eval-every-examples", type=int, default=256, help="validation interval, in examples")
    sweep.add_argument(
        "--patience", type=int, default=30, help="give a run up after this many evaluations without a new best loss"
    )
    sweep.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples for the intervals")

    branch = commands.add_parser(
        "branch",
        help="local critical batch size by branched training (Merrill et al. 2025) beside B_simple",
        description="Train at --batch-size to each of --at-steps; from each, branch with batch k x B and lr x f(k)"
        " for --branch-examples examples, and report the largest k whose validation loss stays within"
        " --tolerance of the smaller ones, beside B_simple measured at that point.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_common(branch)
    branch.add_argument("--batch-size", type=int, required=True, help="base run's batch size")
    branch.add_argument("--lr", type=float, required=True, help="base run's learning rate")
    branch.add_argument("--at-steps", type=int, nargs="+", required=True, help="optimizer steps to branch from")
    branch.add_argument("--branch-examples", type=int, required=True, help="examples each branch trains on")
    branch.add_argument("--multipliers", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="batch multipliers k")
    branch.add_argument("--lr-rule", choices=FIXED_LR_SCALINGS, default="sqrt", help="f(k)")
    branch.add_argument("--tolerance", type=float, default=0.02, help="relative loss tolerance")
    branch.add_argument("--base-seed", type=int, default=0, help="seed of the base run")
    return parser


_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


def _json_text(value: Any) -> str:
    """Strict JSON (what parsers other than Python's read): a non-finite number (an undefined spread, a B_simple
    while |G|^2 is not positive) is written as null."""

    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(v) for key, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(v) for v in item]
        return item

    return json.dumps(finite(value), indent=2, allow_nan=False) + "\n"


def _quiet_lightning() -> None:
    """Silence Lightning's per-fit info lines for the many fits of a sweep (``main`` puts the levels back)."""
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_sweep_command(args: argparse.Namespace) -> int:
    from lightning_gns.tools.sweep import (
        format_sweep_table,
        load_factory,
        plot_sweep,
        run_sweep,
        sweep_records,
    )

    _quiet_lightning()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def progress(r: SweepRun) -> None:
        print(
            f"B={r.batch_size:<5d} lr={r.lr:<8.4g} seed={r.seed}: steps to target {r.steps:8.1f},"
            f" run-avg B_simple {r.b_simple_mean:8.1f} ({r.wall_s:.1f} s)",
            flush=True,
        )

    result = run_sweep(
        load_factory(args.model),
        load_factory(args.data),
        batch_sizes=args.batch_sizes,
        target_loss=args.target_loss,
        seeds=args.seeds,
        base_lr=args.lr,
        base_batch_size=args.base_batch_size,
        lr_rule=args.lr_rule,
        lr_grid=args.lr_grid,
        monitor=args.monitor,
        max_examples=args.max_examples,
        eval_every_examples=args.eval_every_examples,
        beta=args.beta,
        patience=args.patience,
        num_resamples=args.resamples,
        trainer_kwargs={"accelerator": args.accelerator},
        progress=progress,
    )
    table = format_sweep_table(result)
    print()
    print(table)
    (out / "sweep.md").write_text(table + "\n")
    records = sweep_records(result)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    summary = {"target_loss": result.target_loss, "monitor": result.monitor, "fit_error": result.fit_error}
    if result.bootstrap is not None:
        fit = result.bootstrap.fit
        summary.update(
            s_min=fit.s_min,
            e_min=fit.e_min,
            b_crit=fit.b_crit,
            b_crit_interval=list(result.bootstrap.b_crit_interval),
            confidence=result.bootstrap.confidence,
            rel_rms=fit.rel_rms,
        )
    summary["b_simple_median"] = result.b_simple_median()
    (out / "fit.json").write_text(_json_text(summary))
    written = [out / "sweep.md", out / "runs.csv", out / "fit.json"]
    # Log axes need at least one run that reached the target.
    if any(r.reached for r in result.runs):
        try:
            written.append(plot_sweep(result, out / "sweep.png"))
        except ImportError as error:  # the table and the fit are written; the plot needs the [report] extra
            print(f"no plot ({error}): pip install 'lightning-gns[report]' for sweep.png", file=sys.stderr)
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0 if result.bootstrap is not None else 1


def run_branch_command(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from lightning_gns.tools.sweep import branched_critical_batch, format_branch_table, load_factory

    _quiet_lightning()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    points = branched_critical_batch(
        load_factory(args.model),
        load_factory(args.data),
        batch_size=args.batch_size,
        lr=args.lr,
        at_steps=args.at_steps,
        branch_examples=args.branch_examples,
        multipliers=args.multipliers,
        lr_rule=args.lr_rule,
        tolerance=args.tolerance,
        seeds=args.seeds,
        base_seed=args.base_seed,
        monitor=args.monitor,
        beta=args.beta,
        trainer_kwargs={"accelerator": args.accelerator},
    )
    table = format_branch_table(points, args.batch_size)
    print(table)
    (out / "branch.md").write_text(table + "\n")
    (out / "branch.json").write_text(_json_text([asdict(p) for p in points]))
    print(f"\nwrote {out / 'branch.md'}, {out / 'branch.json'}")
    return 0


def run_report_command(args: argparse.Namespace) -> int:
    report.run_report(args.logdir, args.output, args.loss_tag, args.smoothing, args.dpi, args.units)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-gns`` console script; returns the exit status (2 for a usage error)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    commands = {"report": run_report_command, "sweep": run_sweep_command, "branch": run_branch_command}
    levels = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    try:
        return commands[args.command](args)
    except (CriticalBatchError, report.ReportError) as error:
        print(f"lightning-gns {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:  # called from Python (a notebook), the caller's logging stays as it was
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
