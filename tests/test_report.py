"""`lightning-gns report` on logs of a real short run, on bad directories; the TensorBoard layout."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from lightning_gns import AdaptiveBatchSize, GradientNoiseScale
from lightning_gns.scalars import B_SIMPLE
from lightning_gns.tensorboard_layout import gns_custom_scalars_layout, layout_as_dict, write_layout
from lightning_gns.tools.cli import main
from lightning_gns.tools.report import (
    ReportError,
    Series,
    find_loss_tag,
    gns_runs,
    interval_band,
    load_runs,
    smooth,
    summarize,
)
from support.models import LinearProblem, LinearRegression, loader
from support.trainers import make_trainer

RUN = "linear/version_0"


class LoggedLinearRegression(LinearRegression):
    """The test model, logging its training loss under the name most scripts use."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """One real fit (SGD, accumulation 2) logged to TensorBoard and, independently, to CSV."""
    root = tmp_path_factory.mktemp("run")
    problem = LinearProblem(dim=6, noise_std=0.5, seed=4)
    x, y = problem.sample(8 * 2 * 10, seed=5)
    csv_logger = CSVLogger(root / "csv", name="linear")
    trainer = make_trainer(
        [GradientNoiseScale(beta=0.8)],
        max_epochs=2,
        accumulate_grad_batches=2,
        log_every_n_steps=1,
        logger=[TensorBoardLogger(root / "tb", name="linear"), csv_logger],
    )
    trainer.fit(LoggedLinearRegression(problem, lr=0.1), loader(x, y, 8))
    yield root / "tb", Path(csv_logger.log_dir) / "metrics.csv"


def csv_series(path: Path, column: str) -> tuple[list[int], list[float]]:
    """A column of Lightning's metrics.csv, the last value per step (as the report keeps)."""
    by_step: dict[int, float] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            if row.get(column):
                by_step[int(row["step"])] = float(row[column])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def test_loaded_scalars_equal_the_logged_values(logged_run: tuple[Path, Path]) -> None:
    tb_dir, csv_path = logged_run
    runs = load_runs(tb_dir)
    assert list(runs) == [RUN]
    for tag in (B_SIMPLE, "gns/grad_sq_norm", "gns/trace_cov", "gns/skipped_steps", "train_loss"):
        steps, values = csv_series(csv_path, tag)
        assert runs[RUN][tag].steps.tolist() == steps
        # TensorBoard stores float32; the CSV writer prints the same float32 in decimal.
        np.testing.assert_allclose(runs[RUN][tag].values, values, rtol=1e-6)
    assert len(runs[RUN][B_SIMPLE]) >= 15


def test_report_main_writes_png_and_prints_the_logged_numbers(
    logged_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tb_dir, csv_path = logged_run
    out = tmp_path / "gns.png"
    assert main(["report", str(tb_dir), "-o", str(out), "--smoothing", "0"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000  # four panels with curves, not an empty canvas

    steps, values = csv_series(csv_path, B_SIMPLE)
    finite = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    middle_target = (finite[0][0] + finite[-1][0]) / 2
    middle = min(finite, key=lambda sv: abs(sv[0] - middle_target))
    loss_steps, losses = csv_series(csv_path, "train_loss")
    loss_by_step = dict(zip(loss_steps, losses, strict=True))
    _, skipped = csv_series(csv_path, "gns/skipped_steps")

    summary = summarize(RUN, load_runs(tb_dir)[RUN], "train_loss", smoothing=0.0)
    expected = (finite[0], middle, finite[-1])
    for point, (step, value) in zip((summary.start, summary.middle, summary.end), expected, strict=True):
        assert point.step == step
        assert point.b_simple == pytest.approx(value, rel=1e-6)
        assert point.loss == pytest.approx(loss_by_step[step], rel=1e-6)
    assert summary.mean_b_simple == pytest.approx(np.mean([v for _, v in finite]), rel=1e-6)
    assert summary.skipped_steps == int(skipped[-1]) == 0

    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith(RUN))
    for point in (summary.start, summary.middle, summary.end):
        assert f"{point.b_simple:.4g} @{point.step} (loss {point.loss:.4g})" in row
    assert f"{summary.mean_b_simple:.4g}" in row
    assert row.split()[-1] == "0"  # skipped steps
    assert f"Wrote {out}" in printed


def test_adaptive_runs_get_the_effective_batch_panel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs, one with the adaptive batch's scalars (a second y axis for the accumulation)."""
    for run, adaptive in (("fixed", False), ("adaptive", True)):
        writer = SummaryWriter(str(tmp_path / "logs" / run))
        for step in range(0, 40, 2):
            writer.add_scalar(B_SIMPLE, 50.0 + 5 * step, step)
            writer.add_scalar("gns/grad_sq_norm", 1.0 / (step + 1), step)
            writer.add_scalar("gns/trace_cov", 50.0, step)
            writer.add_scalar("loss", 3.0 - step / 20, step)
            if adaptive:
                writer.add_scalar("gns/accumulation", 1 + step // 10, step)
                writer.add_scalar("gns/effective_batch_size", 32.0 * (1 + step // 10), step)
        writer.close()
    out = tmp_path / "adaptive.svg"
    assert main(["report", str(tmp_path / "logs"), "-o", str(out)]) == 0
    picture = out.read_text()
    assert "accumulation [micro-batches per step]" in picture and "adaptive: effective batch" in picture
    printed = capsys.readouterr().out
    assert "adaptive  " in printed and "fixed  " in printed and "50 @0 (loss 3)" in printed


def test_logged_interval_reaches_the_report_band(logged_run: tuple[Path, Path]) -> None:
    """gns/b_simple_low <= gns/b_simple <= gns/b_simple_high on every logged step (inf high included), and the
    band drawn is those values, with 0 and inf bounds moved just past the chart's finite range."""
    tb_dir, _ = logged_run
    scalars = load_runs(tb_dir)[RUN]
    low, high, b = scalars["gns/b_simple_low"], scalars["gns/b_simple_high"], scalars[B_SIMPLE]
    assert low.steps.tolist() == high.steps.tolist() == b.steps.tolist()
    known = ~np.isnan(low.values)
    assert known.sum() >= 10
    assert np.all(low.values[known] <= b.values[known] * (1 + 1e-6))
    assert np.all(b.values[known] <= high.values[known] * (1 + 1e-6))
    steps, band_low, band_high = interval_band(scalars)  # type: ignore[misc]
    assert steps.tolist() == low.steps[known].tolist()
    finite = np.isfinite(high.values[known])
    np.testing.assert_array_equal(band_high[finite], high.values[known][finite])
    assert np.all(band_high[~finite] > np.nanmax(np.where(np.isfinite(b.values), b.values, np.nan)))
    positive = low.values[known] > 0
    np.testing.assert_array_equal(band_low[positive], low.values[known][positive])


def test_summarize_picks_finite_points_and_counts_infinite_ones() -> None:
    scalars = {
        B_SIMPLE: Series(np.array([0, 10, 20, 30, 40, 50]), np.array([np.nan, 4.0, np.inf, 8.0, 10.0, 12.0])),
        "gns/skipped_steps": Series(np.array([0, 50]), np.array([0.0, 3.0])),
        "loss": Series(np.array([0, 20, 50]), np.array([3.0, 2.0, 1.0])),
    }
    summary = summarize("run", scalars, "loss", smoothing=0.0)
    assert (summary.start.step, summary.start.b_simple) == (10, 4.0)
    # Finite steps 10, 30, 40, 50: the middle of 10..50 is 30.
    assert (summary.middle.step, summary.middle.b_simple) == (30, 8.0)
    assert (summary.end.step, summary.end.b_simple) == (50, 12.0)
    assert summary.mean_b_simple == pytest.approx(8.5)
    assert (summary.finite_points, summary.infinite_points, summary.skipped_steps) == (4, 1, 3)
    # Loss interpolated between logged steps 20 and 50.
    assert summary.middle.loss == pytest.approx(2.0 - 10 / 30)
    assert summary.end.loss == 1.0

    with pytest.raises(ReportError, match="never a finite value"):
        summarize("run", {B_SIMPLE: Series(np.array([0]), np.array([np.nan]))})


def test_duplicate_steps_keep_the_last_value(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "run"))
    for step, value in [(0, 1.0), (1, 2.0), (1, 3.0), (2, 4.0)]:
        writer.add_scalar(B_SIMPLE, value, step)
    writer.close()
    series = load_runs(tmp_path)["run"][B_SIMPLE]
    assert series.steps.tolist() == [0, 1, 2]
    assert series.values.tolist() == [1.0, 3.0, 4.0]


def test_find_loss_tag_and_smoothing() -> None:
    def tags(*names: str) -> dict[str, Series]:
        return {name: Series(np.array([0]), np.array([1.0])) for name in names}

    assert find_loss_tag(tags("val_loss", "train/loss_epoch", "train/loss_step")) == "train/loss_step"
    assert find_loss_tag(tags("val_loss", "my_loss_epoch", "gns/b_simple", "my_loss")) == "my_loss"
    assert find_loss_tag(tags("val_loss", "acc")) is None
    assert find_loss_tag(tags("train_loss", "nll"), requested="nll") == "nll"
    assert find_loss_tag(tags("train_loss"), requested="nll") is None
    # Bias-corrected: a constant stays constant; NaN is passed over.
    np.testing.assert_allclose(smooth(np.array([2.0, 2.0, np.nan, 2.0]), 0.6), [2.0, 2.0, 2.0, 2.0])
    np.testing.assert_array_equal(smooth(np.array([1.0, 5.0]), 0.0), [1.0, 5.0])


# ------------------------------------------------------------------------------------------ bad directories
def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["report", *args])
    return code, capsys.readouterr().err


def test_empty_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(capsys, str(tmp_path), "-o", str(tmp_path / "x.png"))
    assert code == 2
    assert "No TensorBoard event files" in err and "TensorBoardLogger" in err
    assert not (tmp_path / "x.png").exists()


def test_missing_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(capsys, str(tmp_path / "nope"))
    assert code == 2
    assert "is not a directory" in err


def test_event_files_without_gns_scalars_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writer = SummaryWriter(str(tmp_path / "plain"))
    for step in range(3):
        writer.add_scalar("train_loss", 1.0 / (step + 1), step)
    writer.close()
    code, err = run_main(capsys, str(tmp_path), "-o", str(tmp_path / "x.png"))
    assert code == 2
    assert "no 'gns/b_simple' scalar" in err and "train_loss" in err
    assert "GradientNoiseScale" in err and "log_every_n_steps" in err
    with pytest.raises(ReportError):
        gns_runs(load_runs(tmp_path))


def test_unknown_loss_tag_exits_2(
    logged_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_main(capsys, str(logged_run[0]), "-o", str(tmp_path / "x.png"), "--loss-tag", "nll")
    assert code == 2
    assert "--loss-tag 'nll'" in err and "train_loss" in err


def test_console_script_is_declared() -> None:
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("lightning-gns") == "lightning_gns.tools.cli:main"


# ------------------------------------------------------------------------------------------ layout
def chart_tags(layout: layout_pb2.Layout) -> dict[str, list[str]]:
    """Each chart's tags as regexes: a Multiline chart's are regexes, a Margin chart's are exact tag names."""
    charts: dict[str, list[str]] = {}
    for category in layout.category:
        for chart in category.chart:
            if chart.HasField("margin"):
                exact = [t for s in chart.margin.series for t in (s.value, s.lower, s.upper)]
                charts[chart.title] = [re.escape(tag) + "$" for tag in exact]
            else:
                charts[chart.title] = list(chart.multiline.tag)
    return charts


def fit_logged(root: Path, gns: GradientNoiseScale, *extra: Callback, accumulation: int = 1) -> set[str]:
    """The gns/ tags one short real fit writes to TensorBoard."""
    problem = LinearProblem(dim=6, noise_std=0.5, seed=4)
    x, y = problem.sample(8 * 2 * 6, seed=5)
    trainer = make_trainer(
        [gns, *extra],
        accumulate_grad_batches=accumulation,
        log_every_n_steps=1,
        logger=TensorBoardLogger(root, name="run"),
    )
    trainer.fit(LoggedLinearRegression(problem, lr=0.1), loader(x, y, 8))
    [scalars] = load_runs(root).values()
    return {tag for tag in scalars if tag.startswith("gns/")}


def assert_layout_fits(layout: layout_pb2.Layout, logged: set[str]) -> None:
    """Every chart tag draws something this run logged, and every logged gns/ tag is on some chart."""
    charts = chart_tags(layout)
    for title, regexes in charts.items():
        for regex in regexes:
            # TensorBoard's custom-scalars plugin selects tags with re.match.
            assert any(re.match(regex, tag) for tag in logged), f"{title!r}: {regex!r} draws nothing"
    regexes = [regex for tags in charts.values() for regex in tags]
    for tag in logged:
        assert any(re.match(regex, tag) for regex in regexes), f"{tag} is on no chart"


def test_layout_of_a_plain_run_has_only_charts_it_fills(logged_run: tuple[Path, Path]) -> None:
    """microbatch mode, no AdaptiveBatchSize, no per_layer, no kaplan_loss: the logged_run fixture."""
    layout = gns_custom_scalars_layout(adaptive=False, per_layer=False, per_example=False, kaplan=False)
    logged = {tag for tag in load_runs(logged_run[0])[RUN] if tag.startswith("gns/")}
    assert_layout_fits(layout, logged)
    assert [category.title for category in layout.category] == ["gradient noise scale"]
    titles = " ".join(chart_tags(layout))
    for word in ("accumulation", "coverage", "Kaplan", "effective"):
        assert word not in titles
    # The default lists every chart, as before the arguments existed: more than this run fills.
    with pytest.raises(AssertionError, match="draws nothing"):
        assert_layout_fits(gns_custom_scalars_layout(), logged)


def test_layout_of_a_run_with_every_option(tmp_path: Path) -> None:
    gns = GradientNoiseScale(beta=0.8, mode="per_example", per_layer=True, kaplan_loss="train_loss")
    adaptive = AdaptiveBatchSize(warmup_steps=1, check_every_n_steps=1, max_accumulation=4)
    logged = fit_logged(tmp_path, gns, adaptive)
    assert {"gns/accumulation", "gns/covered_fraction", "gns/kaplan_b_crit_tokens"} <= logged
    layout = gns_custom_scalars_layout(adaptive=True, per_layer=True, per_example=True, kaplan=True)
    assert_layout_fits(layout, logged)
    assert layout_as_dict(layout) == layout_as_dict(gns_custom_scalars_layout())
    assert layout.category[1].closed


def test_layout_of_a_per_example_run(tmp_path: Path) -> None:
    logged = fit_logged(tmp_path, GradientNoiseScale(beta=0.8, mode="per_example"))
    layout = gns_custom_scalars_layout(adaptive=False, per_layer=False, per_example=True, kaplan=False)
    assert_layout_fits(layout, logged)
    assert "skipped steps and coverage" in chart_tags(layout)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("per_example", [False, True])
@pytest.mark.parametrize("kaplan", [False, True])
def test_layout_charts_per_configuration(adaptive: bool, per_layer: bool, per_example: bool, kaplan: bool) -> None:
    layout = gns_custom_scalars_layout(adaptive=adaptive, per_layer=per_layer, per_example=per_example, kaplan=kaplan)
    charts = chart_tags(layout)
    regexes = [regex for tags in charts.values() for regex in tags]

    def drawn(tag: str) -> bool:
        return any(re.match(regex, tag) for regex in regexes)

    always = ["gns/b_simple", "gns/grad_sq_norm", "gns/trace_cov", "gns/b_big", "gns/b_small", "gns/skipped_steps"]
    always += ["gns/steps_over_min", "gns/examples_over_min", "gns/statistical_efficiency"]
    always += ["gns/b_simple_low", "gns/b_simple_high"]
    [margin] = [c for category in layout.category for c in category.chart if c.HasField("margin")]
    [series] = margin.margin.series
    assert (series.value, series.lower, series.upper) == ("gns/b_simple", "gns/b_simple_low", "gns/b_simple_high")
    assert all(drawn(tag) for tag in always)
    for tag in ("gns/effective_batch_size", "gns/accumulation", "gns/lr_factor"):
        assert drawn(tag) is adaptive
    assert drawn("gns/covered_fraction") is per_example
    assert drawn("gns/kaplan_b_crit_tokens") is kaplan
    assert drawn("gns/layer/blocks.0.ln_1/b_simple") is per_layer
    assert not drawn("gns/b_simple_sequences")  # the $ anchors
    assert ("accumulation and learning-rate factor" in charts) is adaptive
    assert ("skipped steps and coverage" in charts) is per_example
    assert all(tags for tags in charts.values())
    assert len(layout.category) == (2 if per_layer else 1)


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_write_layout_through_a_tensorboard_logger(tmp_path: Path, namespace: str) -> None:
    loggers = pytest.importorskip(f"{namespace}.loggers")
    logger = loggers.TensorBoardLogger(tmp_path, name="layout")
    assert write_layout(logger, adaptive=False, kaplan=False) is True
    logger.experiment.flush()
    assert write_layout(loggers.CSVLogger(tmp_path)) is False

    accumulator = event_accumulator.EventAccumulator(logger.log_dir)
    accumulator.Reload()
    [event] = accumulator.Tensors("custom_scalars__config__")
    written = layout_pb2.Layout()
    written.ParseFromString(event.tensor_proto.string_val[0])
    assert layout_as_dict(written) == layout_as_dict(gns_custom_scalars_layout(adaptive=False, kaplan=False))
    assert layout_as_dict(written) != layout_as_dict(gns_custom_scalars_layout())
