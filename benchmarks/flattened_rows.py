"""Cost of tracing flattened rows (per_example_rows) on OPT, whose feed-forward block runs on ``(B*T, d)``.

For a tiny ``transformers`` OPT of 2, 12 and 24 decoder layers (width 64, batch 8, 32 tokens, CPU, one thread),
a few measured steps of ``GradientNoiseScaleTracker`` in ``per_example`` mode; reported: the time spent in the
graph walks that decide whether each flattened call's rows hold the examples in order (3 calls per layer), the
whole measured step, and the covered fraction (1.0: every flattened layer traced and measured). The walk runs
only on measured steps, and stops at tensors an earlier walk or layer already showed in batch order.

Example: ``nice -n 10 python benchmarks/flattened_rows.py``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import OPTConfig, OPTForCausalLM

from lightning_gns import GradientNoiseScaleTracker
from lightning_gns.sources.per_example_rows import FlattenedRows


def run(layers: int, steps: int) -> tuple[float, float, int, float]:
    """(walk ms per step, step ms, flattened calls per step, covered fraction): medians over ``steps``."""
    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=layers, ffn_dim=128, num_attention_heads=2,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, word_embed_proj_dim=64,
    )  # fmt: skip
    model = OPTForCausalLM(config)
    tracker = GradientNoiseScaleTracker()
    tracker.attach(model.parameters(), mode="per_example", model=model)
    tokens = torch.randint(0, 256, (8, 32))
    walked = {"seconds": 0.0, "calls": 0}
    original = FlattenedRows.rows_per_example

    def timed(self: FlattenedRows, inp: torch.Tensor, examples: int) -> int | None:
        started = time.perf_counter()
        try:
            return original(self, inp, examples)
        finally:
            walked["seconds"] += time.perf_counter() - started
            walked["calls"] += 1

    FlattenedRows.rows_per_example = timed  # type: ignore[method-assign]
    walks, totals, calls = [], [], []
    try:
        for _ in range(steps + 1):  # the first step warms up
            walked["seconds"], walked["calls"] = 0.0, 0
            started = time.perf_counter()
            tracker.start_micro_batch(units=len(tokens))
            loss = model(tokens, labels=tokens).loss
            tracker.before_backward(loss)
            loss.backward()
            tracker.end_micro_batch()
            tracker.measure_step()
            model.zero_grad()
            totals.append(time.perf_counter() - started)
            walks.append(walked["seconds"])
            calls.append(walked["calls"])
    finally:
        FlattenedRows.rows_per_example = original  # type: ignore[method-assign]
    return statistics.median(walks[1:]) * 1e3, statistics.median(totals[1:]) * 1e3, calls[-1], tracker.covered_fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 12, 24])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| decoder layers | flattened calls per step | walks (ms per measured step) | measured step (ms) | covered |")
    print("|---:|---:|---:|---:|---:|")
    for layers in args.layers:
        walk, step, calls, covered = run(layers, args.steps)
        print(f"| {layers} | {calls} | {walk:.2f} | {step:.1f} | {covered:.3f} |")


if __name__ == "__main__":
    main()
