"""Critical-batch forecasts: the pure functions, and their logging and checkpointing by the callback."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing import event_accumulator
from torch import Tensor

from lightning_gns import GradientNoiseScale
from lightning_gns.forecasts import (
    examples_over_min,
    kaplan_critical_batch_tokens,
    statistical_efficiency,
    steps_over_min,
)
from support.models import LinearProblem, LinearRegression, loader
from support.trainers import make_trainer

FORECASTS = ("gns/steps_over_min", "gns/examples_over_min", "gns/statistical_efficiency")


def t(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


def test_forecasts_follow_the_papers_relations() -> None:
    # At B = B_noise a run needs twice the minimum steps and twice the minimum examples (McCandlish eq. 2.11).
    assert float(steps_over_min(t(64.0), t(64.0))) == 2.0
    assert float(examples_over_min(t(64.0), t(64.0))) == 2.0
    # The per-step trade-off holds for every batch: (S/S_min - 1)(E/E_min - 1) = 1.
    for batch in (1.0, 7.0, 300.0, 1e5):
        s, e = steps_over_min(t(batch), t(250.0)), examples_over_min(t(batch), t(250.0))
        assert float((s - 1) * (e - 1)) == pytest.approx(1.0, rel=1e-12)
    # No signal resolved yet (B_simple = inf): infinitely many steps, but every example still counts fully.
    assert float(steps_over_min(t(32.0), t(math.inf))) == math.inf
    assert float(examples_over_min(t(32.0), t(math.inf))) == 1.0
    assert math.isnan(float(steps_over_min(t(32.0), t(math.nan))))


def test_statistical_efficiency() -> None:
    assert float(statistical_efficiency(t(128.0), t(50.0), t(128.0))) == 1.0  # the base batch itself
    # Pollux: (phi + B0) / (phi + B); quadrupling a batch far below the noise scale costs little.
    assert float(statistical_efficiency(t(400.0), t(1e4), t(100.0))) == pytest.approx(10100 / 10400)
    assert float(statistical_efficiency(t(400.0), t(100.0), t(100.0))) == pytest.approx(0.4)
    assert float(statistical_efficiency(t(400.0), t(math.inf), t(100.0))) == 1.0


def test_kaplan_fit_matches_the_published_orders_of_magnitude() -> None:
    # Kaplan et al. 2020: ~2.7e5 tokens at L = 4 nats, ~1e6 at L = 3 (the theory notes).
    assert float(kaplan_critical_batch_tokens(t(4.0))) == pytest.approx(2.7e5, rel=0.02)
    assert float(kaplan_critical_batch_tokens(t(3.0))) == pytest.approx(1.07e6, rel=0.02)
    # Halving the loss multiplies B_crit by 2^(1/0.21).
    ratio = kaplan_critical_batch_tokens(t(1.5)) / kaplan_critical_batch_tokens(t(3.0))
    assert float(ratio) == pytest.approx(2 ** (1 / 0.21))


class LossLoggingRegression(LinearRegression):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def loss_logging_fit(
    tmp_path: Path, kaplan_loss: str, steps: int
) -> tuple[GradientNoiseScale, Trainer, Callable[[], None]]:
    """A GradientNoiseScale reading ``kaplan_loss``, its Trainer (accumulation 2, TensorBoard, logging every step),
    and the fit of ``steps`` optimizer steps of a regression that logs ``train_loss``, to run when the test wants."""
    problem = LinearProblem(dim=6, noise_std=0.5, seed=21)
    x, y = problem.sample(8 * 2 * steps, seed=22)
    gns = GradientNoiseScale(beta=0.9, kaplan_loss=kaplan_loss)
    trainer = make_trainer(
        [gns], accumulate_grad_batches=2, log_every_n_steps=1, logger=TensorBoardLogger(tmp_path, name="run")
    )
    return gns, trainer, lambda: trainer.fit(LossLoggingRegression(problem, lr=0.05), loader(x, y, 8))


def test_callback_logs_forecasts_and_the_tensorboard_layout(tmp_path: Path) -> None:
    gns, trainer, fit = loss_logging_fit(tmp_path, "train_loss", steps=12)
    fit()

    b_big = 16.0
    readouts = gns.compute()
    assert readouts["gns/steps_over_min"] == pytest.approx(1 + gns.b_simple / b_big, rel=1e-6)
    assert readouts["gns/examples_over_min"] == pytest.approx(1 + b_big / gns.b_simple, rel=1e-6)
    assert readouts["gns/statistical_efficiency"] == pytest.approx(1.0)  # the batch never changed
    loss = float(trainer.callback_metrics["train_loss"])
    assert readouts["gns/kaplan_b_crit_tokens"] == pytest.approx(2e8 / loss ** (1 / 0.21), rel=1e-5)

    logged = trainer.logged_metrics
    assert set(readouts) == {name for name in logged if name.startswith("gns/")}
    for name, value in readouts.items():
        assert float(logged[name]) == pytest.approx(value, rel=1e-6), name

    accumulator = event_accumulator.EventAccumulator(str(tmp_path / "run" / "version_0"))
    accumulator.Reload()
    assert accumulator.Tensors("custom_scalars__config__"), "the callback wrote no custom-scalars layout"
    assert len(accumulator.Scalars("gns/steps_over_min")) == 12


def test_base_batch_survives_resume() -> None:
    gns = GradientNoiseScale()
    gns.tracker.base_batch_size = torch.tensor(48.0, dtype=torch.float64)
    restored = GradientNoiseScale()
    restored.load_state_dict(gns.state_dict())
    base = restored.tracker.base_batch_size
    assert base is not None and float(base) == 48.0
    assert "gns/statistical_efficiency" not in GradientNoiseScale().compute()


def test_kaplan_loss_must_name_a_metric() -> None:
    with pytest.raises(ValueError, match="kaplan_loss must be the name of a logged loss metric"):
        GradientNoiseScale(kaplan_loss="")


def test_a_kaplan_loss_that_is_never_logged_is_said_once(tmp_path: Path) -> None:
    gns, _, fit = loss_logging_fit(tmp_path, "trian_loss", steps=6)
    with pytest.warns(UserWarning, match=r"kaplan_loss='trian_loss'\): no logged metric") as caught:
        fit()
    said = [str(w.message) for w in caught if "kaplan_loss='trian_loss'" in str(w.message)]
    assert len(said) == 1 and "(logged: 'train_loss'" in said[0] and "self.log('trian_loss', loss)" in said[0]
    assert "gns/kaplan_b_crit_tokens" not in gns.compute()
