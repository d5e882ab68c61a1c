"""Callbacks for ``lightning.pytorch``; for ``pytorch_lightning`` see :mod:`lightning_gns.pytorch_lightning`.

The classes load on first access: importing a submodule of this package (as the ``pytorch_lightning``
classes do) must not import the ``lightning`` namespace.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_gns.callbacks._lightning_pytorch import AdaptiveBatchSize, GradientNoiseScale

__all__ = ["AdaptiveBatchSize", "GradientNoiseScale"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lightning_gns.callbacks import _lightning_pytorch

        return getattr(_lightning_pytorch, name)
    raise AttributeError(f"module 'lightning_gns.callbacks' has no attribute {name!r}")
