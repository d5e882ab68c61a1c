"""Each example project runs end to end with tiny settings and logs gns/b_simple to TensorBoard."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from lightning_gns.scalars import B_SIMPLE
from lightning_gns.tools.report import Scalars, load_runs

EXAMPLES = Path(__file__).resolve().parents[1] / "example_projects"
# Keeps every script to a few optimizer steps: seconds, not minutes.
TINY_CHAR = [
    "--max-steps", "6", "--batch-size", "4", "--context", "16", "--d-model", "16", "--layers", "1", "--heads", "2",
    "--val-every", "0", "--log-every-n-steps", "1", "--no-progress-bar",
]  # fmt: skip
TINY_DIGITS = [
    "--max-epochs", "1", "--limit-train-batches", "8", "--limit-val-batches", "1", "--accumulate", "2",
    "--log-every-n-steps", "1", "--no-progress-bar",
]  # fmt: skip


def run_script(name: str, *args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # A launcher's variables would make Lightning think this process is already one DDP rank.
    for variable in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(variable, None)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    print(f"{name} {' '.join(args[:2])}: {time.perf_counter() - start:.1f} s")  # shown with pytest -s
    return proc


def only_run(logdir: Path) -> Scalars:
    runs = load_runs(logdir)
    assert len(runs) == 1, list(runs)
    return next(iter(runs.values()))


def assert_logged_b_simple(run: Scalars) -> None:
    values = run[B_SIMPLE].values
    assert len(values) >= 2
    # Measured (NaN means no estimate yet). A few noisy steps can leave the |G|^2 average negative, which
    # reads as inf (two DDP ranks give one degree of freedom per step), so only the positive sign is asserted.
    assert not np.isnan(values[-1]) and values[-1] > 0


@pytest.mark.slow
def test_digits_classifier(tmp_path: Path) -> None:
    proc = run_script("digits_classifier.py", *TINY_DIGITS, "--logdir", str(tmp_path / "logs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GNS mode 'microbatch'" in proc.stdout
    assert_logged_b_simple(only_run(tmp_path / "logs"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "mode"), [([], "per_example"), (["--accumulate", "2"], "microbatch")], ids=["per-example", "accumulate"]
)
def test_char_transformer(tmp_path: Path, extra: list[str], mode: str) -> None:
    proc = run_script("char_transformer.py", *TINY_CHAR, *extra, "--logdir", str(tmp_path / "logs"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"GNS mode '{mode}'" in proc.stdout
    assert "B_simple tokens" in proc.stdout and "B_simple sequences" in proc.stdout
    run = only_run(tmp_path / "logs")
    assert_logged_b_simple(run)
    # Tokens per micro-batch: 4 sequences x 16 tokens; the sequence count is the token count / context.
    assert run["gns/b_big"].values[-1] == 4 * 16 * (2 if extra else 1)
    np.testing.assert_allclose(run["gns/b_simple_sequences"].values, run[B_SIMPLE].values / 16, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_example_two_processes(tmp_path: Path) -> None:
    args = [*TINY_DIGITS, "--accumulate", "1", "--logdir", str(tmp_path / "logs")]
    proc = run_script("ddp_example.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GNS mode 'ddp'" in proc.stdout
    run = only_run(tmp_path / "logs")
    assert_logged_b_simple(run)
    # Small batch: one rank's micro-batch (32 examples); big batch: both ranks' (64).
    assert run["gns/b_small"].values[-1] == 32 and run["gns/b_big"].values[-1] == 64


@pytest.mark.slow
def test_adaptive_accumulation_flag(tmp_path: Path) -> None:
    args = [*TINY_CHAR, "--adaptive-accumulation", "--logdir", str(tmp_path / "logs")]
    proc = run_script("char_transformer.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adaptive accumulation: 1 from step 0" in proc.stdout
    run = only_run(tmp_path / "logs")
    assert_logged_b_simple(run)
    # One micro-batch of 4 sequences x 16 tokens per step, learning rate as configured (no change in 6 steps).
    assert list(run["gns/accumulation"].values) == [1.0] * 6
    assert list(run["gns/effective_batch_size"].values) == [64.0] * 6
    assert list(run["gns/lr_factor"].values) == [1.0] * 6


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["digits_classifier", "char_transformer", "ddp_example"])
def test_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_example(name).parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--logdir" in capsys.readouterr().out or name == "ddp_example"


def test_char_transformer_covers_every_parameter_in_per_example_mode() -> None:
    from lightning_gns.sources.per_example import is_supported

    module = load_example("char_transformer")
    model = module.CharTransformer(context=16, d_model=16, num_layers=1, num_heads=2)
    covered = {id(p) for m in model.modules() if is_supported(m) for p in m.parameters(recurse=False)}
    assert all(id(p) in covered for p in model.parameters())
