"""Measure the gradient noise scale (McCandlish et al. 2018) in PyTorch Lightning training."""

from lightning_gns.callbacks import GradientNoiseScale
from lightning_gns.metric import GradientNoiseScaleMetric

__version__ = "0.1.0"

__all__ = ["GradientNoiseScale", "GradientNoiseScaleMetric", "__version__"]
