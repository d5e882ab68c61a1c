"""``lightning-gns report LOGDIR``: summarize and plot the ``gns/`` scalars of TensorBoard runs.

The event files are read with TensorBoard's own reader (``EventMultiplexer``), so every run that
TensorBoard would show (each directory under LOGDIR holding event files) is a run here too.

The pieces are small functions that work without the command line::

    runs = load_runs("lightning_logs")                  # {run: {tag: Series}}
    loss_tag = find_loss_tag(runs["digits/version_0"])  # "train/loss_step"
    summary = summarize("digits/version_0", runs["digits/version_0"], loss_tag)
    print(format_table([summary]))
    plot_report(runs, {"digits/version_0": loss_tag}, "gns.png")

Only ``plot_report`` needs matplotlib (the ``report`` extra: ``pip install 'lightning-gns[report]'``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from tensorboard.backend.event_processing import event_accumulator, event_multiplexer

if TYPE_CHECKING:
    from matplotlib.axes import Axes

GNS_PREFIX = "gns/"
B_SIMPLE = "gns/b_simple"
GRAD_SQ_NORM = "gns/grad_sq_norm"
TRACE_COV = "gns/trace_cov"
B_BIG = "gns/b_big"
SKIPPED_STEPS = "gns/skipped_steps"
EFFECTIVE_BATCH = "gns/effective_batch_size"
ACCUMULATION = "gns/accumulation"
# Names people give the training loss, most specific first. Lightning's self.log(name, on_step=True,
# on_epoch=True) writes name + "_step" and name + "_epoch"; the per-step series is the one to plot.
LOSS_TAGS: tuple[str, ...] = (
    "train_loss",
    "train_loss_step",
    "train/loss",
    "train/loss_step",
    "loss",
    "loss_step",
    "training_loss",
    "training_loss_step",
    "train_loss_epoch",
    "train/loss_epoch",
)
# TensorBoard's scalar dashboard smooths with 0.6 by default; the same here keeps the pictures alike.
DEFAULT_SMOOTHING = 0.6
DEFAULT_OUTPUT = "gns_report.png"
EXIT_USAGE = 2

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class ReportError(Exception):
    """A problem the user can fix (wrong directory, nothing logged); ``main`` prints it and exits with 2."""


@dataclass(frozen=True)
class Series:
    """One scalar tag of one run: strictly increasing optimizer steps and their values."""

    steps: IntArray
    values: FloatArray

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def last(self) -> float:
        """The last logged value (NaN when nothing was logged)."""
        return float(self.values[-1]) if len(self.values) else math.nan


Scalars = dict[str, Series]


@dataclass(frozen=True)
class Point:
    """B_simple (and the training loss, NaN when unknown) at one logged step."""

    step: int
    b_simple: float
    loss: float


@dataclass(frozen=True)
class RunSummary:
    """What the summary table shows for one run.

    ``start``, ``middle`` and ``end`` are the first finite ``B_simple``, the finite one whose step is
    closest to the middle of the logged steps, and the last finite one. ``mean_b_simple`` averages the
    finite logged values (the run average of McCandlish et al.'s Table 1). ``infinite_points`` counts
    logged values that read as infinite: the averaged ``|G|^2`` estimate was not positive, which happens
    when the noise dominates whatever signal the estimate can resolve.
    """

    run: str
    start: Point
    middle: Point
    end: Point
    mean_b_simple: float
    finite_points: int
    infinite_points: int
    skipped_steps: int | None
    loss_tag: str | None


# ---------------------------------------------------------------------------------------------- loading
def load_runs(logdir: str | os.PathLike[str]) -> dict[str, Scalars]:
    """Every run under ``logdir`` (a directory holding event files, at any depth) with all its scalars.

    Run names are paths relative to ``logdir`` (``"."`` becomes the directory's own name), as TensorBoard
    shows them. A tag logged several times at one step (a resumed run) keeps its last value.

    Raises:
        ReportError: ``logdir`` is not a directory or holds no event files.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise ReportError(
            f"{str(root)!r} is not a directory. Pass the directory your TensorBoardLogger wrote to (its save_dir,"
            " e.g. lightning_logs) or one run's version_N folder."
        )
    # Size guidance 0 keeps every event: the default reservoir keeps a random 10,000 per tag.
    multiplexer = event_multiplexer.EventMultiplexer(size_guidance={event_accumulator.SCALARS: 0})
    multiplexer.AddRunsFromDirectory(str(root))
    multiplexer.Reload()
    run_tags: dict[str, dict[str, Any]] = multiplexer.Runs()
    if not run_tags:
        raise ReportError(
            f"No TensorBoard event files (events.out.tfevents.*) under {str(root)!r}. Pass the directory a"
            " TensorBoardLogger wrote to (Trainer(logger=TensorBoardLogger('lightning_logs')) writes"
            " lightning_logs/<name>/version_N/events.out.tfevents.*)."
        )
    runs: dict[str, Scalars] = {}
    for run in sorted(run_tags):
        name = root.resolve().name if run == "." else run
        tags = run_tags[run].get(event_accumulator.SCALARS, [])
        runs[name] = {tag: _series(multiplexer.Scalars(run, tag)) for tag in sorted(tags)}
    return runs


def _series(events: Iterable[Any]) -> Series:
    events = list(events)
    steps = np.array([event.step for event in events], dtype=np.int64)
    values = np.array([event.value for event in events], dtype=np.float64)
    # np.unique on the reversed arrays finds each step's last occurrence (events are in file order).
    unique_steps, reversed_index = np.unique(steps[::-1], return_index=True)
    return Series(steps=unique_steps, values=values[::-1][reversed_index])


def gns_runs(runs: Mapping[str, Scalars]) -> dict[str, Scalars]:
    """The runs that logged ``gns/b_simple``.

    Raises:
        ReportError: no run did.
    """
    selected = {name: scalars for name, scalars in runs.items() if B_SIMPLE in scalars}
    if not selected:
        other = sorted({tag for scalars in runs.values() for tag in scalars})
        shown = ", ".join(other[:12]) + (", ..." if len(other) > 12 else "") if other else "none"
        raise ReportError(
            f"Found {len(runs)} run(s) with event files but no {B_SIMPLE!r} scalar (scalars found: {shown})."
            " Train with lightning_gns.GradientNoiseScale in Trainer(callbacks=[...]) and a TensorBoardLogger;"
            " the values are logged every log_every_n_steps optimizer steps (Lightning's default 50 logs nothing"
            " in a shorter run: set Trainer(log_every_n_steps=...) lower)."
        )
    return selected


def find_loss_tag(scalars: Mapping[str, Series], requested: str | None = None) -> str | None:
    """The training-loss tag of a run: ``requested`` if given and present, else a common name, else a guess.

    The guess is a tag containing "loss" that is not a validation/test or ``gns/`` tag, preferring per-step
    tags to ``*_epoch`` ones. None when nothing fits.
    """
    if requested is not None:
        return requested if requested in scalars else None
    for tag in LOSS_TAGS:
        if tag in scalars:
            return tag
    candidates = [
        tag
        for tag in sorted(scalars)
        if "loss" in tag.lower()
        and not tag.startswith(GNS_PREFIX)
        and not any(word in tag.lower() for word in ("val", "test", "predict"))
    ]
    per_step = [tag for tag in candidates if not tag.endswith("_epoch")]
    preferred = per_step or candidates
    return preferred[0] if preferred else None


# ---------------------------------------------------------------------------------------------- numbers
def smooth(values: FloatArray, weight: float) -> FloatArray:
    """Bias-corrected exponential moving average over the logged points (``weight`` 0 returns the values).

    Non-finite values are passed over, as TensorBoard's smoothing does.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out = np.full_like(values, np.nan)
    average, norm = 0.0, 0.0
    for i, value in enumerate(values):
        if math.isfinite(value):
            average = weight * average + (1 - weight) * value
            norm = weight * norm + (1 - weight)
        if norm > 0:
            out[i] = average / norm
    return out


def loss_at(steps: IntArray, loss: Series | None, smoothing: float = 0.0) -> FloatArray:
    """The (smoothed) training loss at ``steps``: exact where logged at the same step, else interpolated.

    NaN outside the range of logged loss steps, or everywhere when ``loss`` is None.
    """
    if loss is None or len(loss) == 0:
        return np.full(len(steps), np.nan)
    values = smooth(loss.values, smoothing)
    finite = np.isfinite(values)
    if not finite.any():
        return np.full(len(steps), np.nan)
    known_steps, known_values = loss.steps[finite], values[finite]
    out = np.interp(steps, known_steps, known_values)
    out[(steps < known_steps[0]) | (steps > known_steps[-1])] = np.nan
    return out


def summarize(
    run: str, scalars: Mapping[str, Series], loss_tag: str | None = None, smoothing: float = DEFAULT_SMOOTHING
) -> RunSummary:
    """Start, middle, end and run-averaged ``B_simple`` of one run (see :class:`RunSummary`).

    Raises:
        ReportError: the run never logged a finite ``gns/b_simple``.
    """
    b_simple = scalars[B_SIMPLE]
    finite = np.isfinite(b_simple.values)
    if not finite.any():
        raise ReportError(
            f"Run {run!r} logged {B_SIMPLE!r} {len(b_simple)} time(s), never a finite value (NaN before the first"
            " measured step, inf while the |G|^2 average is not positive). Train for more steps."
        )
    steps, values = b_simple.steps[finite], b_simple.values[finite]
    losses = loss_at(steps, scalars.get(loss_tag) if loss_tag else None, smoothing)
    middle_step = (steps[0] + steps[-1]) / 2
    # argmin returns the first of two equally close points: the earlier one.
    middle = int(np.argmin(np.abs(steps - middle_step)))
    points = [Point(step=int(steps[i]), b_simple=float(values[i]), loss=float(losses[i])) for i in (0, middle, -1)]
    skipped = scalars.get(SKIPPED_STEPS)
    return RunSummary(
        run=run,
        start=points[0],
        middle=points[1],
        end=points[2],
        mean_b_simple=float(values.mean()),
        finite_points=int(finite.sum()),
        infinite_points=int(np.isinf(b_simple.values).sum()),
        skipped_steps=int(skipped.last) if skipped is not None and len(skipped) else None,
        loss_tag=loss_tag,
    )


def _number(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def _point(point: Point) -> str:
    loss = "" if math.isnan(point.loss) else f" (loss {point.loss:.4g})"
    return f"{point.b_simple:.4g} @{point.step}{loss}"


def format_table(summaries: Sequence[RunSummary]) -> str:
    """A plain-text table, one row per run: B_simple at start / middle / end (with step and loss)."""
    header = ("run", "B_simple start", "middle", "end", "run avg", "inf", "skipped")
    rows = [
        (
            s.run,
            _point(s.start),
            _point(s.middle),
            _point(s.end),
            _number(s.mean_b_simple),
            str(s.infinite_points),
            "-" if s.skipped_steps is None else str(s.skipped_steps),
        )
        for s in summaries
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    rule = "  ".join("-" * width for width in widths)
    head = "  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True)).rstrip()
    notes = [
        "B_simple is in the units GradientNoiseScale's batch_size_fn counts (examples by default, tokens if it"
        " counts tokens); '@N' is the optimizer step.",
        "run avg: mean of the finite logged values; inf: logged values with a non-positive |G|^2 average;"
        " skipped: steps the callback could not measure.",
    ]
    loss_tags = sorted({s.loss_tag for s in summaries if s.loss_tag})
    if loss_tags:
        notes.append(f"loss: {', '.join(loss_tags)}, EMA-smoothed with --smoothing (TensorBoard's default 0.6).")
    return "\n".join([head, rule, *lines, "", *notes])


# ---------------------------------------------------------------------------------------------- picture
def plot_report(
    runs: Mapping[str, Scalars],
    loss_tags: Mapping[str, str | None],
    output: str | os.PathLike[str],
    smoothing: float = DEFAULT_SMOOTHING,
    dpi: int = 120,
) -> Path:
    """Draw the report picture and save it to ``output`` (any format matplotlib knows from the suffix).

    Panels: B_simple and the batch per optimizer step against step; B_simple against the smoothed
    training loss (axis reversed, so training runs left to right); the ``|G|^2`` and ``tr(Sigma)``
    averages; and, when logged, the effective batch and the accumulation. Log-scale axes leave out
    non-positive and infinite values.

    Raises:
        ReportError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ReportError(
            "The report picture needs matplotlib: pip install 'lightning-gns[report]' (or pip install matplotlib)."
        ) from error

    adaptive = any(EFFECTIVE_BATCH in s or ACCUMULATION in s for s in runs.values())
    # Figure + FigureCanvasAgg instead of pyplot: draws with Agg without changing the process's backend.
    figure = Figure(figsize=(12, 8.5 if adaptive else 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, 2, squeeze=False)
    axes = list(grid.flat)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    # Accumulation is a count on another scale than the batch: a second y axis on the last panel.
    twin = axes[3].twinx() if any(ACCUMULATION in s for s in runs.values()) else None
    for (name, scalars), color in zip(runs.items(), colors, strict=True):
        _plot_b_simple_vs_step(axes[0], name, scalars, color)
        _plot_b_simple_vs_loss(axes[1], name, scalars, loss_tags.get(name), smoothing, color)
        _plot_estimates(axes[2], name, scalars, color)
        if adaptive:
            _plot_adaptive(axes[3], twin, name, scalars, color)
        else:
            _plot_batch_sizes(axes[3], name, scalars, color)
    _finish_axes(axes, adaptive, any(loss_tags.get(name) for name in runs))
    if twin is not None:
        twin.set_ylabel("accumulation (micro-batches per step)")
        twin.legend(loc="lower right", fontsize="small")
    figure.suptitle("Gradient noise scale (McCandlish et al. 2018)")
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def _positive(series: Series) -> tuple[IntArray, FloatArray]:
    keep = np.isfinite(series.values) & (series.values > 0)
    return series.steps[keep], series.values[keep]


def _plot_b_simple_vs_step(ax: Axes, name: str, scalars: Mapping[str, Series], color: str) -> None:
    ax.plot(*_positive(scalars[B_SIMPLE]), color=color, label=f"{name}: B_simple")
    # The batch actually used per optimizer step, to compare with the noise scale it should track.
    batch_tag = EFFECTIVE_BATCH if EFFECTIVE_BATCH in scalars else B_BIG
    if batch_tag in scalars:
        label = "effective batch" if batch_tag == EFFECTIVE_BATCH else "batch per step"
        ax.plot(*_positive(scalars[batch_tag]), color=color, linestyle="--", linewidth=1, label=f"{name}: {label}")


def _plot_b_simple_vs_loss(
    ax: Axes, name: str, scalars: Mapping[str, Series], loss_tag: str | None, smoothing: float, color: str
) -> None:
    if not loss_tag:
        return
    steps, values = _positive(scalars[B_SIMPLE])
    losses = loss_at(steps, scalars[loss_tag], smoothing)
    keep = np.isfinite(losses)
    ax.plot(losses[keep], values[keep], color=color, marker=".", markersize=3, label=name)


def _plot_estimates(ax: Axes, name: str, scalars: Mapping[str, Series], color: str) -> None:
    if TRACE_COV in scalars:
        ax.plot(*_positive(scalars[TRACE_COV]), color=color, label=f"{name}: tr(Sigma)")
    if GRAD_SQ_NORM in scalars:
        ax.plot(*_positive(scalars[GRAD_SQ_NORM]), color=color, linestyle=":", label=f"{name}: |G|^2")


def _plot_batch_sizes(ax: Axes, name: str, scalars: Mapping[str, Series], color: str) -> None:
    if B_BIG in scalars:
        ax.plot(*_positive(scalars[B_BIG]), color=color, label=f"{name}: big batch")
    if "gns/b_small" in scalars:
        ax.plot(*_positive(scalars["gns/b_small"]), color=color, linestyle=":", label=f"{name}: small batch")


def _plot_adaptive(ax: Axes, twin: Axes | None, name: str, scalars: Mapping[str, Series], color: str) -> None:
    if EFFECTIVE_BATCH in scalars:
        ax.plot(*_positive(scalars[EFFECTIVE_BATCH]), color=color, label=f"{name}: effective batch")
    if twin is not None and ACCUMULATION in scalars:
        series = scalars[ACCUMULATION]
        # Drawn as steps: accumulation changes in jumps.
        twin.step(series.steps, series.values, where="post", color=color, linestyle=":", label=f"{name}: accumulation")


def _finish_axes(axes: list[Axes], adaptive: bool, has_loss: bool) -> None:
    titles = [
        ("B_simple and the batch per optimizer step", "optimizer step", "batch size units"),
        ("B_simple against training loss", "training loss (smoothed; training runs left to right)", "B_simple"),
        ("|G|^2 (dotted) and tr(Sigma) (solid) averages", "optimizer step", "estimate"),
        (
            ("Effective batch and accumulation", "optimizer step", "effective batch")
            if adaptive
            else ("Batch sizes per optimizer step", "optimizer step", "batch size units")
        ),
    ]
    for ax, (title, xlabel, ylabel) in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        if ax.has_data():
            ax.set_yscale("log")
            ax.legend(fontsize="small")
    if has_loss:
        axes[1].invert_xaxis()
    else:
        axes[1].text(0.5, 0.5, "no training-loss scalar found:\npass --loss-tag", ha="center", va="center")


# ---------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-gns`` argument parser (subcommand ``report``)."""
    parser = argparse.ArgumentParser(
        prog="lightning-gns", description="Tools for the gradient noise scale logged by lightning_gns."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="summarize and plot the gns/ scalars of TensorBoard runs",
        description="Read the TensorBoard event files of every run under LOGDIR, print B_simple at the start,"
        " middle and end of each run, and draw B_simple against step and training loss, the |G|^2 and"
        " tr(Sigma) averages, and the effective batch and accumulation when logged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    report.add_argument("logdir", metavar="LOGDIR", help="TensorBoard log directory (searched recursively)")
    report.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help="picture to write (.png, .pdf, .svg)")
    report.add_argument(
        "--loss-tag",
        default=None,
        help=f"training-loss scalar (default: the first of {', '.join(LOSS_TAGS[:4])}, ..."
        " or else a tag containing 'loss')",
    )
    report.add_argument(
        "--smoothing", type=float, default=DEFAULT_SMOOTHING, help="EMA weight for the loss, in [0, 1), as TensorBoard"
    )
    report.add_argument("--dpi", type=int, default=120, help="picture resolution")
    return parser


def run_report(
    logdir: str | os.PathLike[str],
    output: str | os.PathLike[str] = DEFAULT_OUTPUT,
    loss_tag: str | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
    dpi: int = 120,
) -> tuple[list[RunSummary], Path]:
    """Load, summarize (printed to stdout) and plot; returns the summaries and the picture's path."""
    if not 0.0 <= smoothing < 1.0:
        raise ReportError(f"--smoothing must be in [0, 1), got {smoothing}.")
    all_runs = load_runs(logdir)
    runs = gns_runs(all_runs)
    loss_tags = {name: find_loss_tag(scalars, loss_tag) for name, scalars in runs.items()}
    if loss_tag is not None and not any(loss_tags.values()):
        found = sorted({tag for s in runs.values() for tag in s if "loss" in tag.lower()})
        raise ReportError(f"No run logged --loss-tag {loss_tag!r}. Loss-like scalars found: {found or 'none'}.")
    summaries = [summarize(name, scalars, loss_tags[name], smoothing) for name, scalars in runs.items()]
    print(format_table(summaries))
    without = sorted(set(all_runs) - set(runs))
    if without:
        print(f"Runs without {B_SIMPLE} (left out): {', '.join(without)}")
    path = plot_report(runs, loss_tags, output, smoothing=smoothing, dpi=dpi)
    print(f"Wrote {path}")
    return summaries, path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-gns`` console script; returns the exit status (2 for a usage error)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] != ["report"]:
        # sweep, branch and the top-level help live in lightning_gns.cli, which sends "report" back here.
        from lightning_gns.cli import main as cli_main

        return cli_main(arguments)
    args = build_parser().parse_args(arguments)
    try:
        run_report(args.logdir, args.output, args.loss_tag, args.smoothing, args.dpi)
    except ReportError as error:
        print(f"lightning-gns {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
