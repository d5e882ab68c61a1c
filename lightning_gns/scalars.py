"""The names of the logged ``gns/`` scalars: one place for the callbacks, the TensorBoard layout and the report.

What each one means and its unit are in the README's "Logged scalars" table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from lightning_gns import forecasts

if TYPE_CHECKING:
    from lightning_gns.metric import GradientNoiseScaleMetric

PREFIX = "gns/"

# GradientNoiseScale (every mode).
B_SIMPLE = "gns/b_simple"
# One standard error either side of B_simple (Fieller bounds; the high one is inf while |G|^2 is within its noise).
B_SIMPLE_LOW = "gns/b_simple_low"
B_SIMPLE_HIGH = "gns/b_simple_high"
GRAD_SQ_NORM = "gns/grad_sq_norm"
TRACE_COV = "gns/trace_cov"
B_SMALL = "gns/b_small"
B_BIG = "gns/b_big"
SKIPPED_STEPS = "gns/skipped_steps"
STEPS_OVER_MIN = "gns/steps_over_min"
EXAMPLES_OVER_MIN = "gns/examples_over_min"
STATISTICAL_EFFICIENCY = "gns/statistical_efficiency"
# GradientNoiseScale, some configurations: mode="per_example", kaplan_loss=..., per_layer=True.
COVERED_FRACTION = "gns/covered_fraction"
KAPLAN_B_CRIT_TOKENS = "gns/kaplan_b_crit_tokens"
LAYER_PREFIX = "gns/layer/"

# AdaptiveBatchSize.
EFFECTIVE_BATCH_SIZE = "gns/effective_batch_size"
ACCUMULATION = "gns/accumulation"
LR_FACTOR = "gns/lr_factor"


def layer_b_simple(layer: str) -> str:
    """The per-layer noise scale's name: ``gns/layer/<layer>/b_simple``.

    Example:
        >>> layer_b_simple("blocks.0.mlp")
        'gns/layer/blocks.0.mlp/b_simple'
    """
    return f"{LAYER_PREFIX}{layer}/b_simple"


def metric_values(
    metric: GradientNoiseScaleMetric, base_batch_size: Tensor | None = None, kaplan_loss: Tensor | None = None
) -> dict[str, Tensor]:
    """``metric``'s readouts under their logged names, as device tensors (nothing is read to the host).

    The noise scale with its interval and two averages, the last measured step's batch sizes, the skipped
    steps, the forecasts for the batch in use (:mod:`lightning_gns.forecasts`; the statistical efficiency
    with a ``base_batch_size``) and with ``kaplan_loss`` (nats per token) Kaplan et al.'s critical batch.
    """
    b_simple, b_big = metric.b_simple, metric.last_b_big
    low, high = metric.confidence_interval()
    values = {
        B_SIMPLE: b_simple,
        B_SIMPLE_LOW: low,
        B_SIMPLE_HIGH: high,
        GRAD_SQ_NORM: metric.grad_sq_norm,
        TRACE_COV: metric.trace_cov,
        B_SMALL: metric.last_b_small,
        B_BIG: b_big,
        SKIPPED_STEPS: metric.skipped_steps,
        STEPS_OVER_MIN: forecasts.steps_over_min(b_big, b_simple),
        EXAMPLES_OVER_MIN: forecasts.examples_over_min(b_big, b_simple),
    }
    if base_batch_size is not None:
        values[STATISTICAL_EFFICIENCY] = forecasts.statistical_efficiency(b_big, b_simple, base_batch_size)
    if kaplan_loss is not None:
        values[KAPLAN_B_CRIT_TOKENS] = forecasts.kaplan_critical_batch_tokens(kaplan_loss.double())
    return values
