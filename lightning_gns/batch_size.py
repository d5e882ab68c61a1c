"""How many examples (or tokens) a batch holds."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

BatchSizeFn = Callable[[Any], "int | Tensor"]


def leading_dim_batch_size(batch: Any) -> int:
    """The leading dimension that every tensor in ``batch`` shares: its number of examples.

    Handles a tensor, and (nested) lists, tuples, dicts and dataclass-like objects of tensors. Tensors that
    disagree (two dataloaders' batches combined) are refused with a ``ValueError`` naming ``batch_size_fn``.

    Example:
        >>> import torch
        >>> leading_dim_batch_size({"x": torch.zeros(32, 5), "y": torch.zeros(32)})
        32
    """
    sizes = dict(_leading_dims(batch, "batch"))
    samples = _sample_list_length(batch)
    if samples is not None and set(sizes.values()) != {samples}:
        # Each sample's own tensors lead with a feature or sequence dimension: counting them would give every
        # estimate a wrong unit, silently (a list of 16 pairs (x of shape (8,), y) would count 8 examples).
        raise _uncollated_error(batch, samples, set(sizes.values()))
    if not sizes:
        raise ValueError(
            f"GradientNoiseScale could not find the batch size: no tensor with a leading dimension in a batch of"
            f" type {type(batch).__name__}. Pass batch_size_fn=..., a function that returns the number of"
            " examples (or tokens) in a batch, e.g. GradientNoiseScale(batch_size_fn=lambda batch: len(batch['ids']))."
        )
    if len(set(sizes.values())) > 1:
        # Several dataloaders combined into one batch (CombinedLoader), or tensors that are not example-first:
        # no count of examples is right for all of them, and a wrong one biases every estimate.
        shown = ", ".join(f"{path}: {size}" for path, size in list(sizes.items())[:6])
        raise ValueError(
            f"GradientNoiseScale cannot count the examples of this batch: its tensors disagree on the leading"
            f" dimension ({shown}{', ...' if len(sizes) > 6 else ''}), as when several train dataloaders are combined"
            " into one batch, or time-major (T, B) tensors sit beside (B, ...) ones (then count B, e.g. lambda"
            " batch: batch[0].shape[1]). Pass batch_size_fn returning the micro-batch's total (e.g. lambda batch:"
            " sum(len(x) for x, y in batch.values()), when the loss is the mean over all of them), or a 1-D integer"
            " tensor with one count per example in the order the model sees them (e.g. torch.ones(total, dtype=int))."
            " mode='per_example' needs the model to run once on all the examples (their concatenation)."
        )
    return next(iter(sizes.values()))


def _sample_list_length(batch: Any) -> int | None:
    """The length of a list or tuple of 4 or more containers of one structure (the samples of a batch left
    uncollated: tuples of the same length, or mappings with the same keys), else None. Fewer items, or items that
    are tensors, are taken as the batch's fields."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 4:
        return None
    first = _structure(batch[0])
    if first is None or any(_structure(item) != first for item in batch[1:]):
        return None
    return len(batch)


def refuse_uncollated_samples(
    batch: Any, loader_batch_size: int, counted: int | Tensor, sample: Callable[[], Any]
) -> str | None:
    """Refuse a batch that is a list or tuple of ``loader_batch_size`` samples left uncollated, where the default
    count took the samples' own leading dimension.

    :func:`leading_dim_batch_size` alone cannot tell 2-3 samples, or single-tensor samples of one shape (a list of
    ``(T,)`` sequences, as ``collate_fn=list`` gives), from a batch's fields; the dataloader's batch size and one
    sample of its dataset (``sample()``, read only where the batch's length is the batch size) can: every item is
    then laid out as that sample is (a collate that packs documents into rows of another shape gives fields that
    are not). Where no sample can be read (an iterable dataset) and the items are laid out alike, returns the
    doubt to say instead.
    """
    if not isinstance(batch, (list, tuple)) or len(batch) != loader_batch_size or not isinstance(counted, int):
        return None
    if counted == loader_batch_size:
        return None
    first = _layout(batch[0])
    if first is None or any(_layout(item) != first for item in batch[1:]):
        return None
    example = sample()
    if example is None:
        return (
            f"GradientNoiseScale counts {counted} examples in a batch that is a {type(batch).__name__} of"
            f" {len(batch)} items laid out alike, as many as the dataloader's batch_size: if they are the samples"
            " left uncollated (collate_fn=list), pass batch_size_fn=len, or every estimate is in the wrong unit"
        )
    if _layout(example) == first:
        raise _uncollated_error(batch, len(batch), {counted})
    return None


def _layout(item: Any, depth: int = 0) -> tuple[Any, ...] | None:
    """A tensor's shape, or a tuple's, list's or mapping's layout of them; None for anything else."""
    if isinstance(item, Tensor):
        return ("tensor", tuple(item.shape))
    if depth > 2:
        return None
    if isinstance(item, Mapping):
        values = tuple(_layout(value, depth + 1) for value in item.values())
        return None if all(v is None for v in values) else ("mapping", tuple(item.keys()), values)
    if isinstance(item, (list, tuple)):
        values = tuple(_layout(value, depth + 1) for value in item)
        return None if all(v is None for v in values) else ("sequence", values)
    return None


def _uncollated_error(batch: Any, samples: int, leading: set[int]) -> ValueError:
    return ValueError(
        f"GradientNoiseScale cannot count the examples of this batch: it is a {type(batch).__name__} of"
        f" {samples} items of one structure, as a collate_fn that returns the samples as they are"
        f" (collate_fn=list) makes, and their tensors lead with {sorted(leading)[:4]}, not"
        f" {samples}. If each item is one example, pass batch_size_fn=len (or count the tokens the loss averages"
        " over); otherwise pass batch_size_fn returning the number of examples."
    )


def _structure(item: Any) -> tuple[Any, ...] | None:
    if isinstance(item, Mapping):
        return ("mapping", tuple(item.keys()))
    if isinstance(item, (list, tuple)):
        return ("sequence", len(item), tuple(isinstance(value, Tensor) for value in item))
    return None


def _leading_dims(obj: Any, path: str) -> Iterator[tuple[str, int]]:
    """(path, leading dimension) of every tensor in ``obj`` with at least one dimension, depth first; a
    ``PackedSequence`` counts its sequences (its data leads with their total length)."""
    for tensor_path, tensor in batch_tensors(obj, path, packed_as_one=True):
        if isinstance(tensor, PackedSequence):
            yield tensor_path, int(tensor.batch_sizes[0])  # batch_sizes lives on the CPU: no device sync
        elif tensor.dim() > 0:
            yield tensor_path, int(tensor.shape[0])


def batch_tensors(
    obj: Any, path: str = "batch", packed_as_one: bool = False, _seen: dict[int, Any] | None = None
) -> Iterator[tuple[str, Any]]:
    """(path, tensor) of every tensor in ``obj`` (nested lists, tuples, dicts, objects' attributes), depth first.

    Each container is visited once (a batch object may refer back to itself, or to a shared one), and modules
    are not entered (a batch that holds the model, or a tokenizer, holds no examples there). With
    ``packed_as_one`` a ``PackedSequence`` is yielded whole instead of its tensors.
    """
    if isinstance(obj, Tensor) or (packed_as_one and isinstance(obj, PackedSequence)):
        yield path, obj
        return
    if isinstance(obj, (str, bytes, type, torch.nn.Module)):
        return
    seen = {} if _seen is None else _seen
    if id(obj) in seen:
        return
    if isinstance(obj, Mapping):
        children: Any = ((f"{path}[{key!r}]", value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        children = ((f"{path}[{i}]", value) for i, value in enumerate(obj))
    elif hasattr(obj, "__dict__"):
        children = ((f"{path}.{name}", value) for name, value in vars(obj).items())
    else:
        return
    seen[id(obj)] = obj  # held, so that its id is not reused by an object made later in the walk
    for child_path, child in children:
        yield from batch_tensors(child, child_path, packed_as_one, seen)


def checked_batch_size(batch_size_fn: BatchSizeFn, batch: Any) -> int | Tensor:
    """Call ``batch_size_fn`` and insist on a positive integer, or an integer tensor of counts.

    A 1-D integer tensor holds one count per example (e.g. ``attention_mask.sum(dim=1)``); a 0-d integer
    tensor is the micro-batch's count. Tensors are returned as they are (reading them would synchronise
    with the device on every step).
    """
    value: Any = batch_size_fn(batch)
    if isinstance(value, Tensor):
        if value.dim() > 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"batch_size_fn returned a tensor of shape {tuple(value.shape)} and dtype {value.dtype}; return an"
                " int, a 0-d integer tensor (the micro-batch's examples or tokens), or a 1-D integer tensor with one"
                " count per example, e.g. attention_mask.sum(dim=1)."
            )
        if value.dim() == 1 and value.numel() == 0:
            raise ValueError(
                "batch_size_fn returned an empty tensor of counts: filter empty batches out of the dataloader."
            )
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, float):
            if not value.is_integer():
                raise TypeError
            size = int(value)
        else:
            size = operator.index(value)
    except TypeError:
        raise ValueError(
            f"batch_size_fn must return a positive int (examples or tokens in the batch) or an integer tensor of"
            f" counts, got {value!r} of type {type(value).__name__}. Return e.g. int(mask.sum()) for a token count,"
            " or mask.sum(dim=1) for one count per example."
        ) from None
    if size < 0:
        raise ValueError(f"batch_size_fn must return a positive int (examples or tokens in the batch), got {size}.")
    # 0: an empty micro-batch (a collate that filtered every sample out); training_step usually returns None for
    # it. Its window is then measured without it or skipped and counted, as for a 0-d tensor count.
    return size
