"""The example trainings on 2 CPU processes with DDP (gloo): the noise scale from per-rank gradients.

Under DDP each rank's gradient, before the all-reduce, is a small batch, and the all-reduced gradient is
the big batch (``mode="ddp"``, chosen automatically with several processes). Without accumulation the
callback reads the per-rank gradients in a DDP communication hook; with ``--accumulate k`` every
(rank, micro-batch) gradient is a small batch, which gives ``2k`` small batches per step instead of 2:
two ranks alone give one degree of freedom per step, a slow and noisy estimate.

    python example_projects/ddp_example.py                      # digits classifier, 2 processes
    python example_projects/ddp_example.py --example char       # character transformer, 2 processes
    python example_projects/ddp_example.py --example char --max-steps 100 --logdir runs

Options after ``--example`` go to that example's script (see its ``--help``); this script only sets the
number of processes and the DDP strategy. Lightning starts the second process by running this same
command line again, so the script must be run as a file, not from a notebook.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# The examples are scripts in this folder, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import char_transformer
import digits_classifier

EXAMPLES = ("digits", "char")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Run example_projects/digits_classifier.py or char_transformer.py on several CPU processes"
        " with DDP; unrecognised options are passed to that script (e.g. --logdir, --accumulate, and --max-epochs"
        " for digits or --max-steps for char).",
        epilog="The other options: python example_projects/digits_classifier.py --help, or"
        " python example_projects/char_transformer.py --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--example", choices=EXAMPLES, default="digits", help="which training to run")
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (DDP ranks)")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen example with ``--devices`` DDP processes; returns that example's results."""
    args, rest = parse_args(argv)
    if args.devices < 2:
        raise SystemExit("ddp_example.py needs --devices 2 or more; run the example script itself for one process.")
    if args.example == "digits":
        return digits_classifier.main(
            ["--devices", str(args.devices), "--strategy", "ddp", "--name", "digits_ddp", *rest]
        )
    # char_transformer.py picks strategy="ddp" itself when --devices > 1.
    return char_transformer.main(["--devices", str(args.devices), "--name", "char_transformer_ddp", *rest])


if __name__ == "__main__":
    main()
