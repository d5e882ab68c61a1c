"""The callbacks as ``lightning.pytorch.Callback`` subclasses."""

from lightning.pytorch import Callback

from lightning_gns.callbacks.gradient_noise_scale import GradientNoiseScaleLogic


class GradientNoiseScale(GradientNoiseScaleLogic, Callback):
    __doc__ = GradientNoiseScaleLogic.__doc__
    _lightning_namespace = "lightning.pytorch"


__all__ = ["GradientNoiseScale"]
