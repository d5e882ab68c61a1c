"""Per-example gradient norms read straight from a PerExampleSource, for tests and benchmarks of the source alone."""

from __future__ import annotations

from torch import Tensor

from lightning_gns.sources import PerExampleSource


def pop_norms_by_layer(source: PerExampleSource) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The last backward's per-example norms over the covered parameters, shape (B,), and the per-layer split
    of their squares ({layer name: (B,)}); NaN norms when the pass was unmeasurable, None when nothing ran.

    The norms are those of each example's share of the loss, as the source sees them.
    """
    backward = source.pop_backward()
    if backward is None:
        return None, {}
    if backward.failed is not None:
        return backward.sq_norms.new_full((1,), float("nan")), {}
    keep = [i for i in range(len(source.params)) if backward.measured[i] and i not in source.excluded]
    layers: dict[str, Tensor] = {}
    for i in keep:
        name = source.param_layers[i]
        layers[name] = layers[name] + backward.sq_norms[i] if name in layers else backward.sq_norms[i]
    return backward.sq_norms[keep].sum(dim=0).sqrt(), layers


def pop_norms(source: PerExampleSource) -> Tensor | None:
    """:func:`pop_norms_by_layer` without the per-layer split."""
    return pop_norms_by_layer(source)[0]
