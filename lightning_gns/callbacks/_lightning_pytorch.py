"""The callbacks as ``lightning.pytorch.Callback`` subclasses."""

from lightning.pytorch import Callback

from lightning_gns.callbacks.adaptive_batch_size import AdaptiveBatchSizeBase
from lightning_gns.callbacks.gradient_noise_scale import GradientNoiseScaleBase


class GradientNoiseScale(GradientNoiseScaleBase, Callback):
    __doc__ = GradientNoiseScaleBase.__doc__
    _lightning_namespace = "lightning.pytorch"


class AdaptiveBatchSize(AdaptiveBatchSizeBase, Callback):
    __doc__ = AdaptiveBatchSizeBase.__doc__
    _lightning_namespace = "lightning.pytorch"


__all__ = ["AdaptiveBatchSize", "GradientNoiseScale"]
