"""The callbacks for the ``pytorch_lightning`` namespace; importing this module never imports ``lightning``.

Example::

    import pytorch_lightning as pl
    from lightning_gns.pytorch_lightning import GradientNoiseScale

    trainer = pl.Trainer(accumulate_grad_batches=4, callbacks=[GradientNoiseScale()])

The adaptive batch works the same way: ``from lightning_gns.pytorch_lightning import AdaptiveBatchSize``.
"""

from pytorch_lightning import Callback

from lightning_gns.callbacks.adaptive_batch_size import AdaptiveBatchSizeBase
from lightning_gns.callbacks.gradient_noise_scale import GradientNoiseScaleBase


# The hooks are annotated with lightning.pytorch types; at run time both namespaces pass theirs.
class GradientNoiseScale(GradientNoiseScaleBase, Callback):  # type: ignore[misc]
    __doc__ = GradientNoiseScaleBase.__doc__
    _lightning_namespace = "pytorch_lightning"


class AdaptiveBatchSize(AdaptiveBatchSizeBase, Callback):  # type: ignore[misc]
    __doc__ = AdaptiveBatchSizeBase.__doc__
    _lightning_namespace = "pytorch_lightning"


__all__ = ["AdaptiveBatchSize", "GradientNoiseScale"]
