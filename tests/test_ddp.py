"""Real 2-process DDP on CPU (gloo): per-rank gradients are the small batches, the reduced one the big."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from support.ddp_worker import ReplayedLayers, UnusedBranches
from support.models import LinearProblem
from support.multiprocess import run_worker
from support.recording import Recorder, assert_matches_reference
from support.reference import MicroBatch
from support.reference_func import assert_histories_match, reference_history

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # every test runs 2-process workers

WORKER = Path(__file__).parent / "support" / "ddp_worker.py"


def run_ddp(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    run_worker(WORKER, "--out", str(tmp_path), *args)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def merged_recorder(results: list[dict[str, Any]]) -> Recorder:
    recorder = Recorder.__new__(Recorder)
    recorder.micro_batches = [mb for r in results for mb in r["micro_batches"]]
    recorder.history = results[0]["history"]
    return recorder


def check_ranks_agree(results: list[dict[str, Any]]) -> None:
    assert results[0]["history"] == results[1]["history"]
    for r in results:
        assert all(isinstance(mb, MicroBatch) for mb in r["micro_batches"])
    # The two ranks saw different data: the small batches really are per rank.
    assert not torch.equal(results[0]["micro_batches"][0].x, results[1]["micro_batches"][0].x)


@pytest.mark.parametrize(
    ("accumulate", "user_hook", "source"),
    [(1, False, "ddp_comm_hook"), (2, False, "param_hooks"), (1, True, "param_hooks")],
    ids=["comm-hook", "accumulation", "fallback-after-user-comm-hook"],
)
def test_ddp_matches_float64_recomputation(tmp_path: Path, accumulate: int, user_hook: bool, source: str) -> None:
    # 203 examples: DistributedSampler pads to 102 per rank, so each rank's last micro-batch is short
    # (102 = 12 * 8 + 6), and with accumulation the last window holds one micro-batch of two.
    args = ["--accumulate", str(accumulate), "--examples", "203", "--lr", "0.3", "--beta", "0.9"]
    results = run_ddp(tmp_path, *args, *(["--user-comm-hook"] if user_hook else []))
    check_ranks_agree(results)
    assert results[0]["mode"] == "ddp"
    assert results[0]["source"] == source
    assert_matches_reference(merged_recorder(results), world_size=2, beta=0.9)


@pytest.mark.parametrize("accumulate", [1, 2], ids=["comm-hook", "accumulation"])
def test_ddp_windows_without_an_optimizer_step_are_dropped_on_both_ranks(tmp_path: Path, accumulate: int) -> None:
    """An optimizer_step that skips every third window on both ranks: those windows are dropped (they were added to
    the next window's norms, whose .grad holds that window alone), the other steps match the float64
    recomputation, and no rank waits for the other."""
    args = ["--accumulate", str(accumulate), "--examples", "192", "--lr", "0.3", "--model", "skips-windows"]
    results = run_ddp(tmp_path, *args)
    check_ranks_agree(results)
    windows = 192 // 2 // 8 // accumulate
    assert [r["unstepped_windows"] for r in results] == [windows // 3] * 2
    for r in results:
        kept = set(range(len(r["micro_batches"]))) - set(r["dropped"])
        r["micro_batches"] = [mb for i, mb in enumerate(r["micro_batches"]) if i in kept]
    assert results[0]["measured_steps"] == windows - windows // 3 and results[0]["skipped_steps"] == 0
    assert_matches_reference(merged_recorder(results), world_size=2, beta=0.9)


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_per_example_matches_float64_recomputation(tmp_path: Path, strategy: str, accumulate: int) -> None:
    """Every example on every rank is a small batch; the big batch is the all-reduced gradient.

    Under FSDP2 (ModelParallelStrategy + fully_shard, which "auto" measures per example) the parameters are
    sharded and the big-batch norm sums the ranks' shards.
    """
    mode = ["--mode", "per_example"] if strategy == "ddp" else []
    args = ["--strategy", strategy, *mode, "--accumulate", str(accumulate), "--examples", "203", "--lr", "0.3"]
    results = run_ddp(tmp_path, *args, "--beta", "0.9")
    check_ranks_agree(results)
    assert results[0]["mode"] == "per_example" and results[0]["source"] == "per_example"
    assert_matches_reference(merged_recorder(results), world_size=2, beta=0.9, per_example=True)


def test_fsdp2_equals_ddp_on_a_multi_layer_model(tmp_path: Path) -> None:
    """Same data, same initial weights: sharded and DDP training give the same noise scales, per layer too."""
    args = ["--model", "mlp", "--per-layer", "--examples", "203", "--lr", "0.3", "--beta", "0.9"]
    ddp = run_ddp(tmp_path / "ddp", *args, "--mode", "per_example")
    fsdp = run_ddp(tmp_path / "fsdp2", *args, "--strategy", "fsdp2")
    assert fsdp[0]["mode"] == "per_example"
    assert len(ddp[0]["history"]) == len(fsdp[0]["history"]) > 10
    for want, got in zip(ddp[0]["history"], fsdp[0]["history"], strict=True):
        for key in ("grad_sq_norm", "trace_cov", "b_simple"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, nan_ok=True), (key, got["step"])
    assert set(fsdp[0]["layer_b_simple"]) == {"net.0", "net.1", "net.3"}
    for name, value in ddp[0]["layer_b_simple"].items():
        assert fsdp[0]["layer_b_simple"][name] == pytest.approx(value, rel=1e-4)


def test_ddp_closed_form_linear_regression(tmp_path: Path) -> None:
    """lr = 0, two ranks, no accumulation: B_simple converges near the closed form."""
    results = run_ddp(tmp_path, "--examples", "24000", "--batch-size", "16", "--beta", "0.995", "--dim", "6")
    check_ranks_agree(results)
    r = results[0]
    assert r["source"] == "ddp_comm_hook"
    assert r["b_simple"] == pytest.approx(r["closed_form_b_simple"], rel=0.15)
    assert r["trace_cov"] == pytest.approx(r["closed_form_trace_cov"], rel=0.15)


def test_ddp_per_example_with_unused_parameters_matches_float64(tmp_path: Path) -> None:
    """Ranks cover different parameters each step (a branch only rank 1 runs, a layer nobody runs): every rank
    agrees on what is measured inside the step's all-reduce, and the numbers are exact, per layer too."""
    args = ["--model", "unused-branches", "--mode", "per_example", "--per-layer", "--examples", "192"]
    results = run_ddp(tmp_path, *args, "--lr", "0.3", "--beta", "0.8")
    assert results[0]["history"] == results[1]["history"]
    assert results[0]["layer_b_simple"] == pytest.approx(results[1]["layer_b_simple"], rel=0, nan_ok=True)
    assert results[0]["history"][-1]["skipped"] == 0
    model = UnusedBranches(LinearProblem(dim=6, noise_std=1.0, seed=20))
    micro_batches = [mb for r in results for mb in r["micro_batches"]]
    assert all(float(mb.batch[2].sum()) == 0 for mb in results[0]["micro_batches"])  # rank 0 never ran the branch
    assert any(float(mb.batch[2].sum()) > 0 for mb in results[1]["micro_batches"])
    names = ["linear.weight", "branch.weight", "branch.bias", "never.weight", "never.bias"]
    want = reference_history(
        model, micro_batches, UnusedBranches.example_loss, lambda step: names,
        lambda batch: torch.ones(len(batch[0])), beta=0.8, world_size=2,
    )  # fmt: skip
    assert_histories_match(results[0]["history"], want, rel=1e-4)  # float32 training
    # The main layer runs every step: its own noise scale is exact too.
    main_layer = reference_history(
        model, micro_batches, UnusedBranches.example_loss, lambda step: ["linear.weight"],
        lambda batch: torch.ones(len(batch[0])), beta=0.8, world_size=2,
    )  # fmt: skip
    assert results[0]["layer_b_simple"]["linear"] == pytest.approx(main_layer[-1]["b_simple"], rel=1e-4)
    assert math.isnan(results[0]["layer_b_simple"].get("never", math.nan))


def test_ddp_per_example_through_replayed_layers_matches_float64(tmp_path: Path) -> None:
    """GRU, MultiheadAttention and a user-written layer on 2 processes: covered whole, exact on every rank."""
    args = ["--model", "replayed", "--mode", "per_example", "--examples", "96", "--lr", "0.1", "--beta", "0.8"]
    results = run_ddp(tmp_path, *args)
    assert results[0]["history"] == results[1]["history"]
    assert results[0]["history"][-1]["skipped"] == 0
    assert results[0]["covered_fraction"] == results[1]["covered_fraction"] == 1.0
    model = ReplayedLayers(LinearProblem(dim=6, noise_std=1.0, seed=20))
    micro_batches = [mb for r in results for mb in r["micro_batches"]]
    want = reference_history(
        model, micro_batches, ReplayedLayers.example_loss, lambda step: [n for n, _ in model.named_parameters()],
        lambda batch: torch.ones(len(batch[0])), beta=0.8, world_size=2,
    )  # fmt: skip
    assert_histories_match(results[0]["history"], want, rel=1e-4)  # float32 training


def test_ddp_spawn_gives_the_same_numbers_as_ddp(tmp_path: Path) -> None:
    """ddp_spawn pickles the callback through shared memory: each process must still own its statistics."""
    args = ["--examples", "203", "--lr", "0.3", "--beta", "0.9", "--mode", "per_example"]
    ddp = run_ddp(tmp_path / "ddp", *args)
    spawn = run_ddp(tmp_path / "spawn", *args, "--strategy", "ddp_spawn")
    check_ranks_agree(spawn)
    assert len(spawn[0]["history"]) == len(ddp[0]["history"]) > 10
    for want, got in zip(ddp[0]["history"], spawn[0]["history"], strict=True):
        for key in ("grad_sq_norm", "trace_cov", "b_simple"):
            assert got[key] == pytest.approx(want[key], rel=1e-9), (key, got["step"])
    assert_matches_reference(merged_recorder(spawn), world_size=2, beta=0.9, per_example=True)


def test_main_process_reads_rank_zero_readouts_after_ddp_spawn(tmp_path: Path) -> None:
    """The main process of a ddp_spawn fit ran no hook: after fit it reads what rank 0 had at its end."""
    args = ["--examples", "203", "--lr", "0.3", "--beta", "0.9", "--mode", "per_example", "--per-layer"]
    rank0 = run_ddp(tmp_path, *args, "--strategy", "ddp_spawn", "--model", "raw-offset")[0]
    main = torch.load(tmp_path / "main.pt", weights_only=False)
    assert math.isfinite(rank0["b_simple"]) and rank0["layer_b_simple"] and rank0["skipped_steps"] == 0
    assert list(rank0["left_out"]) == ["offset"] and rank0["covered_fraction"] < 1  # the main process read {}
    for key in ("mode", "source", "b_simple", "grad_sq_norm", "trace_cov", "layer_b_simple", "covered_fraction"):
        assert main[key] == rank0[key], key
    assert main["left_out"] == rank0["left_out"]
    assert main["compute"] == rank0["compute"] and "gns/layer/linear/b_simple" in main["compute"]
    assert main["skipped_steps"] == 0


def test_a_second_ddp_spawn_fit_continues_the_first_without_a_read_in_between(tmp_path: Path) -> None:
    """The main process takes rank 0's result when the callback is pickled into the next spawned fit: without a
    readout read in between, the second fit started from before the first (a probe: 10 measured steps, not 20)."""
    args = ["--examples", "203", "--lr", "0.3", "--beta", "0.9", "--strategy", "ddp_spawn"]
    (tmp_path / "once").mkdir()
    (tmp_path / "twice").mkdir()
    once = run_ddp(tmp_path / "once", *args)[0]["measured_steps"]
    twice = run_ddp(tmp_path / "twice", *args, "--fits", "2")[0]["measured_steps"]
    main = torch.load(tmp_path / "twice" / "main.pt", weights_only=False)["measured_steps"]
    assert once > 0 and twice == main == 2 * once


def test_user_comm_hook_in_module_on_fit_start_falls_back_and_says_so(tmp_path: Path) -> None:
    """A comm hook the LightningModule registers in on_fit_start (after every callback's) keeps working."""
    results = run_ddp(tmp_path, "--model", "module-comm-hook", "--examples", "203", "--lr", "0.3", "--beta", "0.9")
    check_ranks_agree(results)
    assert results[0]["mode"] == "ddp" and results[0]["source"] == "param_hooks"
    assert "already has a communication hook" in (tmp_path / "warnings.txt").read_text()
    assert_matches_reference(merged_recorder(results), world_size=2, beta=0.9)


UNFROZEN_WORKER = Path(__file__).parent / "support" / "unfrozen_ddp_worker.py"


@pytest.mark.parametrize(
    ("accumulation", "mode", "own_hook"),
    [(1, "ddp", False), (2, "ddp", False), (1, "ddp", True), (1, "per_example", False)],
    ids=["comm-hook", "accumulation-2", "users-comm-hook", "per-example"],
)
def test_parameters_unfrozen_after_ddp_wrapped_the_model_skip_the_steps_and_say_why(
    tmp_path: Path, accumulation: int, mode: str, own_hook: bool
) -> None:
    """DDP never averages a backbone frozen when it wrapped the model (BackboneFinetuning): after the unfreeze the
    all-reduced .grad is no big batch (the probe measured |G|^2 -0.7 to 204 against 2 to 57 without this check).
    Every such step is skipped, on both ranks, with the reason, whatever feeds the small batches (the callback's
    comm hook, parameter hooks beside the user's own comm hook, per-example norms); the epoch before is measured."""
    flags = ["--accumulation", str(accumulation), "--mode", mode] + (["--own-hook"] if own_hook else [])
    run_worker(UNFROZEN_WORKER, "--out", str(tmp_path), *flags)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    steps_per_epoch = 320 // 8 // 2 // accumulation  # 320 examples, 8 per micro-batch on each of 2 ranks
    for state in ranks:
        assert state["measured_steps"] == steps_per_epoch, state
        assert state["skipped_steps"] == 2 * steps_per_epoch, state
    said = [m for m in ranks[0]["said"] if "DDP averages only the parameters that needed a gradient" in m]
    expected = "does not average 144 elements (backbone.0.weight, backbone.0.bias) of the 161 optimized elements"
    assert len(said) == 1 and expected in said[0], said
