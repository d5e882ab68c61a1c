"""Interchangeable sources of small-batch gradient norms.

Each source watches a backward pass and reports the norm of the gradient one small batch produced:

- :class:`DDPCommHookSource`: each rank's local gradient, from DDP's buckets before the all-reduce.
- :class:`ParamHookSource`: each micro-batch's gradient, from parameter hooks before accumulation.
- :class:`PerExampleSource`: each example's gradient, from layer inputs and output gradients.

The estimator downstream does not know which source fed it.
"""

from lightning_gns.sources.base import GradNormSource
from lightning_gns.sources.ddp_comm_hook import DDPCommHookSource
from lightning_gns.sources.param_hooks import ParamHookSource
from lightning_gns.sources.per_example import PerExampleSource

__all__ = ["DDPCommHookSource", "GradNormSource", "ParamHookSource", "PerExampleSource"]
