"""The names of the logged ``gns/`` scalars: one place for the callbacks, the TensorBoard layout and the report.

What each one means and its unit are in the README's "Logged scalars" table.
"""

from __future__ import annotations

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
