"""Runs one 2-process DDP fit on CPU (gloo) and saves what each rank saw; launched by tests/test_ddp.py.

Lightning's DDP launcher re-executes this script for the other rank, so it must be a script, not a test.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import DataLoader, TensorDataset

# Run as a script: tests/ (the support package) and the repository root (lightning_gns) on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_gns import GradientNoiseScale
from support.models import LinearProblem, LinearRegression, loader
from support.multiprocess import end_process, launched_children
from support.recording import Recorder
from support.reference_func import BatchRecorder
from support.trainers import make_trainer


class UserCommHook(Callback):
    """Registers a comm hook of the user's own before GradientNoiseScale gets to, to force its fallback."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.strategy.model.register_comm_hook(state=None, hook=allreduce_hook)  # type: ignore[union-attr]


class ModuleCommHook(LinearRegression):
    """Registers the user's own comm hook in LightningModule.on_fit_start, after every callback's on_fit_start."""

    def on_fit_start(self) -> None:
        self.trainer.strategy.model.register_comm_hook(state=None, hook=allreduce_hook)  # type: ignore[union-attr]


class UnusedBranches(LinearRegression):
    """A branch that only some micro-batches of rank 1 run (find_unused_parameters) and a layer nobody runs."""

    def __init__(self, problem: LinearProblem, lr: float = 0.0) -> None:
        super().__init__(problem, lr)
        torch.manual_seed(7)
        # Larger than the main layer, so that a rank which never ran it would split the norm work differently.
        self.branch = torch.nn.Linear(problem.dim, 1)
        self.never = torch.nn.Linear(problem.dim, 1)

    def forward(self, x: torch.Tensor, flag: torch.Tensor, always: bool = False) -> torch.Tensor:
        out = self.linear(x).squeeze(-1)
        if always or bool(flag.any()):
            out = out + flag * self.branch(x).squeeze(-1)
        return out

    @staticmethod
    def example_loss(call: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y, flag = batch
        return 0.5 * (call(x, flag, True) - y).square().mean()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, flag = batch
        return 0.5 * (self(x, flag) - y).square().mean()


class WithRawOffset(LinearRegression):
    """The linear model plus a raw parameter added in the forward: per_example leaves it out, by name."""

    def __init__(self, problem: LinearProblem, lr: float = 0.0) -> None:
        super().__init__(problem, lr)
        self.offset = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return 0.5 * (self.linear(x).squeeze(-1) + self.offset - y).square().mean()


class SkipsEveryThirdWindow(LinearRegression):
    """Runs the closure of every accumulation window and optimizer.step() on two of three only, alike on both
    ranks; ``dropped`` holds the micro-batches (in the order they came) of the windows that took no step."""

    def __init__(self, problem: LinearProblem, lr: float = 0.0) -> None:
        super().__init__(problem, lr)
        self.windows = self.micro_batches = 0
        self.dropped: list[int] = []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.micro_batches += 1

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        self.windows += 1
        if self.windows % 3:
            optimizer.step(closure=optimizer_closure)
            return
        optimizer_closure()
        window = self.trainer.accumulate_grad_batches
        self.dropped.extend(range(self.micro_batches - window, self.micro_batches))


class ReplayedLayers(LinearRegression):
    """The linear model's input read as 3 steps of 2 features through a GRU, attention and a user-written norm.

    Every layer but the two Linear ones takes the generic per-example replay (the GRU its recurrent form).
    """

    def __init__(self, problem: LinearProblem, lr: float = 0.0) -> None:
        super().__init__(problem, lr)
        torch.manual_seed(8)
        self.rnn = torch.nn.GRU(2, 4, batch_first=True)
        self.attn = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        self.scale = Scale(4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.reshape(x.shape[0], -1, 2)
        # A zero initial state made from the input: batched under the float64 reference's vmap too.
        state = (steps[:, :1, :1] * 0).transpose(0, 1).expand(1, -1, 4)
        h = self.rnn(steps, state)[0]
        h = self.scale(h + self.attn(h, h, h, need_weights=False)[0])
        return self.linear(x).squeeze(-1) + self.head(h[:, -1]).squeeze(-1)

    @staticmethod
    def example_loss(call: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        return 0.5 * (call(x) - y).square().mean()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self.example_loss(self, batch)


class Scale(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(x)


class BranchOnRankOneOnly(Callback):
    """Clears rank 0's branch flags before the batch is recorded or used: rank 0 never runs the branch."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == 0:
            batch[2].zero_()


def readouts(gns: GradientNoiseScale) -> dict[str, Any]:
    """What the callback reads back after fit, by name."""
    return {
        "mode": gns.mode,
        "source": gns.source,
        "b_simple": gns.b_simple,
        "grad_sq_norm": gns.grad_sq_norm,
        "trace_cov": gns.trace_cov,
        "layer_b_simple": gns.layer_b_simple,
        "covered_fraction": gns.covered_fraction,
        "left_out": gns.left_out,
        "compute": gns.compute(),
        "skipped_steps": gns.skipped_steps,
        "measured_steps": int(gns.metric.measured_steps),
    }


class SaveResults(Callback):
    """Writes what this process saw at the end of fit (in the process itself: ddp_spawn's parent holds nothing)."""

    def __init__(self, out: Path, gns: GradientNoiseScale, recorder: Any, problem: LinearProblem) -> None:
        self.out, self.gns, self.recorder, self.problem = out, gns, recorder, problem

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gns, recorder, problem = self.gns, self.recorder, self.problem
        result = {
            "rank": trainer.global_rank,
            "micro_batches": recorder.micro_batches,
            "history": recorder.history,
            **readouts(gns),
            "closed_form_b_simple": problem.b_simple,
            "closed_form_trace_cov": problem.trace_cov,
            "closed_form_grad_sq_norm": problem.grad_sq_norm,
        }
        if isinstance(pl_module, SkipsEveryThirdWindow):
            result["dropped"], result["unstepped_windows"] = pl_module.dropped, gns.tracker.unstepped_windows
        if isinstance(pl_module, (UnusedBranches, ReplayedLayers)):
            result["final_params"] = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(result, self.out / f"rank{trainer.global_rank}.pt")


class ShardedLinearRegression(LinearRegression):
    """The same model sharded with FSDP2 (fully_shard) over the data-parallel ranks."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        mesh = self.device_mesh["data_parallel"]
        # The (1, dim) weight sharded along dim 1 puts half of it on each rank (the default dim 0 would leave
        # rank 1 empty), so the big-batch norm is right only if both ranks' shards are added.
        fully_shard(self.linear, mesh=mesh, shard_placement_fn=lambda param: Shard(1))
        fully_shard(self, mesh=mesh)


class MLPRegression(LinearRegression):
    """A few layers (Linear, LayerNorm, Linear) on the same data, to compare sharded and DDP training."""

    def __init__(self, problem: LinearProblem, lr: float = 0.0) -> None:
        super().__init__(problem, lr)
        torch.manual_seed(3)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(problem.dim, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        del self.linear
        self.linear = self.net[0]  # what the Recorder reads

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return 0.5 * (self.net(x).squeeze(-1) - y).square().mean()


class ShardedMLPRegression(MLPRegression):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.0)
    parser.add_argument("--beta", type=float, default=0.9)
    parser.add_argument("--dim", type=int, default=6)
    parser.add_argument("--user-comm-hook", action="store_true")
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--strategy", choices=["ddp", "ddp_spawn", "fsdp2"], default="ddp")
    parser.add_argument(
        "--model",
        choices=["linear", "mlp", "module-comm-hook", "unused-branches", "replayed", "raw-offset", "skips-windows"],
        default="linear",
    )
    parser.add_argument("--per-layer", action="store_true")
    parser.add_argument("--fits", type=int, default=1, help="ddp_spawn: fits in a row with the same callback")
    args = parser.parse_args()

    torch.set_num_threads(1)
    problem = LinearProblem(dim=args.dim, noise_std=1.0, seed=20)
    x, y = problem.sample(args.examples, seed=21)
    gns = GradientNoiseScale(beta=args.beta, mode=args.mode, per_layer=args.per_layer)
    recorder: Any = Recorder(gns)
    callbacks: list[Any] = [UserCommHook()] if args.user_comm_hook else []
    strategy: str | Strategy = args.strategy
    models: dict[str, type[LinearRegression]] = {
        "linear": LinearRegression,
        "mlp": MLPRegression,
        "module-comm-hook": ModuleCommHook,
        "unused-branches": UnusedBranches,
        "replayed": ReplayedLayers,
        "raw-offset": WithRawOffset,
        "skips-windows": SkipsEveryThirdWindow,
    }
    model_class = models[args.model]
    data: Any = loader(x, y, args.batch_size)
    if args.strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        model_class = ShardedMLPRegression if args.model == "mlp" else ShardedLinearRegression
    if args.model == "unused-branches":
        # About a third of the examples take the branch, on rank 1 only.
        flag = (torch.arange(args.examples) % 3 == 0).to(x.dtype)
        data = DataLoader(TensorDataset(x, y, flag), batch_size=args.batch_size)
        strategy = DDPStrategy(find_unused_parameters=True)
        recorder = BatchRecorder(gns)
        callbacks.append(BranchOnRankOneOnly())
    if args.model == "replayed":
        recorder = BatchRecorder(gns)
    trainer = make_trainer(
        [*callbacks, gns, recorder, SaveResults(args.out, gns, recorder, problem)],
        devices=2,
        strategy=strategy,
        accumulate_grad_batches=args.accumulate,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model_class(problem, lr=args.lr), data)
        for _ in range(args.fits - 1):  # the same callback, nothing read in between
            trainer = make_trainer(
                [*callbacks, gns, recorder, SaveResults(args.out, gns, recorder, problem)],
                devices=2,
                strategy=strategy,
                accumulate_grad_batches=args.accumulate,
            )
            trainer.fit(model_class(problem, lr=args.lr), data)
    if args.strategy == "ddp_spawn":  # the main process, which ran no hook: what it reads after fit
        torch.save(readouts(gns), args.out / "main.pt")
    if trainer.global_rank == 0 and args.strategy != "ddp_spawn":
        messages = [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)]
        (args.out / "warnings.txt").write_text("\n".join(messages))
    end_process(launched_children(trainer))


if __name__ == "__main__":
    main()
