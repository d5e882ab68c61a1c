"""The callbacks as ``lightning.pytorch.Callback`` subclasses."""

from lightning.pytorch import Callback

from lightning_gns.callbacks.adaptive_batch_size import AdaptiveBatchSizeLogic
from lightning_gns.callbacks.gradient_noise_scale import GradientNoiseScaleLogic


class GradientNoiseScale(GradientNoiseScaleLogic, Callback):
    __doc__ = GradientNoiseScaleLogic.__doc__
    _lightning_namespace = "lightning.pytorch"


class AdaptiveBatchSize(AdaptiveBatchSizeLogic, Callback):
    __doc__ = AdaptiveBatchSizeLogic.__doc__
    _lightning_namespace = "lightning.pytorch"


__all__ = ["AdaptiveBatchSize", "GradientNoiseScale"]
