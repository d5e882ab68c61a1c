"""Lightning callbacks."""

from lightning_gns.callbacks.gradient_noise_scale import GradientNoiseScale

__all__ = ["GradientNoiseScale"]
