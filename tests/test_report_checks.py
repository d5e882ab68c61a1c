"""`lightning-gns report` on damaged logs and bad -o paths; the report figure's axes, units and few-point runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from torch.utils.tensorboard import SummaryWriter

from lightning_gns.scalars import B_SIMPLE
from lightning_gns.tools.cli import main
from lightning_gns.tools.report import (
    ReportError,
    Series,
    _masked_crc32c,
    check_event_file,
    read_logdir,
    report_figure,
    run_report,
)


def write_run(logdir: Path, run: str, b_simple: list[float], start: int = 0, adaptive: bool = False) -> Path:
    """A run's event file with B_simple, the estimates, the batch sizes and a loss at steps start, start + 1, ..."""
    writer = SummaryWriter(str(logdir / run))
    for i, value in enumerate(b_simple):
        step = start + i
        writer.add_scalar(B_SIMPLE, value, step)
        writer.add_scalar("gns/grad_sq_norm", 1.0 / (step + 1), step)
        writer.add_scalar("gns/trace_cov", 40.0, step)
        writer.add_scalar("gns/b_big", 16.0, step)
        writer.add_scalar("gns/b_small", 8.0, step)
        writer.add_scalar("train_loss", 2.0 / (step + 1), step)
        if adaptive:
            writer.add_scalar("gns/accumulation", 1 + step // 4, step)
            writer.add_scalar("gns/effective_batch_size", 16.0 * (1 + step // 4), step)
    writer.close()
    [path] = (logdir / run).glob("events.out.tfevents.*")
    return path


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def record_offsets(path: Path) -> list[int]:
    """Start of each TFRecord, from the length fields alone (no checksums)."""
    data, offsets, offset = path.read_bytes(), [], 0
    while offset < len(data):
        offsets.append(offset)
        offset += 12 + int.from_bytes(data[offset : offset + 8], "little") + 4
    return offsets


# ---------------------------------------------------------------------------------------------- event files
def test_masked_crc32c_agrees_with_tensorboards() -> None:
    rng = np.random.default_rng(0)
    for size in (0, 1, 8, 100, 4097):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert _masked_crc32c(data) == masked_crc32c(data)


def test_check_event_file_tells_damage_from_an_unfinished_tail(tmp_path: Path) -> None:
    path = write_run(tmp_path, "run", [10.0, 11.0, 12.0, 13.0])
    assert check_event_file(path) is None
    offsets = record_offsets(path)
    data = path.read_bytes()

    # A flipped byte inside the third record's payload: damage, named with that record's offset.
    flip_byte(path, offsets[2] + 14)
    problem = check_event_file(path)
    assert problem is not None and problem.fatal
    assert f"record at byte {offsets[2]} fails its checksum" in problem.reason

    # Cut inside the last record: what a file still being written looks like.
    path.write_bytes(data[: offsets[-1] + 5])
    problem = check_event_file(path)
    assert problem is not None and not problem.fatal
    assert f"incomplete record at byte {offsets[-1]}" in problem.reason

    missing = check_event_file(tmp_path / "missing")
    assert missing is not None and missing.fatal and "cannot be read" in missing.reason


def test_one_unreadable_run_is_skipped_and_the_others_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    write_run(logs, "good", [10.0, 11.0, 12.0])
    write_run(logs, "all_nan", [float("nan")] * 3)
    damaged = write_run(logs, "damaged", [20.0, 21.0, 22.0, 23.0])
    flip_byte(damaged, record_offsets(damaged)[3] + 14)
    out = tmp_path / "report.png"

    assert main(["report", str(logs), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.read_bytes()[:4] == b"\x89PNG"
    table = captured.out.split("\n\n")[0].splitlines()
    assert [row.split()[0] for row in table[2:]] == ["good"]
    notes = captured.err.splitlines()
    [nan_note] = [line for line in notes if "'all_nan'" in line]
    assert "skipped run 'all_nan'" in nan_note and "never a finite value" in nan_note
    [damaged_note] = [line for line in notes if "'damaged'" in line]
    assert "skipped run 'damaged'" in damaged_note and str(damaged) in damaged_note and "unreadable" in damaged_note


def test_a_corrupt_event_file_is_named_not_called_empty(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_run(tmp_path, "run", [10.0, 11.0])
    flip_byte(path, 3)  # the first record's length: TensorBoard reads nothing at all
    assert read_logdir(tmp_path).runs["run"] == {}

    assert main(["report", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "unreadable" in err and "fails its checksum" in err
    assert "no 'gns/b_simple' scalar" not in err
    assert not (tmp_path / "x.png").exists()


def test_an_event_file_that_cannot_be_opened_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "events.out.tfevents.1.host"
    link.symlink_to(tmp_path / "gone")
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert str(link) in err and "cannot be read" in err


def test_an_unfinished_event_file_is_reported_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_run(tmp_path, "run", [10.0, 11.0, 12.0, 13.0])
    last = record_offsets(path)[-1]
    path.write_bytes(path.read_bytes()[: last + 5])  # the last record is the step-3 train_loss
    summaries, _ = run_report(tmp_path, tmp_path / "x.png")
    assert [s.run for s in summaries] == ["run"]
    assert summaries[0].end.b_simple == 13.0
    assert f"incomplete record at byte {last}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- -o
@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("missing/report.png", "does not exist; create it (mkdir -p"),
        ("report.xyz", "matplotlib cannot write '.xyz' pictures"),
        ("report", "has no file extension"),
        ("a_file/report.png", "is not a folder"),
        (".", "is a folder"),
    ],
)
def test_bad_output_is_a_usage_error_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], output: str, message: str
) -> None:
    (tmp_path / "a_file").write_text("")
    target = str(tmp_path / output)
    # LOGDIR does not exist either: reading it first would end in "is not a directory" instead.
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "no_logs"), "-o", target])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: lightning-gns report")
    assert "lightning-gns report: error: argument -o/--output:" in err and message in err
    assert "is not a directory" not in err
    assert not (tmp_path / "missing").exists()
    with pytest.raises(ReportError, match="is not a directory"):
        run_report(tmp_path / "no_logs", tmp_path / "fine.png")
    with pytest.raises(ReportError, match="(?i)" + re.escape(message.split(";")[0])):
        run_report(tmp_path / "no_logs", target)


def test_without_matplotlib_the_table_is_still_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary table needs only tensorboard: without matplotlib it was refused before anything was read."""
    import sys

    write_run(tmp_path / "logs", "run", [10.0, 11.0, 12.0])
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, module, None)  # an import of it now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(tmp_path / "logs"), "-o", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert "run" in captured.out and "12" in captured.out  # the table
    assert "No picture: the report picture needs matplotlib: pip install 'lightning-gns[report]'" in captured.err
    assert not (tmp_path / "x.png").exists()


def test_output_suffix_case_and_other_formats_are_accepted(tmp_path: Path) -> None:
    write_run(tmp_path / "logs", "run", [10.0, 11.0, 12.0])
    for name in ("report.PNG", "report.pdf", "report.svg"):
        assert main(["report", str(tmp_path / "logs"), "-o", str(tmp_path / name)]) == 0
        assert (tmp_path / name).stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- figure
def lines(figure: Figure, panel: int) -> list[Line2D]:
    return list(figure.axes[panel].get_lines())


def scalars_of(logdir: Path) -> dict[str, dict[str, Series]]:
    return read_logdir(logdir).runs


def test_figure_axes_scales_and_units(tmp_path: Path) -> None:
    write_run(tmp_path, "fixed", [10.0 + i for i in range(40)])
    write_run(tmp_path, "adaptive", [10.0 + 2 * i for i in range(40)], adaptive=True)
    runs = scalars_of(tmp_path)
    figure = report_figure(runs, dict.fromkeys(runs, "train_loss"), smoothing=0.0, units="tokens")
    main_axes, twin = figure.axes[:4], figure.axes[4]
    for ax in main_axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
        assert "[" in ax.get_xlabel() or ax.get_xlabel() == "optimizer step"
        assert "[" in ax.get_ylabel()
    assert [ax.get_xlabel() for ax in (main_axes[0], main_axes[2], main_axes[3])] == ["optimizer step"] * 3
    assert main_axes[0].get_ylabel() == "batch size [tokens]"
    assert main_axes[1].get_ylabel() == "B_simple [tokens]"
    assert "tokens" in main_axes[2].get_ylabel() and main_axes[3].get_ylabel() == "effective batch [tokens]"
    assert twin.get_ylabel() == "accumulation [micro-batches per step]"

    loss_axis = main_axes[1]
    assert loss_axis.get_xscale() == "log" and loss_axis.get_yscale() == "log"
    assert "log scale" in loss_axis.get_xlabel()
    low, high = loss_axis.get_xlim()
    assert low > high  # reversed: the loss falls as training runs left to right
    # The curve's points are the logged loss at each logged B_simple step.
    fixed = next(line for line in lines(figure, 1) if line.get_label() == "fixed")
    np.testing.assert_allclose(fixed.get_xdata(), 2.0 / (np.arange(40) + 1), rtol=1e-6)
    np.testing.assert_allclose(fixed.get_ydata(), 10.0 + np.arange(40), rtol=1e-6)

    # Batch sizes are piecewise constant: drawn as steps, B_simple is not.
    by_label = {line.get_label(): line for panel in (0, 3) for line in lines(figure, panel)}
    assert by_label["adaptive: effective batch"].get_drawstyle() == "steps-post"
    assert by_label["fixed: batch per step"].get_drawstyle() == "steps-post"
    assert by_label["adaptive: B_simple"].get_drawstyle() == "default"
    assert all(line.get_drawstyle() == "steps-post" for line in twin.get_lines())
    for ax in (main_axes[0], main_axes[2], main_axes[3]):
        assert ax.get_yscale() == "log"


def test_a_loss_that_is_not_positive_keeps_a_linear_loss_axis(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "run"))
    for step in range(10):
        writer.add_scalar(B_SIMPLE, 10.0 + step, step)
        writer.add_scalar("nll", 1.0 - 0.3 * step, step)  # goes negative, as a log-likelihood loss may
    writer.close()
    runs = scalars_of(tmp_path)
    figure = report_figure(runs, {"run": "nll"}, smoothing=0.0)
    assert figure.axes[1].get_xscale() == "linear"
    assert "log scale" not in figure.axes[1].get_xlabel()
    [line] = lines(figure, 1)
    assert len(line.get_xdata()) == 10


@pytest.mark.parametrize("points", [1, 2])
def test_a_run_with_few_points_stays_visible(tmp_path: Path, points: int) -> None:
    write_run(tmp_path / "logs", "short", [30.0 + i for i in range(points)], start=5)
    runs = scalars_of(tmp_path / "logs")
    figure = report_figure(runs, {"short": "train_loss"}, smoothing=0.0)
    for panel in range(4):
        drawn = lines(figure, panel)
        assert drawn, panel
        for line in drawn:
            assert line.get_marker() == "o", (panel, line.get_label())
        ax = figure.axes[panel]
        low, high = sorted(ax.get_xlim())
        xs = np.concatenate([np.asarray(line.get_xdata(), dtype=float) for line in drawn])
        assert low < xs.min() and xs.max() < high
        if panel != 1:
            assert high - low >= 4  # a few steps wide, not a fraction of one
        ys = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in drawn])
        y_low, y_high = ax.get_ylim()
        assert y_low < ys.min() and ys.max() < y_high

    out = tmp_path / "short.png"
    assert main(["report", str(tmp_path / "logs"), "-o", str(out)]) == 0
    assert out.stat().st_size > 20_000


def test_long_runs_get_plain_lines(tmp_path: Path) -> None:
    write_run(tmp_path, "long", [10.0 + i for i in range(60)])
    runs = scalars_of(tmp_path)
    figure = report_figure(runs, {"long": "train_loss"})
    assert all(line.get_marker() in ("None", None, "") for line in lines(figure, 0))


def test_units_reach_the_command_line(tmp_path: Path) -> None:
    write_run(tmp_path / "logs", "run", [10.0, 11.0, 12.0])
    out = tmp_path / "report.svg"
    assert main(["report", str(tmp_path / "logs"), "-o", str(out), "--units", "tokens"]) == 0
    assert "B_simple [tokens]" in out.read_text()


def test_report_runs_from_another_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare file name for -o is in the working directory, which exists."""
    write_run(tmp_path / "logs", "run", [10.0, 11.0, 12.0])
    monkeypatch.chdir(tmp_path)
    assert main(["report", "logs", "-o", "report.png"]) == 0
    assert os.path.getsize(tmp_path / "report.png") > 1000


def test_csv_logs_are_said_not_to_be_read(tmp_path: Path) -> None:
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_text("step,gns/b_simple\n0,3.0\n")
    with pytest.raises(ReportError, match=r"No TensorBoard event files.*CSV logs \(.*metrics\.csv\) are not read"):
        read_logdir(tmp_path)
