"""Small batches from parameter gradient hooks: each micro-batch's gradient before it is accumulated."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial

import torch
from torch import Tensor, nn

from lightning_gns.sources.base import BackwardNorms, GradNormSource, fp32_norm


class ParamHookSource(GradNormSource):
    """Norm of each backward pass's gradient, read from ``param.register_hook``.

    A tensor hook on a leaf parameter receives the gradient that one backward pass produces for it
    (summed over every use of the parameter, so tied weights count once) before autograd adds it to
    ``.grad`` and before DDP all-reduces it. The hook computes a norm and keeps nothing else, so no
    gradient is copied or kept alive. Works on one device and, per rank, under DDP.

    A parameter whose hook fires twice between two :meth:`pop_backward` makes the micro-batch unmeasurable:
    the norm of a sum is not the sum of norms. :meth:`pop_backward` then returns a record that ``failed``
    with the parameter's name and the fix. It fires twice for reentrant activation checkpointing
    (``use_reentrant=True``) with the parameter used in two checkpointed segments, or in one and outside it
    (each segment's recomputation is a backward pass of its own), for ``autograd.grad`` with respect to the
    parameters inside ``training_step``, and for two backward passes per micro-batch. A parameter used twice
    in one backward pass (tied weights, non-reentrant checkpointing) gets one gradient.

    Args of :meth:`attach`: ``names`` maps a parameter's ``id`` to the name messages give it.
    """

    name = "param_hooks"

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[int] = set()
        self._names: list[str] = []
        self._hooked: list[tuple[int, nn.Parameter]] = []
        self.failed: str | None = None

    def attach(self, params: Iterable[nn.Parameter], names: Mapping[int, str] | None = None) -> None:
        self.detach()
        params = list(params)
        names = names or {}
        self._names = [names.get(id(p), f"<parameter {i}, shape {tuple(p.shape)}>") for i, p in enumerate(params)]
        self._hooked = [(i, p) for i, p in enumerate(params) if p.requires_grad]
        self._handles = [p.register_hook(partial(self._on_grad, i)) for i, p in self._hooked]

    def begin_record(self) -> None:
        self._hooks_last()

    def before_backward(self, loss: Tensor) -> None:
        self._hooks_last()  # a hook registered in training_step, or in a LightningModule hook after the callbacks'

    def _hooks_last(self) -> None:
        # Tensor hooks run in the order they were registered: a hook of the user's registered after ours (a gradient
        # mask, a rescaling) would change the gradient after we read it, while .grad, the big batch, has the change.
        # Ours is moved behind it (a dict lookup per parameter, on measured micro-batches).
        for position, (i, p) in enumerate(self._hooked):
            if getattr(p, "_post_accumulate_grad_hooks", None) and self.failed is None:
                self.failed = (
                    f"parameter {self._names[i]!r} has a post-accumulate gradient hook"
                    " (register_post_accumulate_grad_hook), which may edit .grad, the big batch, after the"
                    " micro-batch gradients were read: the step is skipped. Move what the hook does to the gradient"
                    " into a Tensor.register_hook hook (read after it), or remove the callback"
                )
            handle = self._handles[position]
            hooks = p._backward_hooks
            if hooks and next(reversed(hooks)) != handle.id:
                handle.remove()
                self._handles[position] = p.register_hook(partial(self._on_grad, i))

    def _on_grad(self, index: int, grad: Tensor) -> None:
        if not self.recording:
            return
        if index in self._seen and self.failed is None:
            self.failed = (
                f"parameter {self._names[index]!r} received two gradients in one micro-batch, from separate backward"
                " passes: the norm of their sum cannot be formed from their norms, so the step is skipped."
                " Reentrant activation checkpointing does this to a parameter used in two checkpointed segments,"
                " or in one and outside it: pass use_reentrant=False to torch.utils.checkpoint.checkpoint (Hugging"
                " Face: gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))."
                " torch.autograd.grad with respect to the parameters, or a second backward pass, inside"
                " training_step does it too and cannot be measured from parameter hooks"
            )
        self._seen.add(index)
        self.record(fp32_norm(grad))

    def pop_backward(self) -> BackwardNorms | None:
        failed, self.failed = self.failed, None
        self._seen.clear()
        backward = super().pop_backward()
        if failed is not None and backward is not None:
            return BackwardNorms(torch.zeros(0), (), failed=failed)
        return backward

    def detach(self) -> None:
        self._seen.clear()
        self.failed = None
        self._hooked = []
        super().detach()
