"""Measure the gradient noise scale (McCandlish et al. 2018) in PyTorch Lightning training.

``GradientNoiseScale`` and ``AdaptiveBatchSize`` (the ``lightning.pytorch`` callbacks) are imported on first
access, so that ``lightning_gns.pytorch_lightning`` users never import the ``lightning`` namespace.
"""

from typing import TYPE_CHECKING, Any

from lightning_gns.metric import GradientNoiseScaleMetric
from lightning_gns.tracker import GradientNoiseScaleTracker

if TYPE_CHECKING:
    from lightning_gns.callbacks import AdaptiveBatchSize, GradientNoiseScale

__version__ = "0.1.0"

_LIGHTNING_CALLBACKS = {"AdaptiveBatchSize", "GradientNoiseScale"}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_CALLBACKS:
        from lightning_gns import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_gns' has no attribute {name!r}")


__all__ = [
    "AdaptiveBatchSize",
    "GradientNoiseScale",
    "GradientNoiseScaleMetric",
    "GradientNoiseScaleTracker",
    "__version__",
]
