"""Checkpoints: an edited or corrupted callback state is refused, changed settings are reported or reconciled."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from lightning_gns import GradientNoiseScale
from lightning_gns.batch_schedule import adascale_gain
from support.adaptive_support import (
    LR,
    MICRO,
    PROBLEM,
    RecordingRegression,
    adaptive,
    check_windows,
    fit,
    window_mean_grad,
)
from support.models import LinearProblem, LinearRegression, loader
from support.trainers import make_trainer

GNS_KEY = "GradientNoiseScale{'mode': 'auto', 'beta': 0.9}"
SMALL = LinearProblem(dim=6, seed=10)
SX, SY = SMALL.sample(8 * 2 * 6, seed=11)


def fit_gns(gns: GradientNoiseScale, ckpt_path: str | None = None, max_epochs: int = 1) -> Trainer:
    trainer = make_trainer([gns], accumulate_grad_batches=2, max_epochs=max_epochs)
    trainer.fit(LinearRegression(SMALL, lr=0.1), loader(SX, SY, 8), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def gns_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    trainer = fit_gns(GradientNoiseScale(beta=0.9))
    path = tmp_path_factory.mktemp("gns") / "epoch0.ckpt"
    trainer.save_checkpoint(path)
    return torch.load(path, weights_only=False)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def adaptive_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Epoch 0 of tests/test_adaptive.py's schedule: accumulation 4, lr factor 4 ("linear"), nothing pending."""
    trainer, _ = fit(adaptive(), max_epochs=1)
    path = tmp_path_factory.mktemp("adaptive") / "epoch0.ckpt"
    trainer.save_checkpoint(path)
    return path


def edited(checkpoint: dict[str, Any], key: str, edit: Callable[[dict[str, Any]], None], path: Path) -> str:
    copy = {**checkpoint, "callbacks": {k: _deep_copy(v) for k, v in checkpoint["callbacks"].items()}}
    edit(copy["callbacks"][key])
    torch.save(copy, path)
    return str(path)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.clone()
    return value


def set_metric(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        state["metric"][name] = value

    return edit


def del_metric(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda state: state["metric"].pop(name)


def set_key(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        state[name] = value

    return edit


def saved_before_the_rename(base_accumulation: Any) -> Callable[[dict[str, Any]], None]:
    """The state as versions before ``base_accumulation`` saved it: under the name ``reference_accumulation``."""

    def edit(state: dict[str, Any]) -> None:
        state.pop("base_accumulation")
        state["reference_accumulation"] = base_accumulation

    return edit


def saved_under(new: str, old: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """The state as versions before the rename of ``old`` to ``new`` saved it, holding ``value``."""

    def edit(state: dict[str, Any]) -> None:
        state.pop(new)
        state[old] = value

    return edit


f64 = torch.float64


# ---------------------------------------------------------------- GradientNoiseScale


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            set_metric("trace_cov_ema", torch.tensor(math.nan, dtype=f64)),
            r"'metric\.trace_cov_ema' is nan, must be finite",
        ),
        (set_metric("grad_sq_norm_ema", torch.tensor(math.inf, dtype=f64)), r"'metric\.grad_sq_norm_ema' is inf"),
        (set_metric("ema_weight", torch.tensor(1.5, dtype=f64)), r"'metric\.ema_weight' is 1\.5, must lie in \[0, 1\]"),
        (set_metric("ema_weight", torch.tensor(0.0, dtype=f64)), r"'metric\.ema_weight' is 0\.0 with measured_steps="),
        (set_metric("measured_steps", torch.tensor(-3)), r"'metric\.measured_steps' is -3, must be a count >= 0"),
        (set_metric("skipped_steps", torch.tensor(1.0)), r"'metric\.skipped_steps' must be an integer count"),
        (set_metric("last_b_big", torch.tensor(-16.0, dtype=f64)), r"'metric\.last_b_big' is -16\.0, must be a batch"),
        (
            set_metric("grad_sq_norm_ema", torch.ones(2, dtype=f64)),
            r"'metric\.grad_sq_norm_ema' must be a scalar tensor",
        ),
        (set_metric("trace_cov_ema", 3.0), r"'metric\.trace_cov_ema' must be a tensor, got float"),
        (del_metric("skipped_steps"), r"'metric\.skipped_steps' is missing"),
        (set_metric("momentum", torch.tensor(0.0)), r"'metric\.momentum' is not a key this version saves"),
        (set_key("beta", 0.5), r"'beta' is 0\.5, but the state was stored under beta=0\.9"),
        (set_key("base_batch_size", torch.tensor(0.0)), r"'base_batch_size' is 0\.0, must be a positive"),
        (
            saved_under("base_batch_size", "reference_batch_size", torch.tensor(0.0)),
            r"'base_batch_size' is 0\.0, must be a positive",
        ),
        (set_key("layer_metrics", {"linear": {}}), r"'layer_metrics\.linear\.ema_weight' is missing"),
        (lambda state: state.pop("metric"), r"'metric' is missing"),
    ],
)
def test_corrupt_noise_scale_state_is_refused(
    gns_checkpoint: dict[str, Any], tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    path = edited(gns_checkpoint, GNS_KEY, edit, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match=r"^GradientNoiseScale: the checkpoint's " + message):
        fit_gns(GradientNoiseScale(beta=0.9), ckpt_path=path, max_epochs=2)


def test_saved_state_loads_after_the_checks(gns_checkpoint: dict[str, Any], tmp_path: Path) -> None:
    # ema_weight reaches exactly 1.0 in float64 after enough steps: legal, and the averages continue.
    def saturate(state: dict[str, Any]) -> None:
        state["metric"]["ema_weight"] = torch.tensor(1.0, dtype=f64)

    gns = GradientNoiseScale(beta=0.9)
    fit_gns(gns, ckpt_path=edited(gns_checkpoint, GNS_KEY, saturate, tmp_path / "saturated.ckpt"), max_epochs=2)
    saved = gns_checkpoint["callbacks"][GNS_KEY]["metric"]
    assert int(gns.metric.measured_steps) == 2 * int(saved["measured_steps"])
    assert float(gns.metric.ema_weight) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "settings"),
    [
        ({"beta": 0.99}, "mode='auto', beta=0.99"),
        ({"beta": 0.9, "mode": "microbatch"}, "mode='microbatch', beta=0.9"),
    ],
)
def test_resume_with_other_settings_warns_that_the_averages_restart(
    gns_checkpoint: dict[str, Any], tmp_path: Path, kwargs: dict[str, Any], settings: str
) -> None:
    path = tmp_path / "saved.ckpt"
    torch.save(gns_checkpoint, path)
    gns = GradientNoiseScale(**kwargs)
    with pytest.warns(UserWarning) as record:
        fit_gns(gns, ckpt_path=str(path), max_epochs=2)
    ours = [str(w.message) for w in record if "restart from zero" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in record]
    assert re.search(
        r"saved with mode='auto', beta=0\.9, but this GradientNoiseScale has " + re.escape(settings) + r": its averages"
        r" .* restart from zero .* resume with GradientNoiseScale\(mode='auto', beta=0\.9\)",
        ours[0],
    )
    # What the warning says happened: only the resumed epoch's steps are in the averages.
    saved_steps = int(gns_checkpoint["callbacks"][GNS_KEY]["metric"]["measured_steps"])
    assert int(gns.metric.measured_steps) == saved_steps > 0


def test_resume_with_the_same_settings_does_not_warn(gns_checkpoint: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "saved.ckpt"
    torch.save(gns_checkpoint, path)
    gns = GradientNoiseScale(beta=0.9)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit_gns(gns, ckpt_path=str(path), max_epochs=2)
    assert not [w for w in record if "restart from zero" in str(w.message)]
    assert int(gns.metric.measured_steps) == 2 * int(gns_checkpoint["callbacks"][GNS_KEY]["metric"]["measured_steps"])


def test_layers_other_than_the_default_key_the_state() -> None:
    """Another set of layers is another estimate (a probe's resume mixed layers='all' averages into 'norm' ones:
    B_simple 42.7 against 68.5): Lightning loads the state only into the same layers, and says so otherwise (the
    warning above). The default is not keyed, so checkpoints of earlier versions keep loading."""
    from lightning_gns.callbacks._checkpoint import foreign_states, parse_state_key

    default, norm = GradientNoiseScale(beta=0.9), GradientNoiseScale(beta=0.9, layers="norm")
    assert default.state_key == GNS_KEY
    assert parse_state_key(norm.state_key, "GradientNoiseScale") == {"mode": "auto", "beta": 0.9, "layers": "norm"}
    callbacks: dict[str, Any] = {GNS_KEY: {}}
    assert foreign_states(callbacks, "GradientNoiseScale", norm.state_key, [norm.state_key]) == [
        {"mode": "auto", "beta": 0.9}
    ]


def test_resume_with_another_batch_size_fn_says_the_units_may_mix(
    gns_checkpoint: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "saved.ckpt"
    torch.save(gns_checkpoint, path)
    assert gns_checkpoint["callbacks"][GNS_KEY]["batch_size_fn"] == "lightning_gns.batch_size.leading_dim_batch_size"
    gns = GradientNoiseScale(beta=0.9, batch_size_fn=lambda batch: 10 * len(batch[0]))
    with pytest.warns(
        UserWarning,
        match=r"counted by batch_size_fn=lightning_gns\.batch_size\.leading_dim_batch_size,"
        r" this callback counts by .*<lambda>.* mix them",
    ):
        fit_gns(gns, ckpt_path=str(path), max_epochs=2)


# ---------------------------------------------------------------- AdaptiveBatchSize


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_key("accumulation", 0), r"'accumulation' is 0, must be an int >= 1"),
        (set_key("accumulation", 4.0), r"'accumulation' is 4\.0, must be an int >= 1"),
        (set_key("base_accumulation", True), r"'base_accumulation' is True, must be an int >= 1"),
        (saved_before_the_rename(True), r"'base_accumulation' is True, must be an int >= 1"),
        (set_key("lr_factor", math.nan), r"'lr_factor' is nan, must be a positive finite learning-rate factor"),
        (set_key("lr_factor", math.inf), r"'lr_factor' is inf, must be a positive finite"),
        (set_key("lr_factor", 0.0), r"'lr_factor' is 0\.0, must be a positive finite"),
        (set_key("lr_factor", -2.0), r"'lr_factor' is -2\.0, must be a positive finite"),
        (set_key("pending", (0, 1.0)), r"'pending\[0\]' is 0, must be an int >= 1"),
        (set_key("pending", (2, math.nan)), r"'pending\[1\]' is nan"),
        (set_key("pending", 3), r"'pending' is 3, must be None or \(accumulation, lr_factor\)"),
        (set_key("last_change_step", -1), r"'last_change_step' is -1, must be None or an optimizer step >= 0"),
        (set_key("micro_batch_size", 0), r"'micro_batch_size' is 0, must be None or a finite number >= 1"),
        (set_key("micro_batch_size", math.inf), r"'micro_batch_size' is inf, must be None or a finite number >= 1"),
        (set_key("epoch_units", -3), r"'epoch_units' is -3, must be a finite number >= 0"),
        (set_key("epoch_micro_batches", -1), r"'epoch_micro_batches' is -1, must be a finite number >= 0"),
        (set_key("units_epoch", -1), r"'units_epoch' is -1, must be an int >= 0"),
        (set_key("history", [{"step": 0}]), r"'history\[0\]' is \{'step': 0\}, must be a dict with step"),
        (set_key("lr_scaling", "cubic"), r"'lr_scaling' is 'cubic', not one of"),
        (lambda state: state.pop("lr_factor"), r"'lr_factor' is missing"),
        (set_key("batch_size", 8), r"'batch_size' is not a key this version saves"),
    ],
)
def test_corrupt_adaptive_state_is_refused(
    adaptive_checkpoint: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    checkpoint = torch.load(adaptive_checkpoint, weights_only=False)
    path = edited(checkpoint, "AdaptiveBatchSize", edit, tmp_path / "edited.ckpt")
    with pytest.raises(ValueError, match=r"^AdaptiveBatchSize: the checkpoint's " + message):
        fit(adaptive(), ckpt_path=path)


@pytest.mark.parametrize(
    ("bounds", "clamped"),
    [({"max_accumulation": 2}, 2), ({"min_accumulation": 6, "max_accumulation": 8}, 6)],
)
def test_accumulation_outside_new_bounds_is_clamped_at_a_safe_boundary(
    adaptive_checkpoint: Path, bounds: dict[str, int], clamped: int
) -> None:
    resumed = adaptive(**bounds)
    with pytest.warns(
        UserWarning, match=r"accumulation 4 lies outside this callback's bounds .* changes to " + str(clamped)
    ):
        trainer, model = fit(resumed, ckpt_path=str(adaptive_checkpoint))
    steps = model.steps  # type: ignore[attr-defined]
    assert steps[0]["accumulation"] == 4  # the restored window, until the first safe boundary
    switch = next(i for i, s in enumerate(steps) if s["accumulation"] != 4)
    assert all(
        bounds.get("min_accumulation", 1) <= s["accumulation"] <= bounds["max_accumulation"] for s in steps[switch:]
    )
    assert (steps[switch - 1]["batch_idx"] + 1) % clamped == 0  # switched where a multiple of the new k was done
    assert {"step": 11 + switch, "accumulation": clamped, "lr_factor": float(clamped)} in resumed.history
    # Every update is the window's mean gradient at the lr x factor of its accumulation ("linear", base 1).
    check_windows(steps, lambda i: LR)
    assert trainer.global_step > 11


@pytest.mark.parametrize("rule", ["sqrt", "adascale", "none"])
def test_changed_lr_scaling_recomputes_the_factor(adaptive_checkpoint: Path, rule: str) -> None:
    checkpoint = torch.load(adaptive_checkpoint, weights_only=False)
    state = checkpoint["callbacks"]["AdaptiveBatchSize"]
    assert (state["accumulation"], state["lr_factor"], state["lr_scaling"]) == (4, 4.0, "linear")
    if rule == "sqrt":
        expected = 2.0
    elif rule == "none":
        expected = 1.0
    else:  # from the saved noise-scale averages, in float64, at the starting batch of MICRO examples
        metric = checkpoint["callbacks"][GNS_KEY]["metric"]
        weight = float(metric["ema_weight"])
        trace_cov, grad_sq_norm = float(metric["trace_cov_ema"]) / weight, float(metric["grad_sq_norm_ema"]) / weight
        expected = adascale_gain(trace_cov, grad_sq_norm, 4.0, base_batch=float(MICRO))
        assert 1.0 < expected < 4.0
    resumed = adaptive(lr_scaling=rule, warmup_steps=1000)  # no further change: the restored k = 4 stays
    seen: dict[str, float] = {}

    class Probe(Callback):
        def on_train_start(self, trainer: Trainer, *args: Any) -> None:
            seen["factor"] = resumed.lr_factor

    model = RecordingRegression(PROBLEM.dim, LR, PROBLEM.w)
    with pytest.warns(UserWarning, match=rf"saved with lr_scaling='linear', this callback has lr_scaling='{rule}'"):
        fit(resumed, model, extra_callbacks=(Probe(),), ckpt_path=str(adaptive_checkpoint))
    assert seen["factor"] == pytest.approx(expected, rel=1e-12)
    assert resumed.history[-1] == {"step": 11, "accumulation": 4, "lr_factor": seen["factor"]}
    for step in model.steps:
        k = step["accumulation"]
        assert k == 4
        update = LR * expected / k * window_mean_grad(step["before"], step["window"])
        torch.testing.assert_close(step["after"].double(), step["before"].double() - update, rtol=1e-5, atol=1e-6)


def test_per_layer_averages_are_dropped_when_per_layer_is_off(tmp_path: Path) -> None:
    # Loaded, they would be logged as gns/layer/... forever without another update.
    with_layers = GradientNoiseScale(beta=0.9, mode="per_example", per_layer=True)
    trainer = fit_gns(with_layers)
    assert with_layers.layer_metrics
    path = tmp_path / "layers.ckpt"
    trainer.save_checkpoint(path)
    without = GradientNoiseScale(beta=0.9, mode="per_example")
    fit_gns(without, ckpt_path=str(path), max_epochs=2)
    assert without.layer_metrics == {}
    assert int(without.metric.measured_steps) == 2 * int(with_layers.metric.measured_steps)


def test_base_batch_saved_under_its_old_name_loads(gns_checkpoint: dict[str, Any], tmp_path: Path) -> None:
    # Versions before base_batch_size saved it as reference_batch_size. 48 is not this run's batch (16), so
    # the check sees the saved value kept, not one taken afresh from the resumed run's first step.
    assert float(gns_checkpoint["callbacks"][GNS_KEY]["base_batch_size"]) == 16.0
    old = saved_under("base_batch_size", "reference_batch_size", torch.tensor(48.0, dtype=f64))
    path = edited(gns_checkpoint, GNS_KEY, old, tmp_path / "old.ckpt")
    resumed = GradientNoiseScale(beta=0.9)
    fit_gns(resumed, ckpt_path=path, max_epochs=2)
    base = resumed.tracker.base_batch_size
    assert base is not None and float(base) == 48.0
    assert int(resumed.metric.measured_steps) > 6  # the saved averages were loaded and continued
    with pytest.warns(DeprecationWarning, match=r"GradientNoiseScaleTracker.reference_batch_size is deprecated"):
        assert resumed.tracker.reference_batch_size is base


def test_states_of_earlier_versions_without_optional_keys_load(adaptive_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(adaptive_checkpoint, weights_only=False)

    def strip_adaptive(state: dict[str, Any]) -> None:
        for key in (
            "pending",
            "last_change_step",
            "micro_batch_size",
            "history",
            "lr_scaling",
            "epoch_units",
            "epoch_micro_batches",
            "units_epoch",
        ):
            state.pop(key)
        saved_before_the_rename(state["base_accumulation"])(state)

    path = edited(checkpoint, "AdaptiveBatchSize", strip_adaptive, tmp_path / "old.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    path = edited(checkpoint, GNS_KEY, lambda state: state.pop("base_batch_size"), tmp_path / "old.ckpt")
    resumed = adaptive(warmup_steps=1000)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(resumed, ckpt_path=path)
    assert not [w for w in record if "AdaptiveBatchSize:" in str(w.message)]  # the rule is taken to be unchanged
    assert (resumed.accumulation, resumed.lr_factor, resumed.base_accumulation) == (4, 4.0, 1)


class ShiftedRegression(LinearRegression):
    """Linear regression plus a raw parameter added in the LightningModule's forward: per_example leaves it out
    (no layer of its own), microbatch measures it."""

    def __init__(self, problem: LinearProblem) -> None:
        super().__init__(problem, lr=0.0)
        self.shift = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return 0.5 * (self.linear(x).squeeze(-1) + 3.0 * self.shift - y - 1.0).square().mean()


@pytest.mark.parametrize(("saved_k", "resumed_k"), [(2, 1), (1, 2)], ids=["microbatch-to-per_example", "reverse"])
def test_a_resume_where_auto_picks_a_mode_that_measures_other_parameters_restarts_the_averages(
    saved_k: int, resumed_k: int, tmp_path: Path
) -> None:
    """mode='auto' keys the state by 'auto': a resume at another accumulation picked the other mode and loaded
    averages over another parameter set without a word (B_simple 0.43 for 1.77 after 12 steps, and +5% the other
    way; a helper's probe). The averages restart, said, and equal those of a resume without the callback's state."""
    problem = LinearProblem(dim=4, seed=66)
    x, y = problem.sample(8 * 12, seed=67)
    first = make_trainer([GradientNoiseScale(beta=0.8)], accumulate_grad_batches=saved_k)
    first.fit(ShiftedRegression(problem), loader(x, y, 8))
    ckpt = tmp_path / "saved.ckpt"
    first.save_checkpoint(ckpt)
    stripped = torch.load(ckpt, weights_only=False)
    stripped["callbacks"] = {k: v for k, v in stripped["callbacks"].items() if not k.startswith("GradientNoiseScale")}
    torch.save(stripped, tmp_path / "stripped.ckpt")
    results = []
    for path in (ckpt, tmp_path / "stripped.ckpt"):
        gns = GradientNoiseScale(beta=0.8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = make_trainer([gns], accumulate_grad_batches=resumed_k, max_epochs=2)
            trainer.fit(ShiftedRegression(problem), loader(x, y, 8), ckpt_path=path)
        results.append((gns, [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)]))
    (resumed, said), (fresh, _) = results
    assert resumed.mode == ("per_example" if resumed_k == 1 else "microbatch")
    assert math.isfinite(fresh.b_simple)
    assert resumed.b_simple == pytest.approx(fresh.b_simple, rel=1e-12)
    restart = "averages restarted" if resumed_k == 1 else "checkpoint's averages leave out 1 parameter(s)"
    assert any(restart in m for m in said), said


class FrozenFirstLayer(LinearRegression):
    def __init__(self, problem: LinearProblem, frozen: bool) -> None:
        super().__init__(problem, lr=0.0)
        self.extra = torch.nn.Linear(4, 1)
        self.extra.requires_grad_(not frozen)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return 0.5 * (self.linear(x).squeeze(-1) + self.extra(x).squeeze(-1) - y).square().mean()


def test_a_microbatch_resume_with_a_layer_unfrozen_since_continues_the_averages(tmp_path: Path) -> None:
    """The review's regression: the restart above fired for a microbatch checkpoint saved with a layer frozen (a
    two-stage fine-tune), blaming per_example, where the same unfreeze inside one run continues the averages."""
    problem = LinearProblem(dim=4, seed=77)
    x, y = problem.sample(8 * 8, seed=78)
    first = make_trainer([GradientNoiseScale(beta=0.8)], accumulate_grad_batches=2)
    first.fit(FrozenFirstLayer(problem, frozen=True), loader(x, y, 8))
    first.save_checkpoint(tmp_path / "stage1.ckpt")
    gns = GradientNoiseScale(beta=0.8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer([gns], accumulate_grad_batches=2, max_epochs=2)
        trainer.fit(FrozenFirstLayer(problem, frozen=False), loader(x, y, 8), ckpt_path=tmp_path / "stage1.ckpt")
    assert not any("averages leave out" in str(w.message) for w in caught)
    assert float(gns.metric.ema_weight) == pytest.approx(1 - 0.8**8)  # 4 steps per epoch, continued
