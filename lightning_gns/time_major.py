"""A time-major batch counted by its leading dimension.

A language model in the style of PyTorch's ``word_language_model`` example takes ``(T, B)`` batches and feeds
``batch_first=False`` layers (``nn.LSTM``, ``nn.GRU``, ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``).
Counted by their leading dimension, such batches hold ``T`` "examples": every estimate then takes positions for
examples (``B_simple`` off by ``T / B``), and ``per_example`` mode splits each layer's gradient along the sequence.
The shape of the batch cannot tell; the sequence-first layers can: their input's sequence dimension is the count
and their batch dimension is the batch's second one. :class:`TimeMajorCheck` watches those layers' calls on
measured micro-batches. (A layer that attends across the examples, as BatchFormer's encoder over ``x[:, None]``,
sees ``(B, 1, d)``: a batch dimension of one is no time-major batch.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils.hooks import RemovableHandle

from lightning_gns.batch_size import batch_tensors

# Set on this module's pre-hooks: they only read shapes, so per_example's replay of a layer may ignore them.
OBSERVES_ONLY = "_lightning_gns_observes_only"
# The first input of a sequence-first layer, by keyword (nn.RNNBase, MultiheadAttention, Transformer*Layer).
_FIRST_INPUT = ("input", "query", "src", "tgt")


class TimeMajorCheck:
    """Watches a model's ``batch_first=False`` layers for inputs whose sequence dimension is the counted examples.

    Example:
        >>> import torch
        >>> check = TimeMajorCheck(torch.nn.LSTM(3, 4))  # batch_first=False: input (T, B, 3)
        >>> tokens = torch.zeros(6, 2, dtype=torch.long)  # a (T, B) batch: T = 6, B = 2
        >>> check.expect(6, tokens)  # its leading dimension, counted as its examples
        >>> _ = check.model(torch.zeros(6, 2, 3))
        >>> check.problem is not None
        True
        >>> check.detach()
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.problem: str | None = None  # why the current micro-batch's count is the sequence, if it is
        self._examples: int | None = None
        self._second_dims: set[int] = set()  # the batch's second dimensions (B, if it is time-major)
        self._handles: list[RemovableHandle] = [
            module.register_forward_pre_hook(self._hook(name, module), with_kwargs=True)
            for name, module in model.named_modules()
            if getattr(module, "batch_first", None) is False
        ]

    @property
    def watching(self) -> bool:
        """Whether the model has sequence-first layers to watch."""
        return bool(self._handles)

    def expect(self, examples: int | None, batch: Any = None) -> None:
        """Start a micro-batch ``batch`` counted as ``examples`` by its leading dimension (None: not checked)."""
        self._examples, self.problem = examples, None
        self._second_dims = {
            int(t.shape[1]) for _, t in batch_tensors(batch) if t.dim() > 1 and t.shape[0] == examples != t.shape[1]
        }

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str, module: nn.Module) -> Any:
        def check(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            examples = self._examples
            if examples is None or self.problem is not None or torch._C._current_graph_task_id() != -1:
                return  # inside the backward: a checkpoint's or per_example's replay, on other shapes
            first = args[0] if args else next((kwargs[k] for k in _FIRST_INPUT if k in kwargs), None)
            if isinstance(first, PackedSequence):  # its batch sizes per step: as many steps, as many sequences
                steps, sequences = len(first.batch_sizes), int(first.batch_sizes[0])
            elif isinstance(first, Tensor) and first.dim() >= 3:  # (T, B, ...); 2-D is one unbatched sequence
                steps, sequences = int(first.shape[0]), int(first.shape[1])
            else:
                return
            if steps == examples and sequences in self._second_dims and sequences > 1:
                self.problem = (
                    f"the batch looks time-major: its leading dimension ({examples}), counted as its examples, is"
                    f" the sequence dimension of layer {name or type(module).__name__!r} ({type(module).__name__},"
                    f" batch_first=False), whose batch dimension holds {sequences}; counting positions as"
                    " examples would make B_simple silently wrong"
                )

        setattr(check, OBSERVES_ONLY, True)
        return check
