"""Both Lightning namespaces, LightningCLI, and the framework-free tracker in a plain PyTorch loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_gns import GradientNoiseScale, GradientNoiseScaleTracker
from support.cli import CLI_TRAINER_ARGS, CLIData, CLIRegression
from support.models import LinearProblem, LinearRegression, loader
from support.multiprocess import run_worker
from support.reference import reference_run
from support.trainers import make_trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pytorch_lightning_namespace_without_importing_lightning() -> None:
    """lightning_gns.pytorch_lightning works with pytorch_lightning.Trainer and never imports `lightning`."""
    code = """
import sys
import torch
import pytorch_lightning as pl
from lightning_gns.pytorch_lightning import GradientNoiseScale

class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.linear(x).squeeze(-1) - y) ** 2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

gen = torch.Generator().manual_seed(0)
x, y = torch.randn(256, 4, generator=gen), torch.randn(256, generator=gen)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
gns = GradientNoiseScale(beta=0.9)  # a lone callback: Lightning checks isinstance against its own Callback
trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=gns, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2)
trainer.fit(Model(), data)
assert gns.mode == "microbatch" and gns.b_simple > 0, gns.b_simple
assert not any(name == "lightning" or name.startswith("lightning.") for name in sys.modules), "imported lightning"
print("ok", gns.b_simple)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")


def test_lightning_namespace_lone_callback() -> None:
    problem = LinearProblem(dim=4, seed=40)
    x, y = problem.sample(8 * 2 * 10, seed=41)
    gns = GradientNoiseScale(beta=0.9)
    make_trainer(gns, accumulate_grad_batches=2).fit(LinearRegression(problem), loader(x, y, 8))  # type: ignore[arg-type]
    assert gns.b_simple > 0


def _gns_callback(cli: LightningCLI) -> GradientNoiseScale:
    (gns,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientNoiseScale)]  # type: ignore[attr-defined]
    return gns


def test_lightning_cli_from_arguments() -> None:
    args = ["fit", *CLI_TRAINER_ARGS, "--trainer.callbacks+=lightning_gns.GradientNoiseScale"]
    args += ["--trainer.callbacks.beta=0.95", "--trainer.callbacks.mode=microbatch"]
    cli = LightningCLI(CLIRegression, CLIData, save_config_callback=None, args=args)
    gns = _gns_callback(cli)
    assert gns.beta == 0.95 and gns.mode == "microbatch"
    assert gns.b_simple > 0


def test_lightning_cli_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_gns.GradientNoiseScale\n"
        "      init_args:\n"
        "        beta: 0.9\n"
        "        measure_every_n_steps: 2\n"
    )
    cli = LightningCLI(
        CLIRegression, CLIData, save_config_callback=None, args=["fit", f"--config={config}", *CLI_TRAINER_ARGS]
    )
    gns = _gns_callback(cli)
    assert (gns.beta, gns.measure_every_n_steps) == (0.9, 2)
    assert int(gns.metric.measured_steps) == 4  # 8 optimizer steps, every second one measured


def test_lightning_cli_help_shows_docstring(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        LightningCLI(
            CLIRegression, CLIData, args=["fit", "--trainer.callbacks.help", "lightning_gns.GradientNoiseScale"]
        )
    out = capsys.readouterr().out
    assert "--trainer.callbacks.measure_every_n_steps" in out
    assert "EMA decay per measured optimizer step" in out


@pytest.mark.parametrize(("mode", "accumulate"), [("microbatch", 3), ("per_example", 1), ("per_example", 2)])
def test_plain_pytorch_tracker_agrees_with_callback(mode: str, accumulate: int) -> None:
    """The same batches through Lightning and through a hand-written loop give bit-identical statistics."""
    problem = LinearProblem(dim=5, seed=42)
    x, y = problem.sample(8 * 3 * 8, seed=43)
    gns = GradientNoiseScale(beta=0.9, mode=mode)  # type: ignore[arg-type]
    make_trainer([gns], accumulate_grad_batches=accumulate).fit(LinearRegression(problem, lr=0.2), loader(x, y, 8))

    model = LinearRegression(problem, lr=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    tracker = GradientNoiseScaleTracker(beta=0.9)
    tracker.attach(model.parameters(), mode=mode, model=model)  # type: ignore[arg-type]
    batches = list(loader(x, y, 8))
    for start in range(0, len(batches), accumulate):
        for xb, yb in batches[start : start + accumulate]:
            tracker.start_micro_batch(units=len(xb), accumulation=accumulate)
            (model.training_step((xb, yb), 0) / accumulate).backward()
            tracker.end_micro_batch()
        tracker.measure_step()
        optimizer.step()
        optimizer.zero_grad()
    tracker.detach()
    for name in gns.metric._defaults:
        assert torch.equal(getattr(gns.metric, name), getattr(tracker.metric, name)), name


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("accumulation", "source", "shards"),
    [(1, "ddp_comm_hook", "even"), (2, "param_hooks", "even"), (2, "param_hooks", "uneven")],
)
def test_plain_torch_ddp_tracker_matches_float64_recomputation(
    tmp_path: Path, accumulation: int, source: str, shards: str
) -> None:
    """uneven: the ranks' last windows hold 1 and 2 micro-batches. The big batch was rescaled by this rank's own
    count: |G|^2 24.5 on rank 0 and 0.39 on rank 1 for 6.6 in a probe, and the ranks' averages parted."""
    args = [str(tmp_path), str(accumulation)] + (["uneven"] if shards == "uneven" else [])
    run_worker(Path(__file__).parent / "support" / "ddp_plain_worker.py", *args)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert results[0]["source"] == source
    assert (results[0]["g2"], results[0]["tr"]) == (results[1]["g2"], results[1]["tr"])
    expected = reference_run([mb for r in results for mb in r["micro_batches"]], world_size=2, beta=0.9)[-1]
    assert results[0]["g2"] == pytest.approx(expected["grad_sq_norm"], rel=1e-4)
    assert results[0]["tr"] == pytest.approx(expected["trace_cov"], rel=1e-4)


@pytest.mark.parametrize(("mode", "accumulate"), [("microbatch", 3), ("per_example", 2)])
def test_fabric_loop_agrees_with_callback(mode: str, accumulate: int) -> None:
    """Lightning Fabric: the tracker around fabric.backward gives the callback's statistics bit for bit."""
    from lightning.fabric import Fabric

    problem = LinearProblem(dim=5, seed=44)
    x, y = problem.sample(8 * 3 * 6, seed=45)
    gns = GradientNoiseScale(beta=0.9, mode=mode)  # type: ignore[arg-type]
    make_trainer([gns], accumulate_grad_batches=accumulate).fit(LinearRegression(problem, lr=0.2), loader(x, y, 8))

    fabric = Fabric(accelerator="cpu", devices=1)
    module = LinearRegression(problem, lr=0.2)
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.2))
    tracker = GradientNoiseScaleTracker(beta=0.9)
    # The hooks go on the user's module; Fabric's wrapper forwards to it.
    tracker.attach(module.parameters(), mode=mode, model=module)  # type: ignore[arg-type]
    batches = list(fabric.setup_dataloaders(loader(x, y, 8)))
    for start in range(0, len(batches), accumulate):
        window = batches[start : start + accumulate]
        for i, (xb, yb) in enumerate(window):
            with fabric.no_backward_sync(model, enabled=i < len(window) - 1):
                tracker.start_micro_batch(units=len(xb), accumulation=accumulate)
                fabric.backward(module.training_step((xb, yb), 0) / accumulate)
                tracker.end_micro_batch()
        tracker.measure_step()
        optimizer.step()
        optimizer.zero_grad()
    tracker.detach()
    assert int(tracker.metric.measured_steps) == len(batches) // accumulate
    for name in gns.metric._defaults:
        assert torch.equal(getattr(gns.metric, name), getattr(tracker.metric, name)), name
