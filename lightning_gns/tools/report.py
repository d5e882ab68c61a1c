"""``lightning-gns report LOGDIR``: summarize and plot the ``gns/`` scalars of TensorBoard runs.

The event files are read with TensorBoard's own reader (``EventMultiplexer``), so every run that
TensorBoard would show (each directory under LOGDIR holding event files) is a run here too.

TensorBoard's reader stops at a damaged record without a word; ``read_logdir`` checks every event file's
record checksums, so the report leaves a damaged run out with a note naming the file, as it does a run
that never logged a finite ``B_simple``, and reports the others.

The pieces are small functions that work without the command line::

    logs = read_logdir("lightning_logs")                # .runs {run: {tag: Series}}, .unreadable {run: why}
    runs = logs.runs                                    # or load_runs("lightning_logs")
    loss_tag = find_loss_tag(runs["digits/version_0"])  # "train/loss_step"
    summary = summarize("digits/version_0", runs["digits/version_0"], loss_tag)
    print(format_table([summary]))
    figure = report_figure(runs, {"digits/version_0": loss_tag})  # a matplotlib Figure
    plot_report(runs, {"digits/version_0": loss_tag}, "gns.png")  # the same, saved

Only ``report_figure`` and ``plot_report`` need matplotlib (the ``report`` extra:
``pip install 'lightning-gns[report]'``).
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from tensorboard.backend.event_processing import event_accumulator, event_multiplexer, io_wrapper

from lightning_gns import scalars as names

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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
# What GradientNoiseScale's default batch_size_fn counts; B_simple and the batch sizes are in these units.
DEFAULT_UNITS = "examples"

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

    ``start`` and ``end`` are the first and the last finite ``B_simple``, ``middle`` the finite one whose step
    is closest to halfway between theirs. ``mean_b_simple`` averages the
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
@dataclass(frozen=True)
class LogDir:
    """What :func:`read_logdir` found: every run's scalars, and what kept some runs from being read.

    ``unreadable`` maps a run to why one of its event files cannot be trusted (it cannot be opened, or a
    record fails its checksum: TensorBoard's reader stops there without a word, so the scalars read
    are only part of the run). ``notes`` maps a run to a harmless oddity: an event file ending in an
    incomplete record, as one being written does.
    """

    runs: dict[str, Scalars]
    unreadable: dict[str, str]
    notes: dict[str, str]


def load_runs(logdir: str | os.PathLike[str]) -> dict[str, Scalars]:
    """Every run under ``logdir`` (a directory holding event files, at any depth) with all its scalars.

    Run names are paths relative to ``logdir`` (``"."`` becomes the directory's own name), as TensorBoard
    shows them. A tag logged several times at one step (a resumed run) keeps its last value. Runs with an
    unreadable event file are included with what TensorBoard could read; :func:`read_logdir` says which.

    Raises:
        ReportError: ``logdir`` is not a directory or holds no event files.
    """
    return read_logdir(logdir).runs


def read_logdir(logdir: str | os.PathLike[str]) -> LogDir:
    """:func:`load_runs`, plus a check of every event file (see :class:`LogDir`).

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
        csv_logs = next(root.rglob("metrics.csv"), None)
        raise ReportError(
            f"No TensorBoard event files (events.out.tfevents.*) under {str(root)!r}. Pass the directory a"
            " TensorBoardLogger wrote to (Trainer(logger=TensorBoardLogger('lightning_logs')) writes"
            " lightning_logs/<name>/version_N/events.out.tfevents.*)."
            + (f" CSV logs ({csv_logs}) are not read: log with a TensorBoardLogger too." if csv_logs else "")
        )
    run_paths: dict[str, str] = multiplexer.RunPaths()
    runs: dict[str, Scalars] = {}
    unreadable: dict[str, str] = {}
    notes: dict[str, str] = {}
    for run in sorted(run_tags):
        name = root.resolve().name if run == "." else run
        tags = run_tags[run].get(event_accumulator.SCALARS, [])
        runs[name] = {tag: _series(multiplexer.Scalars(run, tag)) for tag in sorted(tags)}
        fatal: list[str] = []
        harmless: list[str] = []
        for path in _event_files(Path(run_paths[run])):
            problem = check_event_file(path)
            if problem is not None:
                (fatal if problem.fatal else harmless).append(f"event file {str(path)!r} {problem.reason}")
        if fatal:
            unreadable[name] = "; ".join(fatal)
        if harmless:
            notes[name] = "; ".join(harmless)
    return LogDir(runs=runs, unreadable=unreadable, notes=notes)


def _event_files(run_dir: Path) -> list[Path]:
    # The files TensorBoard's DirectoryWatcher reads for a run: the directory's own event files, not its
    # subdirectories' (those are runs of their own).
    try:
        entries = sorted(run_dir.iterdir())
    except OSError:
        return []
    return [path for path in entries if io_wrapper.IsSummaryEventsFile(str(path)) and not path.is_dir()]


@dataclass(frozen=True)
class EventFileProblem:
    """Why an event file cannot be read to its end; ``fatal`` unless it only ends in an incomplete record."""

    reason: str
    fatal: bool


def check_event_file(path: str | os.PathLike[str]) -> EventFileProblem | None:
    """Walk the TFRecord framing of an event file and verify every checksum; None when the file is sound.

    Each record is an 8-byte little-endian length, the masked CRC-32C of those 8 bytes, the payload and
    the masked CRC-32C of the payload. TensorBoard's reader stops at the first bad record and reads on
    as if the file ended there, which is right for a file still being written (an incomplete last
    record) and wrong for a damaged one: this check tells the two apart.
    """
    offset = 0
    try:
        with open(path, "rb") as handle:
            while True:
                header = handle.read(12)
                if not header:
                    return None
                if len(header) < 12:
                    return _incomplete(offset)
                (length,) = struct.unpack("<Q", header[:8])
                (header_crc,) = struct.unpack("<I", header[8:])
                if _masked_crc32c(header[:8]) != header_crc:
                    return _corrupt(offset)
                payload = handle.read(length + 4)
                if len(payload) < length + 4:
                    return _incomplete(offset)
                (payload_crc,) = struct.unpack("<I", payload[length:])
                if _masked_crc32c(payload[:length]) != payload_crc:
                    return _corrupt(offset)
                offset += 12 + length + 4
    except OSError as error:
        return EventFileProblem(f"cannot be read: {error.strerror or error}", fatal=True)


def _corrupt(offset: int) -> EventFileProblem:
    return EventFileProblem(
        f"is unreadable: its record at byte {offset} fails its checksum (the file is damaged, or is not an event file),"
        " and TensorBoard reads nothing after it",
        fatal=True,
    )


def _incomplete(offset: int) -> EventFileProblem:
    return EventFileProblem(
        f"ends in an incomplete record at byte {offset} (still being written, or its writer was stopped);"
        " the records before it are reported",
        fatal=False,
    )


def _crc32c_table() -> list[int]:
    # CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of the TFRecord format.
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    # TFRecord stores the CRC rotated right by 15 bits plus a constant, so that a CRC of data holding CRCs
    # does not degenerate.
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


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
    selected = {name: scalars for name, scalars in runs.items() if names.B_SIMPLE in scalars}
    if not selected:
        other = sorted({tag for scalars in runs.values() for tag in scalars})
        shown = ", ".join(other[:12]) + (", ..." if len(other) > 12 else "") if other else "none"
        raise ReportError(
            f"Found {len(runs)} run(s) with event files but no {names.B_SIMPLE!r} scalar (scalars found: {shown})."
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
        and not tag.startswith(names.PREFIX)
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
    b_simple = scalars[names.B_SIMPLE]
    finite = np.isfinite(b_simple.values)
    if not finite.any():
        raise ReportError(
            f"Run {run!r} logged {names.B_SIMPLE!r} {len(b_simple)} time(s), never a finite value (NaN before the first"
            " measured step, inf while the |G|^2 average is not positive). Train for more steps."
        )
    steps, values = b_simple.steps[finite], b_simple.values[finite]
    losses = loss_at(steps, scalars.get(loss_tag) if loss_tag else None, smoothing)
    middle_step = (steps[0] + steps[-1]) / 2
    # argmin returns the first of two equally close points: the earlier one.
    middle = int(np.argmin(np.abs(steps - middle_step)))
    points = [Point(step=int(steps[i]), b_simple=float(values[i]), loss=float(losses[i])) for i in (0, middle, -1)]
    skipped = scalars.get(names.SKIPPED_STEPS)
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
MATPLOTLIB_MISSING = (
    "the report picture needs matplotlib: pip install 'lightning-gns[report]' (or pip install matplotlib)"
)


def output_problem(output: str | os.PathLike[str]) -> str | None:
    """Why the report picture cannot be written to ``output``, or None when it can (nothing is written).

    The folder must exist and be writable, and the suffix must be a format matplotlib's ``savefig`` writes.
    """
    path = Path(output)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return MATPLOTLIB_MISSING
    formats = FigureCanvasBase.get_supported_filetypes()
    known = ", ".join(f".{name}" for name in sorted(formats))
    if path.is_dir():
        return f"{str(path)!r} is a folder; name a picture inside it, e.g. {str(path / DEFAULT_OUTPUT)!r}"
    suffix = path.suffix.lower().lstrip(".")
    if not suffix:
        return f"{str(path)!r} has no file extension, so the picture format is unknown; end it in one of {known}"
    if suffix not in formats:
        return f"matplotlib cannot write {path.suffix!r} pictures; end {str(path)!r} in one of {known}"
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        return f"the folder {str(folder)!r} {what}; create it (mkdir -p {folder}) or write the picture elsewhere"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {str(folder)!r} is not writable; write the picture elsewhere"
    return None


def report_figure(
    runs: Mapping[str, Scalars],
    loss_tags: Mapping[str, str | None],
    smoothing: float = DEFAULT_SMOOTHING,
    units: str = DEFAULT_UNITS,
) -> Figure:
    """The report picture as a matplotlib ``Figure`` (drawn with Agg, without pyplot).

    Panels, in ``figure.axes`` order: B_simple and the batch per optimizer step against step; B_simple
    against the smoothed training loss (log loss axis when every loss is positive, reversed so that
    training runs left to right); the ``|G|^2`` and ``tr(Sigma)`` averages; and the batch sizes, or, when
    logged, the effective batch with the accumulation on a second y axis (the last axes). Batch sizes
    are drawn as steps, since they change in jumps. Series with few points get markers, so that a
    short run still shows. Log-scale axes leave out non-positive and infinite values. ``units`` is what
    GradientNoiseScale's ``batch_size_fn`` counts, for the axis labels.

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

    adaptive = any(names.EFFECTIVE_BATCH_SIZE in s or names.ACCUMULATION in s for s in runs.values())
    # Figure + FigureCanvasAgg instead of pyplot: draws with Agg without changing the process's backend.
    figure = Figure(figsize=(12, 8.5 if adaptive else 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, 2, squeeze=False)
    axes = list(grid.flat)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    # Accumulation is a count on another scale than the batch: a second y axis on the last panel.
    twin = axes[3].twinx() if any(names.ACCUMULATION in s for s in runs.values()) else None
    losses: list[FloatArray] = []
    for (name, scalars), color in zip(runs.items(), colors, strict=True):
        _plot_b_simple_vs_step(axes[0], name, scalars, color)
        losses.append(_plot_b_simple_vs_loss(axes[1], name, scalars, loss_tags.get(name), smoothing, color))
        _plot_estimates(axes[2], name, scalars, color)
        if adaptive:
            _plot_adaptive(axes[3], twin, name, scalars, color)
        else:
            _plot_batch_sizes(axes[3], name, scalars, color)
    plotted_losses = np.concatenate(losses) if losses else np.empty(0)
    _finish_axes(axes, adaptive, plotted_losses, units)
    if twin is not None:
        from matplotlib.ticker import MaxNLocator

        twin.set_ylabel("accumulation [micro-batches per step]")
        twin.yaxis.set_major_locator(MaxNLocator(integer=True))
        twin.legend(loc="lower right", fontsize="small")
    figure.suptitle("Gradient noise scale (McCandlish et al. 2018)")
    return figure


def plot_report(
    runs: Mapping[str, Scalars],
    loss_tags: Mapping[str, str | None],
    output: str | os.PathLike[str],
    smoothing: float = DEFAULT_SMOOTHING,
    dpi: int = 120,
    units: str = DEFAULT_UNITS,
) -> Path:
    """Draw :func:`report_figure` and save it to ``output`` (any format matplotlib knows from the suffix).

    Raises:
        ReportError: matplotlib is not installed, or ``output`` cannot be written (see :func:`output_problem`).
    """
    problem = output_problem(output)
    if problem is not None:
        raise ReportError(problem[0].upper() + problem[1:] + ".")
    figure = report_figure(runs, loss_tags, smoothing=smoothing, units=units)
    path = Path(output)
    figure.savefig(path, dpi=dpi)
    return path


# A series with at most this many points gets markers: a line through one or two points is invisible.
FEW_POINTS = 30


def _style(n: int) -> dict[str, Any]:
    return {"marker": "o", "markersize": 3} if n <= FEW_POINTS else {}


def _positive(series: Series) -> tuple[IntArray, FloatArray]:
    keep = np.isfinite(series.values) & (series.values > 0)
    return series.steps[keep], series.values[keep]


def _plot_steps(ax: Axes, series: Series, color: str, label: str, **kwargs: Any) -> None:
    """A batch size: constant until the next logged step, so drawn as steps."""
    steps, values = _positive(series)
    ax.plot(steps, values, color=color, label=label, drawstyle="steps-post", **_style(len(steps)), **kwargs)


def interval_band(scalars: Mapping[str, Series]) -> tuple[IntArray, FloatArray, FloatArray] | None:
    """Steps, low and high of ``B_simple``'s logged interval as drawn on a log axis, or None if not logged.

    A bound of 0 is drawn at a tenth of the smallest positive value, an infinite one (``|G|^2`` within its
    noise) at ten times the largest finite value: the band then reaches past everything else on the chart.
    """
    if names.B_SIMPLE_LOW not in scalars or names.B_SIMPLE_HIGH not in scalars:
        return None
    low, high = scalars[names.B_SIMPLE_LOW], scalars[names.B_SIMPLE_HIGH]
    steps, low_at, high_at = np.intersect1d(low.steps, high.steps, return_indices=True)
    lows, highs = low.values[low_at], high.values[high_at]
    keep = ~(np.isnan(lows) | np.isnan(highs))
    steps, lows, highs = steps[keep], lows[keep], highs[keep]
    finite = np.concatenate([v[np.isfinite(v) & (v > 0)] for v in (lows, highs, scalars[names.B_SIMPLE].values)])
    if not len(steps) or not len(finite):
        return None
    lows = np.where(lows > 0, lows, finite.min() / 10)
    highs = np.where(np.isfinite(highs), highs, finite.max() * 10)
    return steps, np.minimum(lows, highs), highs


def _plot_b_simple_vs_step(ax: Axes, name: str, scalars: Mapping[str, Series], color: str) -> None:
    steps, values = _positive(scalars[names.B_SIMPLE])
    ax.plot(steps, values, color=color, label=f"{name}: B_simple", **_style(len(steps)))
    band = interval_band(scalars)
    if band is not None:
        # Error bars on B_simple: one standard error either side (Fieller bounds, open above while |G|^2 is
        # within its noise).
        ax.fill_between(*band, color=color, alpha=0.2, linewidth=0, step="post", label=f"{name}: B_simple ± 1 se")
    # The batch actually used per optimizer step, to compare with the noise scale it should track.
    batch_tag = names.EFFECTIVE_BATCH_SIZE if names.EFFECTIVE_BATCH_SIZE in scalars else names.B_BIG
    if batch_tag in scalars:
        label = "effective batch" if batch_tag == names.EFFECTIVE_BATCH_SIZE else "batch per step"
        _plot_steps(ax, scalars[batch_tag], color, f"{name}: {label}", linestyle="--", linewidth=1)


def _plot_b_simple_vs_loss(
    ax: Axes, name: str, scalars: Mapping[str, Series], loss_tag: str | None, smoothing: float, color: str
) -> FloatArray:
    """Draws B_simple against the loss; returns the losses drawn."""
    if not loss_tag:
        return np.empty(0)
    steps, values = _positive(scalars[names.B_SIMPLE])
    losses = loss_at(steps, scalars[loss_tag], smoothing)
    keep = np.isfinite(losses)
    ax.plot(losses[keep], values[keep], color=color, label=name, **(_style(int(keep.sum())) or {"marker": "."}))
    return losses[keep]


def _plot_estimates(ax: Axes, name: str, scalars: Mapping[str, Series], color: str) -> None:
    for tag, label, linestyle in ((names.TRACE_COV, "tr(Sigma)", "-"), (names.GRAD_SQ_NORM, "|G|^2", ":")):
        if tag in scalars:
            steps, values = _positive(scalars[tag])
            ax.plot(steps, values, color=color, linestyle=linestyle, label=f"{name}: {label}", **_style(len(steps)))


def _plot_batch_sizes(ax: Axes, name: str, scalars: Mapping[str, Series], color: str) -> None:
    if names.B_BIG in scalars:
        _plot_steps(ax, scalars[names.B_BIG], color, f"{name}: big batch")
    if names.B_SMALL in scalars:
        _plot_steps(ax, scalars[names.B_SMALL], color, f"{name}: small batch", linestyle=":")


def _plot_adaptive(ax: Axes, twin: Axes | None, name: str, scalars: Mapping[str, Series], color: str) -> None:
    if names.EFFECTIVE_BATCH_SIZE in scalars:
        _plot_steps(ax, scalars[names.EFFECTIVE_BATCH_SIZE], color, f"{name}: effective batch")
    if twin is not None and names.ACCUMULATION in scalars:
        series = scalars[names.ACCUMULATION]
        twin.plot(
            series.steps,
            series.values,
            drawstyle="steps-post",
            color=color,
            linestyle=":",
            label=f"{name}: accumulation",
            **_style(len(series)),
        )


def _finish_axes(axes: list[Axes], adaptive: bool, losses: FloatArray, units: str) -> None:
    from matplotlib.ticker import MaxNLocator

    log_loss = bool(len(losses)) and bool((losses > 0).all())
    loss_label = "training loss [as logged; EMA-smoothed" + ("; log scale]" if log_loss else "]")
    titles = [
        ("B_simple and the batch per optimizer step", f"batch size [{units}]"),
        ("B_simple against training loss (training runs left to right)", f"B_simple [{units}]"),
        ("|G|^2 (dotted) and tr(Sigma) (solid) averages", f"|G|^2 [gradient^2]\ntr(Sigma) [gradient^2 x {units}]"),
        (
            ("Effective batch and accumulation", f"effective batch [{units}]")
            if adaptive
            else ("Batch sizes per optimizer step", f"batch size [{units}]")
        ),
    ]
    for index, (ax, (title, ylabel)) in enumerate(zip(axes, titles, strict=True)):
        ax.set_title(title)
        ax.set_xlabel(loss_label if index == 1 else "optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        if index != 1:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            _widen_step_axis(ax)
        if ax.has_data():
            ax.set_yscale("log")
            _plain_log_labels(ax.yaxis)
            ax.legend(fontsize="small")
    if len(losses):
        if log_loss:
            axes[1].set_xscale("log")
            _plain_log_labels(axes[1].xaxis)
        axes[1].invert_xaxis()
    else:
        axes[1].text(0.5, 0.5, "no training loss at the logged steps:\npass --loss-tag", ha="center", va="center")


def _plain_log_labels(axis: Any) -> None:
    # "40" and "0.5" rather than 4x10^1 and 5x10^-1: a log axis here often spans less than a decade,
    # where matplotlib labels the minor ticks too.
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        # LogFormatter decides which ticks get a label (all minor ones only on a short axis); %g writes it.
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def _widen_step_axis(ax: Axes) -> None:
    # A run logged at one or two steps would otherwise get an x axis a fraction of a step wide.
    low, high = ax.get_xlim()
    if ax.has_data() and high - low < 4:
        middle = (low + high) / 2
        ax.set_xlim(middle - 2, middle + 2)


# ---------------------------------------------------------------------------------------------- command
def _output_argument(value: str) -> str:
    """argparse ``type`` of ``-o``: a bad picture path is a usage error before any event file is read."""
    problem = output_problem(value)
    if problem is not None and problem != MATPLOTLIB_MISSING:  # without matplotlib the table is still printed
        raise argparse.ArgumentTypeError(problem)
    return value


REPORT_DESCRIPTION = (
    "Read the TensorBoard event files of every run under LOGDIR, print B_simple at the start, middle and end of"
    " each run, and draw B_simple against step and training loss, the |G|^2 and tr(Sigma) averages, and the"
    " effective batch and accumulation when logged. A run whose event file is damaged, or that never logged a"
    " finite B_simple, is left out with a note."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``lightning-gns report`` arguments (the console script's parser lives in :mod:`lightning_gns.tools.cli`)."""
    parser.add_argument("logdir", metavar="LOGDIR", help="TensorBoard log directory (searched recursively)")
    parser.add_argument(
        "-o",
        "--output",
        default=DEFAULT_OUTPUT,
        type=_output_argument,
        help="picture to write, in an existing folder (.png, .pdf, .svg, ...: what matplotlib's savefig writes)",
    )
    parser.add_argument(
        "--loss-tag",
        default=None,
        help=f"training-loss scalar (default: the first of {', '.join(LOSS_TAGS[:4])}, ..."
        " or else a tag containing 'loss')",
    )
    parser.add_argument(
        "--smoothing", type=float, default=DEFAULT_SMOOTHING, help="EMA weight for the loss, in [0, 1), as TensorBoard"
    )
    parser.add_argument(
        "--units",
        default=DEFAULT_UNITS,
        help="what GradientNoiseScale's batch_size_fn counted (e.g. tokens), for the axis labels",
    )
    parser.add_argument("--dpi", type=int, default=120, help="picture resolution")


def run_report(
    logdir: str | os.PathLike[str],
    output: str | os.PathLike[str] = DEFAULT_OUTPUT,
    loss_tag: str | None = None,
    smoothing: float = DEFAULT_SMOOTHING,
    dpi: int = 120,
    units: str = DEFAULT_UNITS,
) -> tuple[list[RunSummary], Path]:
    """Load, summarize (printed to stdout) and plot; returns the summaries and the picture's path.

    A run that cannot be reported (a damaged event file, no finite ``B_simple``) is left out with a note
    on stderr naming it and why; the others are reported.

    Raises:
        ReportError: ``output`` cannot be written (checked first), or no run is left to report; without
            matplotlib, after the table is printed.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ReportError(f"--smoothing must be in [0, 1), got {smoothing}.")
    problem = output_problem(output)
    if problem is not None and problem != MATPLOTLIB_MISSING:
        raise ReportError(problem[0].upper() + problem[1:] + ".")
    logs = read_logdir(logdir)
    skipped = {run: f"run {run!r}: {why}." for run, why in logs.unreadable.items()}
    readable = {name: scalars for name, scalars in logs.runs.items() if name not in logs.unreadable}
    if not readable:
        raise ReportError(
            f"No readable run under {str(logdir)!r}:\n" + "\n".join(skipped[run] for run in sorted(skipped))
        )
    runs = gns_runs(readable)
    loss_tags = {name: find_loss_tag(scalars, loss_tag) for name, scalars in runs.items()}
    if loss_tag is not None and not any(loss_tags.values()):
        found = sorted({tag for s in runs.values() for tag in s if "loss" in tag.lower()})
        raise ReportError(f"No run logged --loss-tag {loss_tag!r}. Loss-like scalars found: {found or 'none'}.")
    summaries = []
    for name, scalars in runs.items():
        try:
            summaries.append(summarize(name, scalars, loss_tags[name], smoothing))
        except ReportError as error:
            skipped[name] = f"run {name!r}: {error}"
    if not summaries:
        raise ReportError(
            f"No run left to report under {str(logdir)!r}:\n" + "\n".join(skipped[name] for name in sorted(skipped))
        )
    for name in sorted(set(logs.notes) - set(skipped)):
        print(f"lightning-gns report: note: run {name!r}: {logs.notes[name]}.", file=sys.stderr)
    for name in sorted(skipped):
        print(f"lightning-gns report: note: skipped {skipped[name]}", file=sys.stderr)
    print(format_table(summaries))
    without = sorted(set(readable) - set(runs))
    if without:
        print(f"Runs without {names.B_SIMPLE} (left out): {', '.join(without)}")
    if problem == MATPLOTLIB_MISSING:
        raise ReportError(f"No picture: {problem} (the table above needs only tensorboard).")
    reported = {s.run: runs[s.run] for s in summaries}
    path = plot_report(reported, loss_tags, output, smoothing=smoothing, dpi=dpi, units=units)
    print(f"Wrote {path}")
    return summaries, path
