"""Small batches of one example: per-example gradient norms from layer inputs and output gradients."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterable
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_gns.sources import per_example_generic as generic
from lightning_gns.sources.base import BackwardNorms, GradNormSource, reduction_dtype, upcast_half
from lightning_gns.sources.param_hooks import ParamHookSource
from lightning_gns.sources.per_example_coupling import MOVED_INPUT
from lightning_gns.sources.per_example_factors import (
    Dense,
    Factor,
    Materialized,
    OneHot,
    factor_inner,
    factor_sq_norm,
)
from lightning_gns.sources.per_example_fused import (
    FusableForward,
    can_fuse,
    fused_pays,
    hf_conv1d_class,
    runs_class_forward,
)
from lightning_gns.sources.per_example_positions import broadcast_outputs
from lightning_gns.sources.per_example_rnn import replays as replays_rnn
from lightning_gns.sources.per_example_rnn import rnn_factors
from lightning_gns.sources.per_example_rows import FlattenedRows, rows_reached, rows_selected_from
from lightning_gns.sources.per_example_tables import ExampleFreeInputs
from lightning_gns.sources.per_example_uses import UseCheck, graph_signature

Layers = Literal["all", "norm"]
NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, *NORM_LAYERS)
OUTSIDE_USE = (
    "used outside the layers that own it ({node} in the forward or the loss: a weight tied by a functional call such"
    " as h @ embedding.weight.T, a penalty on the weights): that part of its gradient has no per-example split."
    " Share the weight through a module (an nn.Linear whose weight is the embedding's), or accumulate gradients"
    " over 2 or more micro-batches (mode='microbatch' norms whole gradients)"
)
EVERYTHING_LEFT_OUT = "every parameter the per-example source watches is left out (the coverage message says why)"
COUPLED = (
    "its gradient or its input depends on several examples through an operation that pairs the examples of the"
    " batch ({node}: an in-batch similarity, distance or correlation, as contrastive losses with in-batch negatives"
    " compute, a statistic over the batch broadcast back over it, or slices of two examples combined, as a"
    " recurrence over h[t] of a time-major batch does), so per-example gradients are no independent"
    " samples. Accumulate gradients over 2 or more micro-batches (mode='microbatch' takes the micro-batches as the"
    " small batches) or train on several processes (mode='ddp')"
)
MOVED = (
    "its input holds the examples in another dimension than the first (a transpose such as"
    " hidden_states.transpose(0, 1) moved them there, as transformers' Longformer and LED do before their"
    " attention's projections): its first dimension, as long as the batch here, is the sequence, and a split along it"
    " is no per-example split. Use a batch size other than the sequence length, or accumulate gradients over 2 or"
    " more micro-batches (mode='microbatch' norms whole gradients)"
)
# Calls of a layer on float inputs without a graph judged before its verdict stands (an expert of a mixture idle in
# the first steps gets its tokens later).
GRAPHLESS_JUDGEMENTS = 8
ROWS_FROM_MOVED = (
    "its input is flattened rows traced to the output of layer {source!r}, which takes the examples in another"
    " dimension than the first (at T == B its (T, B, ...) output looks batch-first): the rows are grouped by position,"
    " not by example. Use a batch size other than the sequence length, or accumulate gradients over 2 or more"
    " micro-batches (mode='microbatch' norms whole gradients)"
)
REORDERED_TIED = (
    "used by layer calls that see the examples of the batch in different orders (the model reorders them: {node},"
    " e.g. h[order] of a sort by length): the cross terms between the calls would pair different examples. Keep"
    " the examples in their order through the model, or accumulate gradients over 2 or more micro-batches"
    " (mode='microbatch' norms whole gradients)"
)
REORDERED_COUNTS = (
    "the model puts the examples of the batch in another order ({node}, e.g. h[order] of a sort by length), and"
    " batch_size_fn gives one count per example: some layers see the examples in another order than the batch's,"
    " so their per-example norms cannot be matched to the counts, and every measured step is skipped. Keep"
    " the examples in their order through the model, have batch_size_fn return the micro-batch's total (each"
    " example then weighs alike), or accumulate gradients over 2 or more micro-batches (mode='microbatch')"
)
POSITIONS = (
    "layer {name!r} ({kind}) gave an output of shape {shape}, which looks like a batch of {examples} examples, but"
    " the model broadcasts it over the batch ({node}): its first dimension holds positions shared by all"
    " examples, as many as the examples (a positional table such as wpe(arange(1, T + 1)), or T5's relative"
    " attention bias of a (T, T) bucket matrix, when the sequence is as long as the batch), so its gradient has no"
    " per-example split. Accumulate gradients over 2 or more micro-batches (mode='microbatch' norms whole"
    " gradients)"
)
TABLE = (
    "layer {name!r} ({kind}) was called on a tensor that holds no examples, computed from the model's parameters,"
    " buffers or consecutive position indices alone (a positional table as long as the batch, such as"
    " pos_proj(wpe(arange(T))) or a layer on a learned (T, d) table at T == B): its output of shape {shape} has as"
    " many rows as the micro-batch has examples, but they are positions shared by every example, so its gradient"
    " has no per-example split. Accumulate gradients over 2 or more micro-batches (mode='microbatch' norms whole"
    " gradients)"
)
SELECTED = (
    "layer {name!r} ({kind}) was called on rows picked from a tensor of shape {source} (tokens routed to an expert of"
    " a mixture of experts, a selection by a token mask): its output of shape {shape} has as many rows as the"
    " micro-batch has examples only by chance, and its rows are not the examples, so its gradient has no"
    " per-example split. Accumulate gradients over 2 or more micro-batches (mode='microbatch' norms whole"
    " gradients); to pick one token per example, index as h[torch.arange(B), positions], which keeps the examples"
)
NO_EXAMPLE_ROWS = (
    "layer {name!r} ({kind}) was called on rows that come from {source} (a layer called on h[i] in a loop over the"
    " examples, whose rows are that example's positions; the second layer of an expert given picked tokens): its"
    " output of shape {shape} has as many rows as the micro-batch has examples, but they are not the examples, so"
    " its gradient has no per-example split. Use a batch size other than the sequence length, or accumulate"
    " gradients over 2 or more micro-batches (mode='microbatch' norms whole gradients)"
)
UNJUDGED = (
    "GradientNoiseScale: the per-example source cannot tell whether the outputs of shape (B, B, ...) of layers"
    " {layers} hold the batch or positions shared by it (as T5's relative attention bias when the sequence is as"
    " long as the batch has examples): the graph does not show what the model does with them (a torch.compile'd"
    " region, or a graph that could not be read). If one holds positions, its norms are wrong. Use a batch size"
    " other than the sequence length, run the model uncompiled, or accumulate gradients over 2 or more"
    " micro-batches (mode='microbatch')"
)
COMPILED_UNCHECKED = (
    "GradientNoiseScale: the loss's autograd graph has torch.compile'd regions ({node}), and the per_example checks"
    " for parameters used outside their layers and for operations that pair the examples (a statistic over the"
    " batch, mixup, h - h.mean(0)) cannot see inside them. The layers are measured; if compiled code between"
    " them does either, B_simple is wrong without a word. Run a few steps uncompiled once to have the checks read"
    " the model, or accumulate gradients over 2 or more micro-batches (mode='microbatch', which needs no check)"
)
# The graph checks (parameters used outside their layers, losses that pair examples) run on every loss graph of a
# structure not checked before, up to this many structures; a model whose graph keeps changing (layer drop,
# experts picked per batch) is checked on every RECHECK_EVERY-th measured micro-batch after that.
MAX_CHECKED_GRAPHS = 32
# A graph whose reorderings kept the batch's order is judged again on this many more micro-batches at most: a sort
# by length is the identity on a batch already in order (1 in B! batches), a filter that keeps every example always.
MAX_REJUDGED = 8
RECHECK_EVERY = 50
# The first replays of each replayed layer are compared with its forward's outputs (one host sync each).
REPLAY_CHECKS = 2
GRAPHS_KEEP_CHANGING = (
    "GradientNoiseScale: the autograd graph of the loss has taken {count} different structures (layer drop, experts"
    " picked per batch, a changing loss): the per_example checks for parameters used outside their layers and for"
    " losses that pair examples now run on every {every}th measured micro-batch only. A use that appears in"
    " between is found at the next check, which leaves the parameter out and restarts the averages"
)
# Layers whose batch dimension is never in doubt: convolutions take (N, C, ...), recurrent and attention layers
# read their own batch_first.
AMBIGUITY_FREE: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.RNNBase, nn.MultiheadAttention)
# Layers that act on each row of their input alone (the last dimensions): called on tokens flattened to (B*T, d)
# whose rows hold the examples in order, they are measured with the rows regrouped per example.
ROW_WISE: tuple[type[nn.Module], ...] = (nn.Linear, *NORM_LAYERS)
# Layers whose output for one example depends on the other examples of the batch.
BATCH_COUPLED_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)


def runs_own_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a supported layer that runs its layer class's own ``forward``.

    A subclass with a ``forward`` of its own computes something else from its inputs (OPT's positional
    embedding is called on the attention mask and embeds positions it derives from it): the dedicated
    equations would be silently wrong there, so such a module is replayed as written (generic path).
    """
    return runs_class_forward(module, SUPPORTED_LAYERS)


def unsupported_embedding_options(module: nn.Embedding | nn.EmbeddingBag) -> list[str]:
    """An embedding's options per-example norms do not support: scale_grad_by_freq divides each row's gradient by
    its count in the whole batch (no per-example gradient sums to it), sparse gradients are not replayed, and an
    EmbeddingBag's max_norm would renormalise rows in place again when replayed. (An nn.Embedding's max_norm
    renormalises the rows it looks up, without gradient, before the lookup: the lookup's per-example gradients
    stay exact.)"""
    options = {
        "sparse=True": module.sparse,
        "scale_grad_by_freq=True": module.scale_grad_by_freq,
        "max_norm": isinstance(module, nn.EmbeddingBag) and module.max_norm is not None,
    }
    return [name for name, present in options.items() if present]


def is_supported(module: nn.Module, layers: Layers = "all") -> bool:
    """Whether the per-example source has a dedicated path for this module's parameters."""
    if not runs_own_forward(module):
        return False
    if layers == "norm":
        return isinstance(module, NORM_LAYERS)
    if isinstance(module, nn.Embedding):
        return not unsupported_embedding_options(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.groups == 1 and module.padding_mode == "zeros" and _conv_padding(module) is not None
    return True


def layer_factors(module: nn.Module, inp: Tensor, grad_out: Tensor) -> dict[str, Factor]:
    """Factored per-example gradients of ``module``'s parameters, keyed by parameter name."""
    batch = grad_out.shape[0]
    if isinstance(module, nn.Linear):
        delta = grad_out.reshape(batch, -1, grad_out.shape[-1])
        factors: dict[str, Factor] = {"weight": Dense(delta, inp.reshape(batch, -1, inp.shape[-1]))}
        if module.bias is not None:
            factors["bias"] = Materialized(delta.sum(dim=1))
        return factors
    if isinstance(module, nn.Embedding):
        index = inp.reshape(batch, -1)
        delta = grad_out.reshape(batch, index.shape[1], -1)
        if module.padding_idx is not None:  # the padding row receives no gradient
            delta = delta * (index != module.padding_idx).unsqueeze(-1)
        return {"weight": OneHot(index, delta, module.num_embeddings)}
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return _norm_factors(module, inp, grad_out)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _conv_factors(module, inp, grad_out)
    if hf_conv1d_class(module) is not None:  # weight (in, out): the per-example gradient sum_t x_t delta_t^T
        delta = grad_out.reshape(batch, -1, grad_out.shape[-1])
        factors = {"weight": Dense(inp.reshape(batch, -1, inp.shape[-1]), delta)}
        if getattr(module, "bias", None) is not None:
            factors["bias"] = Materialized(delta.sum(dim=1))
        return factors
    raise TypeError(f"unsupported layer {type(module).__name__}")


def _norm_factors(module: nn.LayerNorm | nn.RMSNorm, inp: Tensor, grad_out: Tensor) -> dict[str, Factor]:
    dims = tuple(range(-len(module.normalized_shape), 0))
    x = upcast_half(inp)
    # The normalised input, recomputed by the same fused kernels the layer uses (torch.var_mean is several
    # times slower than the whole layer_norm kernel on CPU).
    if isinstance(module, nn.LayerNorm):
        normalized = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    else:
        eps = module.eps if module.eps is not None else torch.finfo(inp.dtype).eps
        normalized = F.rms_norm(x, module.normalized_shape, eps=eps)
    batch = grad_out.shape[0]
    width = normalized.shape[-len(dims) :].numel()
    delta = upcast_half(grad_out).reshape(batch, -1, width)
    factors: dict[str, Factor] = {}
    if module.weight is not None:
        factors["weight"] = Materialized((delta * normalized.reshape(batch, -1, width)).sum(dim=1))
    if getattr(module, "bias", None) is not None:
        factors["bias"] = Materialized(delta.sum(dim=1))
    return factors


def _conv_padding(module: nn.Conv1d | nn.Conv2d) -> tuple[int, ...] | None:
    if isinstance(module.padding, tuple):
        return module.padding
    if module.padding == "valid":
        return (0,) * len(module.kernel_size)
    # "same": symmetric only when every dimension's total padding is even.
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    return tuple(p // 2 for p in total) if all(p % 2 == 0 for p in total) else None


def _conv_factors(module: nn.Conv1d | nn.Conv2d, inp: Tensor, grad_out: Tensor) -> dict[str, Factor]:
    padding = _conv_padding(module)
    assert padding is not None
    batch = grad_out.shape[0]
    kernel: tuple[int, ...] = module.kernel_size
    dilation: tuple[int, ...] = module.dilation
    stride: tuple[int, ...] = module.stride
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution of height 1
        inp, grad_out = inp.unsqueeze(-2), grad_out.unsqueeze(-2)
        kernel, dilation, padding, stride = (1, kernel[0]), (1, dilation[0]), (0, padding[0]), (1, stride[0])
    patches = F.unfold(inp, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, C*k, L)
    delta = grad_out.reshape(batch, grad_out.shape[1], -1)  # (B, out, L)
    factors: dict[str, Factor] = {"weight": Dense(delta.transpose(1, 2), patches.transpose(1, 2))}
    if module.bias is not None:
        factors["bias"] = Materialized(delta.sum(dim=2))
    return factors


def _generic_attach_problem(
    module: nn.Module, label: str, whole: bool, params: list[Tensor], is_model: bool
) -> str | None:
    """Why the parameters of ``module`` (not a dedicated layer) cannot be measured at all, or None.

    The model itself is never replayed (its parameters are used by its forward or the training step).
    """
    kind = type(module).__name__
    if not whole and (is_model or any(True for _ in module.children())):
        return (
            f"raw parameter of {label!r} ({kind}) used in its forward: no per-example path (only layers without"
            " children, nn.MultiheadAttention, recurrent and parametrized layers are replayed per example)"
        )
    if isinstance(module, BATCH_COUPLED_LAYERS):
        return f"layer {label!r} ({kind}) couples the examples of a batch"
    embedding = isinstance(module, (nn.Embedding, nn.EmbeddingBag))
    options = unsupported_embedding_options(module) if embedding else []  # type: ignore[arg-type]
    if options:
        return (
            f"layer {label!r} ({kind} with {', '.join(options)}): scale_grad_by_freq divides by counts over the"
            " whole batch, so no per-example gradient sums to its gradient; sparse gradients and an EmbeddingBag's"
            " max_norm (rows renormalised in place) are not replayed"
        )
    return generic.attach_problem(module, params)


def _rnn_factors(replay: generic.Replay, grads: list[Tensor | None]) -> dict[str, Factor]:
    module = replay.module
    assert isinstance(module, nn.RNNBase)
    args, kwargs = generic.replay_inputs(replay)
    every: list[Tensor | None] = [None] * (3 if isinstance(module, nn.LSTM) else 2)  # output, h_n[, c_n]
    for position, value in zip(replay.outputs, grads, strict=True):
        every[position] = value
    x = args[0] if args else kwargs["input"]
    return rnn_factors(module, x, args[1] if len(args) > 1 else kwargs["hx"], every)


def _when_all_grads(tensors: list[Tensor], fn: Any) -> None:
    """Call ``fn(grads)`` once the gradients of all ``tensors`` this backward will compute have arrived.

    As ``register_multi_grad_hook(mode="all")``, with the outputs that will get a gradient found per backward
    pass (graph task): inside a reentrant checkpoint's backward the torch hook waits for unused outputs forever.
    """
    nodes = [t.grad_fn for t in tensors]
    pending: dict[int, tuple[set[int], list[Tensor | None]]] = {}

    def on_grad(i: int, grad: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task not in pending:
            coming = {j for j, node in enumerate(nodes) if node is None or torch._C._will_engine_execute_node(node)}
            pending[task] = (coming, [None] * len(nodes))
        coming, grads = pending[task]
        grads[i] = grad
        coming.discard(i)
        if not coming:
            del pending[task]
            fn(grads)

    for i, t in enumerate(tensors):
        t.register_hook(partial(on_grad, i))


# Why a parameter used in two reentrant checkpoint segments is left out (one line for all of them).
LATE_USE = (
    "used again after its gradient in this backward was complete: a reentrant activation checkpoint"
    " (torch.utils.checkpoint with use_reentrant=True) runs each segment's backward on its own, so the per-example"
    " cross terms between the segments cannot be formed; checkpoint with use_reentrant=False to measure it exactly"
)

GRADIENT_HOOK = (
    "a gradient hook on the parameter ({hook}, Tensor.register_hook or register_post_accumulate_grad_hook) may"
    " change its gradient, and the per-example gradients formed from its layer's inputs never pass through it while"
    " .grad, the big batch, does. Accumulate gradients over 2 or more micro-batches (mode='microbatch' reads each"
    " micro-batch's gradient after Tensor.register_hook hooks)"
)
PRE_HOOK = (
    "layer {name!r} ({kind}) has a forward pre-hook ({hook}: torch.nn.utils.prune or ModelPruning, a hook of yours)"
    " that may change the weights or inputs it computes with, so its parameters' per-example gradients cannot be"
    " formed from its inputs and output gradient"
)
# Why a parameter used in a forward after a backward pass of the same micro-batch completed its gradient.
LATE_FORWARD = (
    "used in a forward after a backward pass of the same micro-batch had completed its gradient (torch.autograd.grad"
    " or backward inside training_step, as adversarial training such as FGSM or PGD does): the per-example norms"
    " would mix the two passes. Accumulate gradients over 2 or more micro-batches (mode='microbatch' reads only the"
    " gradients the optimizer steps on)"
)


def batch_coupled_layers(model: nn.Module) -> list[str]:
    """Names of the layers that couple the examples of a batch (BatchNorm and SyncBatchNorm in any form).

    A batch-normalised layer's output for one example depends on every example of the batch, so the
    per-example gradients are not independent samples and their spread is not the gradient noise.
    """
    return [name or type(m).__name__ for name, m in model.named_modules() if isinstance(m, BATCH_COUPLED_LAYERS)]


_TWICE = (
    "a layer's output gradient arrived twice in one backward pass (a double backward, or autograd.grad"
    " through the model before backward): per-example norms would mix both passes"
)


def _reads_only(hook: Any) -> bool:
    """Whether a parameter's gradient hook is a ParamHookSource's, which reads the gradient and changes nothing."""
    func = getattr(hook, "func", None)
    return isinstance(getattr(func, "__self__", None), ParamHookSource)


class _FusedUse:
    """One fused call of a watched Linear or LayerNorm: where its backward delivers the per-example gradients."""

    __slots__ = ("examples", "fired", "grouped", "module", "params", "source")

    def __init__(
        self, source: PerExampleSource, module: nn.Module, params: list[tuple[str, int]], examples: int | None
    ) -> None:
        self.source, self.module, self.params, self.fired = source, module, params, False
        # Set for an input of flattened rows (B*k, ...): the call regroups it to (examples, k, ...), and
        # ``grouped`` says whether the rows hold the examples in order (if not, the layer is left out).
        self.examples = examples
        self.grouped = False

    def deliver(self, weight: Tensor, bias: Tensor | None) -> None:
        self.source._on_fused_grad(self, weight, bias)


class PerExampleSource(GradNormSource):
    """Per-example gradient norms of the supported layers' parameters (``B_small = 1``).

    A forward hook on every supported layer (``nn.Linear`` on 2-D or sequence inputs, ``nn.Embedding``,
    ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.Conv1d``/``nn.Conv2d``) keeps a reference to the layer input and
    hooks the layer output; when the output's gradient arrives in backward, the per-example squared norms
    of the layer's parameter gradients are computed from input and output gradient, without forming
    ``.grad``-sized per-example tensors where the Gram form is cheaper. Parameters used more than once
    (tied embeddings, a module called twice) get exact cross terms. Gradients of the per-example *share*
    of the batch loss are reported; the caller rescales them to per-example losses.

    ``nn.Linear`` layers on sequences and ``nn.LayerNorm`` layers (not subclasses with their own ``forward``)
    take a fused path while recording, for a Linear where it costs less
    (:func:`~lightning_gns.sources.per_example_fused.fused_pays`): their ``forward`` is replaced (until
    :meth:`detach`) by one whose backward forms each example's parameter gradients once, sums them into the
    parameter gradients and takes their norms, instead of autograd's gradient plus the per-example form
    again (``fused=False`` turns it off). Autocast is applied to a Linear as for ``F.linear`` (a LayerNorm
    under autocast, a Linear on 2-D inputs and anything under ``torch.compile`` are measured by the hooks as
    before). Activation checkpointing (reentrant or not) is exact: a non-reentrant checkpoint's recomputation
    in backward is recognised and not counted as another use of the layer.

    Every other layer with trainable parameters (a leaf module, ``nn.MultiheadAttention``, a recurrent layer,
    a parametrized layer) takes the generic path (:mod:`~lightning_gns.sources.per_example_generic`,
    :mod:`~lightning_gns.sources.per_example_rnn`): its captured inputs are replayed per example. Raw
    parameters of a module with children (and of the model itself) are excluded at attach, with the reason.

    The watched parameters (:attr:`params`, fixed at :meth:`attach`) are those of measured layers. A use
    that cannot be split per example excludes the parameter for the rest of the run (:attr:`excluded`, with
    the reason): a layer whose input's leading dimension is not the micro-batch's example count
    (:attr:`expected_examples`), such as a positional embedding called on ``arange(T)`` and broadcast over
    the batch, or a Linear applied to tokens flattened to ``(B*T, d)`` whose rows the autograd graph does not
    show in batch order (:mod:`~lightning_gns.sources.per_example_rows`; where it does, as in OPT, the rows
    are regrouped per example and measured). Layers whose gradient or input an operation pairing the examples makes
    depend on several of them (the in-batch negatives of a contrastive loss, a statistic over the batch broadcast
    back over it) are found in the graph of each measured micro-batch whose structure was not checked before, and
    excluded; one measured in earlier steps restarts the tracker's averages. An output gradient that arrives
    twice (a double backward, ``autograd.grad`` through the layers before ``backward``) makes the whole backward
    unmeasurable (:attr:`BackwardNorms.failed`). A parameter whose layer never runs as a module (its
    weight used by a functional call) receives no per-example norm; the caller detects it from its gradient.
    """

    name = "per_example"
    nothing_recorded = "no supported layer ran in this micro-batch"

    def __init__(self, layers: Layers = "all", fused: bool = True) -> None:
        super().__init__()
        self.layers = layers
        self.fused = fused
        self.params: list[nn.Parameter] = []
        self.param_layers: list[str] = []  # name of the first layer owning each watched parameter
        self.excluded: dict[int, str] = {}  # index into params -> why it cannot be measured per example
        self._left_out_layers: tuple[int, set[str]] = (0, set())  # (len(excluded) it was built for, names)
        self.expected_examples: int | None = None
        self._index: dict[int, int] = {}  # parameter id -> index into params
        # Module id -> its measured (name, parameter index) pairs, as registered at attach. Looked up by
        # module rather than read from the module in forward: FSDP2 (fully_shard) swaps the registered sharded
        # parameters for unsharded tensors during forward, and the sharded ones are what .grad lives on.
        self._module_params: dict[int, list[tuple[str, int]]] = {}
        self._module_names: dict[int, str] = {}
        # Layers whose leading dimension was found to hold no examples: positions shared by every example (an output
        # broadcast over the batch, per_example_positions; an input computed from the model's state alone,
        # per_example_tables), or tokens picked from a tensor whose rows are not the examples
        self._broadcast_modules: set[int] = set()
        # Outputs (grad_fns) of this micro-batch's calls judged to have rows that are no examples, with the layer's
        # name: a layer fed by one (through elementwise ops) has no examples in its rows either.
        self._rowless_outputs: dict[Any, str] = {}
        self._sequence_first_layer: str | None = None  # a layer with batch_first=False, if the model has one
        # An operation found to put the examples in another order (the graph checks): per-example counts cannot be
        # matched to the norms then (the tracker skips such steps).
        self.examples_reordered: str | None = None
        # Layers judged for inputs that hold no examples (per_example_tables), and the proofs of one micro-batch.
        self._judged_tables: set[int] = set()
        self._tables_judged_now: set[int] = set()
        # Layer id -> calls judged so far on float inputs without a graph (judged again, up to a limit).
        self._graphless_judgements: dict[int, int] = {}
        self._tables = ExampleFreeInputs()
        self._model: nn.Module | None = None  # the attached model: its parameters and buffers are no examples
        self._rows = FlattenedRows()  # per micro-batch: which tensors hold the examples' rows in order
        # Per micro-batch: layer id -> the layers whose outputs its flattened rows were traced to (FlattenedRows).
        self._regrouped_from: dict[int, frozenset[int]] = {}
        # Outputs of shape (B, B, ...) this micro-batch (grad_fn -> layer), read in before_backward
        # (per_example_positions); each layer is judged once.
        self._square_outputs: dict[Any, tuple[nn.Module, tuple[int, ...]]] = {}
        self._judged_square: set[int] = set()
        # The same for layers run inside the backward (a reentrant checkpoint's recomputation), judged by the graph
        # of every layer output recomputed there, when the first gradient of the micro-batch's recomputation arrives.
        self._recomputed_square: dict[Any, tuple[nn.Module, tuple[int, ...]]] = {}
        self._recomputed_outputs: list[Any] = []
        # Per backward pass: per-example squared norms by parameter index, pending uses and their factors.
        self._sq_norms: dict[int, Tensor] = {}
        self._pending_uses: dict[int, int] = defaultdict(int)
        self._stored_factors: dict[int, list[Factor]] = defaultdict(list)
        # Parameters whose every counted use has arrived (their factors are gone): a use counted after that
        # (a reentrant checkpoint's recomputation in a later segment) could no longer form its cross terms.
        self._finished: set[int] = set()
        self._failed: str | None = None
        # Fused Linear and LayerNorm (per_example_fused): the layers whose forward was replaced, and the output of the
        # fused call that just ran (its forward hook must not hook it a second time).
        self._fused_modules: list[nn.Module] = []
        self.fused_output: Tensor | None = None
        self.fused_use: _FusedUse | None = None
        self._excluded_at_start: frozenset[int] = frozenset()
        # Calls counted per module before backward, and calls seen during backward: a non-reentrant activation
        # checkpoint replays a counted forward there, which must not count again.
        self._forward_calls: dict[int, int] = defaultdict(int)
        self._replays_checked: dict[int, int] = defaultdict(int)  # module id -> replays compared with the forward
        self._outputs_used_inside: dict[tuple[int, int], list[int]] = {}  # (layer, outputs) -> aliased positions
        self._replayed_calls: dict[int, int] = defaultdict(int)
        # The checks for parameters used outside their layers and losses that pair examples (per_example_uses), run
        # on each loss graph of a structure (graph_signature) not checked before.
        self._checks_uses = False
        self._checked_graphs: set[int] = set()
        self._rejudged: dict[int, int] = defaultdict(int)  # signature -> times judged again (MAX_REJUDGED)
        self._records = 0  # measured micro-batches recorded so far
        self._use_check: UseCheck | None = None

    def attach(self, model: nn.Module, params: Iterable[nn.Parameter]) -> None:
        self.detach()
        self._model = model
        wanted = {id(p) for p in params}
        # nn.DataParallel's replicas copy a module's attributes, a replaced forward included, which would run
        # the original layer's weights on every replica: no fused path there.
        fused = self.fused and not any(isinstance(m, nn.DataParallel) for m in model.modules())
        self.params, self.param_layers, self._index, self.excluded = [], [], {}, {}
        self._left_out_layers = (0, set())
        self._sequence_first_layer = next(
            (name or type(m).__name__ for name, m in model.named_modules() if getattr(m, "batch_first", None) is False),
            None,
        )
        # nn.DataParallel's replicas hold copies of the parameters: their uses are no layer call's.
        self._checks_uses = not any(isinstance(m, nn.DataParallel) for m in model.modules())
        self._checked_graphs, self._records = set(), 0
        self._rejudged.clear()
        whole: list[str] = []  # modules the generic path replays with all their children
        for module_name, module in model.named_modules():
            if any(module_name.startswith(f"{w}.") or not w for w in whole):
                continue
            label = module_name or type(module).__name__
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) in wanted]
            replays_whole = self.layers == "all" and generic.replays_whole(module)
            if is_supported(module, self.layers) and not replays_whole:
                if own:
                    self._watch_dedicated(module, label, own, fused)
                continue
            if self.layers != "all":
                continue
            if replays_whole:
                whole.append(module_name)
                own = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) in wanted]
            else:
                # A parameter registered on a child too (transformers' MLM heads: lm_head.bias is
                # lm_head.decoder.bias) is the child's; a use by the parent's own forward as well is found in the
                # graph (a parameter used outside its layer).
                in_children = {id(p) for child in module.children() for p in child.parameters()}
                own = [(n, p) for n, p in own if id(p) not in in_children]
            if not own:
                continue
            indices = self._watch(module, label, own)
            problem = _generic_attach_problem(module, label, replays_whole, [p for _, p in own], module is model)
            if problem is not None:
                for _, i in indices:
                    self.exclude(i, problem)
                continue
            # First among the forward hooks: a user's hook that returns a changed output must not hand it to us.
            self._handles.append(module.register_forward_hook(self._on_generic_forward, with_kwargs=True, prepend=True))

    def _watch(self, module: nn.Module, label: str, named: list[tuple[str, nn.Parameter]]) -> list[tuple[str, int]]:
        indices = []
        for param_name, p in named:
            if id(p) not in self._index:
                self._index[id(p)] = len(self.params)
                self.params.append(p)
                self.param_layers.append(label)
            indices.append((param_name, self._index[id(p)]))
        self._module_params[id(module)] = indices
        self._module_names[id(module)] = label
        return indices

    def begin_record(self) -> None:
        self._clear_graph_records()
        # Layers left out before this micro-batch run plain (nothing fused). Fixed for the micro-batch, so that a
        # checkpoint's recomputation decides as the forward did.
        self._excluded_at_start = frozenset(self.excluded)
        self._records += 1
        self._exclude_hooked_params()
        # Every micro-batch records its layer calls (a few microseconds each) until the graphs' structures are
        # many; its loss, in before_backward, says whether its structure needs checking.
        if self._checks_uses and (len(self._checked_graphs) < MAX_CHECKED_GRAPHS or self._records % RECHECK_EVERY == 0):
            self._use_check = UseCheck(self._index, self.expected_examples)

    def _exclude_hooked_params(self) -> None:
        for i, p in enumerate(self.params):
            if i in self.excluded:
                continue
            post = getattr(p, "_post_accumulate_grad_hooks", None) or {}
            hooks = [*(p._backward_hooks or {}).values(), *post.values()]
            # Another tracker's microbatch hooks (a second GradientNoiseScale) only read the gradient.
            hook = next((h for h in hooks if not _reads_only(h)), None)
            if hook is not None:
                self.exclude(i, GRADIENT_HOOK.format(hook=getattr(hook, "__name__", type(hook).__name__)))

    def before_backward(self, loss: Tensor) -> None:
        self._exclude_hooked_params()  # a hook registered in training_step
        square, self._square_outputs = self._square_outputs, {}
        unjudged: list[nn.Module] = []
        if square and loss.grad_fn is not None:
            unjudged = self._judge_square([loss.grad_fn], square)
        check, self._use_check = self._use_check, None
        signature = None
        if check is not None and loss.grad_fn is not None and len(self._checked_graphs) < MAX_CHECKED_GRAPHS:
            signature = graph_signature(loss.grad_fn, self._index)
            if signature in self._checked_graphs:
                check = None  # this structure was checked: nothing new can be found in it
            else:
                self._checked_graphs.add(signature)
                if len(self._checked_graphs) == MAX_CHECKED_GRAPHS:
                    self.notes.append(GRAPHS_KEEP_CHANGING.format(count=MAX_CHECKED_GRAPHS, every=RECHECK_EVERY))
        if check is not None:
            for index, node in check.outside_uses(loss).items():
                self.exclude(index, OUTSIDE_USE.format(node=node))
            if check.compiled_region is not None:
                self.notes.append(COMPILED_UNCHECKED.format(node=check.compiled_region))
            # After the positions are judged: an output left out for holding positions, or not judged, is not
            # taken to hold examples (its broadcast over the batch would look like a statistic of the batch).
            doubtful = {node for node, (module, _) in square.items() if module in unjudged}
            moved: set[int] = set()
            for index, node in check.coupled(loss, set(self.excluded), doubtful).items():
                self.exclude(index, MOVED if node == MOVED_INPUT else COUPLED.format(node=node))
                if node == MOVED_INPUT:
                    moved.update(m for m, params in self._module_params.items() if any(i == index for _, i in params))
            self._leave_out_rows_from(moved)
            if check.reordered is not None:
                self.examples_reordered = check.reordered
            for index in check.misaligned_params:
                self.exclude(index, REORDERED_TIED.format(node=check.reordered or "a reordering"))
            if check.reorder_uncertain and signature is not None and self._rejudged[signature] < MAX_REJUDGED:
                # A sort of an already sorted batch, or a filter that kept every example: judge the next one too.
                self._rejudged[signature] += 1
                self._checked_graphs.discard(signature)

    def _leave_out_rows_from(self, moved: set[int]) -> None:
        """Layers found to take the examples in another dimension than the first: their outputs hold no examples'
        rows, so a flatten traced to one (at ``T == B`` a ``(T, B, d)`` output looks batch-first) was split by
        position. Those layers' outputs anchor no flatten from now on, and the layers regrouped from them in this
        micro-batch are left out."""
        if not moved:
            return
        self._broadcast_modules.update(moved)
        for module_id, owners in self._regrouped_from.items():
            source = next((m for m in owners if m in moved), None)
            if source is None:
                continue
            reason = ROWS_FROM_MOVED.format(source=self._module_names.get(source, "?"))
            for _, i in self._module_params.get(module_id, []):
                self.exclude(i, reason)

    def _judge_square(self, roots: list[Any], square: dict[Any, tuple[nn.Module, tuple[int, ...]]]) -> list[nn.Module]:
        """Leave out the layers whose ``(B, B, ...)`` outputs the graph below ``roots`` broadcasts over the batch;
        the layers that could not be judged."""
        self._judged_square.update(id(m) for m, _ in square.values())
        shapes = {m: shape for m, shape in square.values()}
        try:
            found, unjudged = broadcast_outputs(roots, square)
        except Exception as error:  # this may run inside the backward: a graph it cannot read must not stop it
            found, unjudged = {}, [m for m, _ in square.values()]
            self.notes.append(f"GradientNoiseScale: reading the autograd graph failed ({type(error).__name__})")
        if unjudged:
            names = sorted({self._module_names[id(m)] for m in unjudged})
            self.notes.append(UNJUDGED.format(layers=", ".join(repr(n) for n in names)))
        for module, node_name in found.items():
            self._broadcast_modules.add(id(module))  # positions shared by every example
            shape, name, kind = shapes[module], self._module_names[id(module)], type(module).__name__
            reason = POSITIONS.format(name=name, kind=kind, shape=shape, examples=shape[0], node=node_name)
            for _, i in self._module_params.get(id(module), []):
                self.exclude(i, reason)
        return unjudged

    def _judge_recomputed(self) -> None:
        """Judge the ``(B, B, ...)`` outputs of layers first run in a reentrant checkpoint's recomputation (inside
        the backward, after before_backward) by the graph of the layers recomputed with them, before the first
        of their gradients is used."""
        square, self._recomputed_square = self._recomputed_square, {}
        self._judge_square(self._recomputed_outputs, square)

    def end_record(self) -> None:
        self._use_check = None  # no loss came (the tracker used without before_backward): no check
        self._clear_graph_records()

    def _clear_graph_records(self) -> None:
        """Forget the graph nodes kept for one micro-batch (after its backward, they only hold memory)."""
        self._rows.clear()
        self._regrouped_from = {}
        self._tables.clear()
        self._judged_tables |= self._tables_judged_now
        self._tables_judged_now = set()
        self._square_outputs = {}
        self._recomputed_square = {}
        self._recomputed_outputs = []
        self._rowless_outputs = {}

    def _note_square(self, module: nn.Module, output: Tensor) -> None:
        """Keep an output of a layer not judged yet whose first dimension may be positions as many as the examples,
        for before_backward (per_example_positions): one of shape ``(B, B, ...)``, or an embedding's ``(B, d)``
        of a 1-D index (``wpe(arange(1, T + 1))`` at ``T == B`` is no batch of class labels)."""
        expected = self.expected_examples
        if expected is None or output.dim() < 2 or output.shape[0] != expected:
            return
        if expected not in output.shape[1:] and not (isinstance(module, nn.Embedding) and output.dim() == 2):
            return
        if id(module) not in self._judged_square and output.grad_fn is not None:
            inside_backward = torch._C._current_graph_task_id() != -1
            square = self._recomputed_square if inside_backward else self._square_outputs
            square[output.grad_fn] = (module, tuple(output.shape))

    def _note_recomputed(self, module: nn.Module, output: Any) -> None:
        """Keep the grad_fn of a hooked layer's output made inside the backward by a reentrant checkpoint's
        recomputation (a layer not counted in this micro-batch's forward; a non-reentrant replay repeats one that
        was, whose outputs before_backward judged)."""
        if torch._C._current_graph_task_id() != -1 and not self._forward_calls.get(id(module)):
            self._recomputed_outputs.extend(
                t.grad_fn for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.grad_fn is not None
            )

    def _note_batch_first(self, module: nn.Module, output: Any) -> None:
        """Note the outputs whose leading dimension is the batch (FlattenedRows), unless the layer was found to
        take positions shared by the examples."""
        expected = self.expected_examples
        if expected is None or id(module) in self._broadcast_modules:
            return
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, Tensor) and tensor.dim() > 0 and tensor.shape[0] == expected:
                self._rows.note_output(tensor, id(module), self._regrouped_from.get(id(module), frozenset()))

    def _record_call(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._use_check is not None and torch._C._current_graph_task_id() == -1:
            indices = [i for _, i in self._module_params.get(id(module), [])]
            self._use_check.record_call(output, inputs, indices, reads_layout=hasattr(module, "batch_first"))

    def _watch_dedicated(self, module: nn.Module, label: str, own: list[tuple[str, nn.Parameter]], fused: bool) -> None:
        indices = self._watch(module, label, own)
        # As for the generic path; with the keywords, for a call that passes the input as one (lin(input=x)).
        self._handles.append(module.register_forward_hook(self._on_forward, prepend=True, with_kwargs=True))
        measures_weight = any(n == "weight" for n, _ in indices)
        if fused and can_fuse(module) and (measures_weight or isinstance(module, nn.LayerNorm)):
            module.forward = FusableForward(module, self)
            self._fused_modules.append(module)

    def covered_params(self) -> list[nn.Parameter]:
        """Watched parameters not excluded so far."""
        return [p for i, p in enumerate(self.params) if i not in self.excluded]

    def left_out_layers(self) -> set[str]:
        """Names of the layers all of whose watched parameters are excluded (host-side record)."""
        if self._left_out_layers[0] != len(self.excluded):
            kept = {self.param_layers[i] for i in range(len(self.params)) if i not in self.excluded}
            self._left_out_layers = (len(self.excluded), set(self.param_layers) - kept)
        return self._left_out_layers[1]

    def exclude(self, index: int, reason: str) -> None:
        """Leave a watched parameter out from now on (both batch sizes' norms), for ``reason``."""
        self.excluded.setdefault(index, reason)

    def _on_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not args and len(kwargs) == 1:  # these layers take one input
            args = tuple(kwargs.values())
        self._record_call(module, args, output)
        if self.recording:
            self._note_recomputed(module, output)
        if output is self.fused_output and output is not None:  # counted, and measured in its own backward
            use, self.fused_output, self.fused_use = self.fused_use, None, None
            if use is not None and use.examples is not None and not use.grouped:
                for _, i in use.params:
                    self.exclude(i, self._leading_dim_problem(module, args[0], use.examples))
            elif (
                use is not None
                and use.examples is None
                and id(module) not in self._judged_tables
                and (table := self._leading_rows_problem(module, [args[0]], output))
            ):
                for _, i in use.params:
                    self.exclude(i, table)
            elif isinstance(output, Tensor):
                # batch-first, or rows that hold the examples in order
                self._rows.note_output(output, id(module), self._regrouped_from.get(id(module), frozenset()))
                if use is not None and use.examples is None:
                    self._note_square(module, output)
            return
        if not (self.recording and isinstance(output, Tensor) and output.requires_grad and args):
            return
        inp = args[0]
        expected = self.expected_examples
        params = self._module_params.get(id(module), [])
        if not params or all(i in self.excluded for _, i in params):
            self._note_batch_first(module, output)  # left out, yet its output may anchor a flatten further on
            return
        hooks = generic.unknown_pre_hooks(module)
        if hooks:  # the weights or inputs it computes with are not its parameters or its inputs (pruning's masks)
            reason = PRE_HOOK.format(
                name=self._module_names[id(module)], kind=type(module).__name__, hook=type(hooks[0]).__name__
            )
            for _, i in params:
                self.exclude(i, reason)
            return
        problem = self._batch_dim_problem(module, inp, output)
        rows = None
        if problem is not None and expected is not None:
            rows = self._rows_per_example(module, inp)
        if problem is not None and rows is None:
            for _, i in params:
                self.exclude(i, problem)
            return
        if rows is not None:
            self._regrouped_from[id(module)] = self._rows.last_owners
        # batch-first, or rows that hold the examples in order
        self._rows.note_output(output, id(module), self._regrouped_from.get(id(module), frozenset()))
        if rows is None:
            self._note_square(module, output)
        if not self._new_use(module, params):
            return
        fired = [False]
        inp = inp.detach()
        split = None if rows is None or expected is None else (expected, rows)
        if split is not None:
            inp = inp.reshape(*split, *inp.shape[1:])
        output.register_hook(partial(self._on_output_grad, module, inp, params, fired, split))

    def _may_regroup(self, module: nn.Module, inp: Tensor) -> bool:
        """Whether ``inp`` has the shape of flattened tokens ``(B*k, ...)`` for a row-wise layer (shapes only)."""
        expected = self.expected_examples
        if expected is None or self._sequence_first_layer is not None:
            return False  # in a model with sequence-first layers, a flatten's order is in doubt
        if not (isinstance(module, ROW_WISE) or hf_conv1d_class(module) is not None):
            return False
        rows = inp.shape[0] if inp.dim() > 1 else 0
        return rows > expected and rows % expected == 0

    def _rows_per_example(self, module: nn.Module, inp: Tensor) -> int | None:
        """Rows per example of a row-wise layer's input of flattened tokens ``(B*k, ...)`` whose rows hold the
        examples in order (found through the graph: per_example_rows), else None (the layer is left out)."""
        if not self._may_regroup(module, inp) or self.expected_examples is None:
            return None
        return self._rows.rows_per_example(inp, self.expected_examples)

    def _on_generic_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        self._record_call(module, (args, kwargs), output)
        if not self.recording:
            return
        self._note_recomputed(module, output)
        self._note_batch_first(module, output)
        params = self._module_params.get(id(module), [])
        if not params or all(i in self.excluded for _, i in params):
            return
        name = self._module_names[id(module)]
        if self._sequence_first_layer is not None:
            first = next((t for t in tree_flatten(output)[0] if isinstance(t, Tensor)), None)
            ambiguous = None if first is None else self._sequence_first_problem(module, name, first)
            if ambiguous is not None:
                for _, i in params:
                    self.exclude(i, ambiguous)
                return
        captured = generic.capture(
            module, name, args, kwargs, output, [n for n, _ in params], self.expected_examples, self._holds_no_examples
        )
        if isinstance(captured, str):
            for _, i in params:
                self.exclude(i, captured)
            return
        if captured is None:
            return
        if id(module) not in self._judged_tables:
            first = next((t for t in tree_flatten(output)[0] if isinstance(t, Tensor)), None)
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
            table = None if first is None else self._leading_rows_problem(module, inputs, first)
            if table is not None:
                for _, i in params:
                    self.exclude(i, table)
                return
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, Tensor):
                self._note_square(module, tensor)
        if not self._new_use(module, params):
            return
        replay, outputs = captured
        if self._replays_checked[id(module)] < REPLAY_CHECKS and not replays_rnn(module):
            self._replays_checked[id(module)] += 1
            # A copy: the model may change the output in place after the call (y = layer(x); y += x, as transformers'
            # Falcon does with parallel attention), and the replay reproduces the call, not what came after it.
            replay.expected = [t.detach().clone() for t in outputs]
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        # Which outputs the layer itself uses is its structure: walked on its first call, not on every step.
        key = (id(module), len(outputs))
        used = self._outputs_used_inside.get(key)
        if used is None:
            used = self._outputs_used_inside[key] = generic.outputs_used_inside(outputs, inputs)
        aliases = {id(outputs[j]): outputs[j].view_as(outputs[j]) for j in used}
        fired = [False]
        hook = partial(self._on_generic_grad, replay, params, fired)
        _when_all_grads([aliases.get(id(t), t) for t in outputs], hook)
        if aliases:  # the model goes on with the aliases: their gradients are its later uses' alone
            leaves, spec = tree_flatten(output)
            return tree_unflatten([aliases.get(id(t), t) for t in leaves], spec)
        return None

    def _on_generic_grad(
        self, replay: generic.Replay, params: list[tuple[str, int]], fired: list[bool], grads: Any
    ) -> None:
        if not self.recording:
            return
        if fired[0]:
            self._failed = _TWICE
            return
        fired[0] = True
        if self._recomputed_square:
            self._judge_recomputed()
        module = replay.module
        try:
            if replays_rnn(module):
                factors = _rnn_factors(replay, list(grads))
            else:
                per_example = generic.per_example_grads(replay, list(grads))
                # Laid out like the parameter (scalars as (B, 1)), so cross terms with other uses line up.
                factors = {n: Materialized(g if g.dim() > 1 else g.unsqueeze(1)) for n, g in per_example.items()}
        except (torch.OutOfMemoryError, torch.AcceleratorError):
            raise
        except (RuntimeError, NotImplementedError) as error:  # torch.func's refusals: vmap, random ops, shapes
            reason = generic.replay_failure(self._module_names[id(module)], module, error)
            for _, i in params:
                self.exclude(i, reason)
            return
        for param_name, index in params:
            if param_name in factors and index not in self.excluded:
                self._add(index, factors[param_name])

    def _new_use(self, module: nn.Module, params: list[tuple[str, int]]) -> bool:
        """Count a use of ``module``'s parameters; False for a checkpoint's replay of a counted call.

        A forward that runs inside backward is an activation checkpoint's recomputation: non-reentrant
        checkpointing replays calls already counted (their hooks from the first forward fire), reentrant
        checkpointing runs the first forward without gradients and counts nothing then.
        """
        key = id(module)
        if torch._C._current_graph_task_id() == -1:
            self._forward_calls[key] += 1
        else:
            self._replayed_calls[key] += 1
            if self._replayed_calls[key] <= self._forward_calls[key]:
                return False
        late = LATE_USE if torch._C._current_graph_task_id() != -1 else LATE_FORWARD
        for _, i in params:
            if i in self._finished:
                self.exclude(i, late)
            self._pending_uses[i] += 1
        return True

    def plan_fused(self, module: nn.Module, inp: Tensor) -> _FusedUse | None:
        """The fused call's receiver when this call of a watched Linear or LayerNorm should run fused, else None.

        Fused: gradients enabled, not under ``torch.compile``, a batch whose leading dimension is the expected
        example count, and for a Linear a batch of sequences (B, ..., d_in) of the shape for which
        :func:`fused_pays`; for a LayerNorm, autocast off (its casting rules differ by device). The decision
        depends on nothing a checkpoint's recomputation could see differently.
        """
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or generic.unknown_pre_hooks(module):
            return None
        if torch._C._functorch.peek_interpreter_stack() is not None:  # inside torch.func (vmap, grad): plain
            return None
        batch = inp.shape[0] if inp.dim() > 0 else 0
        if batch == 0:
            return None
        examples = None  # set when the input is flattened rows (B*k, ...), regrouped per example
        if self.expected_examples is not None and batch != self.expected_examples:
            # Decided on shapes alone, so that a checkpoint's recomputation runs the same operations; whether the
            # rows hold the examples in order is found below, and if not the layer is left out.
            if not self._may_regroup(module, inp):
                return None  # the forward hook excludes the layer
            batch = examples = self.expected_examples
        if self._sequence_first_layer is not None and inp.dim() >= 3 and inp.shape[1] == batch:
            return None  # maybe (T, B, ...): the forward hook decides
        if isinstance(module, nn.Linear) or hf_conv1d_class(module) is not None:
            d_in = inp.shape[-1]
            weight: Tensor = module.weight  # type: ignore[assignment]
            d_out = weight.shape[0] if isinstance(module, nn.Linear) else weight.shape[1]
            sequences = inp.dim() >= 3 or examples is not None
            if not sequences or not fused_pays(batch, inp.numel() // (batch * d_in), d_out, d_in):
                return None
        elif inp.dim() <= len(module.normalized_shape) or torch.is_autocast_enabled(inp.device.type):  # type: ignore[arg-type]
            return None
        params = self._module_params.get(id(module))
        if not params:  # a copy of a watched layer (deepcopy of the model) is not watched
            return None
        if all(i in self._excluded_at_start for _, i in params):
            return None  # left out: its per-example gradients would be thrown away
        use = _FusedUse(self, module, params, examples)
        self._new_use(module, params)  # a replayed call still runs fused: the checkpoint expects its tensors
        if examples is not None:
            use.grouped = self._rows.rows_per_example(inp, examples) is not None
            if use.grouped:
                self._regrouped_from[id(module)] = self._rows.last_owners
        self.fused_use = use
        return use

    def _on_fused_grad(self, use: _FusedUse, weight: Tensor, bias: Tensor | None) -> None:
        if not self.recording:
            return
        if use.fired:
            self._failed = _TWICE
            return
        use.fired = True
        if self._recomputed_square:
            self._judge_recomputed()
        try:
            for param_name, index in use.params:
                value = weight if param_name == "weight" else bias
                if value is not None and index not in self.excluded:
                    sq = torch.linalg.vector_norm(value.flatten(1), dim=1, dtype=reduction_dtype(value.dtype))
                    self._add(index, Materialized(value), sq.square())
        except (NotImplementedError, RuntimeError) as error:
            # Only our own refusal and a plain RuntimeError (shapes or dtypes that do not split per example) mean
            # "this step cannot be measured"; its subclasses (out of memory, a device failure) reach the user.
            if type(error) is not RuntimeError and not isinstance(error, NotImplementedError):
                raise
            self._failed = f"per-example norms of layer {self._module_names[id(use.module)]!r} failed: {error}"

    def _sequence_first_problem(self, module: nn.Module, name: str, output: Tensor) -> str | None:
        """Why a ``(B, B, ...)`` output of a sequence layer in a model with sequence-first layers is ambiguous.

        Such a layer's batch dimension is read off its shape. With ``batch_first=False`` layers in the model
        and as many positions as examples, the first dimension may be the sequence: split along it, the
        norms would be silently wrong. Convolutions take ``(N, C, ...)`` and recurrent and attention layers
        read their own ``batch_first``, so they are never ambiguous.
        """
        expected, seq_first = self.expected_examples, self._sequence_first_layer
        if seq_first is None or expected is None or isinstance(module, AMBIGUITY_FREE):
            return None
        if output.dim() < 3 or output.shape[0] != expected or output.shape[1] != expected:
            return None
        return (
            f"layer {name!r} ({type(module).__name__}) gave an output of shape {tuple(output.shape)} in a model with"
            f" sequence-first layers ({seq_first!r} has batch_first=False): with as many positions as examples its"
            " first dimension may be the sequence, which the shape cannot tell. Build the model with"
            " batch_first=True, or accumulate gradients over 2 or more micro-batches (mode='microbatch' norms"
            " whole gradients)"
        )

    def _batch_dim_problem(self, module: nn.Module, inp: Tensor, output: Tensor) -> str | None:
        """Why this call's leading dimension is not the batch of examples, or None if it is."""
        expected = self.expected_examples
        if expected is None:
            return None
        name = self._module_names[id(module)]
        ambiguous = self._sequence_first_problem(module, name, output)
        if ambiguous is not None:
            return ambiguous
        leading = output.shape[0] if output.dim() > 0 else None
        if leading != expected:
            return self._leading_dim_problem(module, inp, expected)
        return None if id(module) in self._judged_tables else self._leading_rows_problem(module, [inp], output)

    def _model_state(self) -> Iterable[Tensor]:
        model = self._model
        return () if model is None else itertools.chain(model.parameters(), model.buffers())

    def _holds_no_examples(self, tensor: Tensor) -> bool:
        return self._tables.hold_none([tensor], self._model_state())

    def _leading_rows_problem(self, module: nn.Module, inputs: list[Tensor], output: Tensor) -> str | None:
        """Why a call whose output leads with as many rows as the batch has examples is no batch: its inputs hold
        none, computed from the model's parameters, buffers or consecutive positions alone (per_example_tables), or
        its rows were picked from a tensor whose rows are not the examples (per_example_rows.rows_selected_from).
        Judged at every such call outside the backward (a reentrant checkpoint's recomputation sees detached
        inputs) in the first micro-batch that has one: a layer may be called on the examples and on a table."""
        expected = self.expected_examples
        if expected is None or id(module) in self._judged_tables or output.dim() == 0 or output.shape[0] != expected:
            return None
        if torch._C._current_graph_task_id() != -1:
            return None
        # Every call of this micro-batch is judged (a layer may take both). A call whose float inputs have no graph
        # (an expert given no token this step, a frozen trunk's features) shows no pick, so later calls judge the
        # layer again, up to a few: past those a frozen trunk's head costs nothing more per step. Integer ids,
        # whose check reads them, are judged once.
        graphless = all(t.grad_fn is None and t.is_floating_point() for t in inputs)
        if graphless and id(module) not in self._tables_judged_now:
            self._graphless_judgements[id(module)] = self._graphless_judgements.get(id(module), 0) + 1
        if not graphless or self._graphless_judgements.get(id(module), 0) >= GRAPHLESS_JUDGEMENTS:
            self._tables_judged_now.add(id(module))
        name, kind, shape = self._module_names[id(module)], type(module).__name__, tuple(output.shape)
        if self._tables.hold_none(inputs, self._model_state()):
            reason = TABLE.format(name=name, kind=kind, shape=shape, examples=expected)
        elif source := next((s for t in inputs if (s := rows_selected_from(t, expected)) is not None), None):
            reason = SELECTED.format(name=name, kind=kind, shape=shape, examples=expected, source=source)
        elif reached := next((r for t in inputs if (r := rows_reached(t, expected, self._rowless_outputs))), None):
            reason = NO_EXAMPLE_ROWS.format(name=name, kind=kind, shape=shape, source=reached)
        else:
            return None
        self._broadcast_modules.add(id(module))  # its outputs anchor no flatten: their rows are no examples
        if output.grad_fn is not None:
            self._rowless_outputs[output.grad_fn] = f"the output of layer {name!r}"
        return reason

    def _leading_dim_problem(self, module: nn.Module, inp: Tensor, expected: int) -> str:
        name = self._module_names[id(module)]
        return (
            f"layer {name!r} ({type(module).__name__}) was called on a tensor of shape {tuple(inp.shape)}, whose"
            f" leading dimension is not the micro-batch's {expected} examples (a positional embedding of"
            " arange(T) broadcast over the batch, a sequence-first layout, or tokens flattened to (B*T, d) whose"
            " rows could not be traced back, through reshapes and elementwise operations, to a tensor with the batch"
            " first; a flatten of data that needs no gradient cannot be traced). If the micro-batch does not hold"
            f" {expected} examples ({expected} counts tokens), return one count per example from batch_size_fn"
            " (e.g. mask.sum(dim=1)), or pass examples=len(batch) to GradientNoiseScaleTracker.start_micro_batch"
        )

    def _on_output_grad(
        self,
        module: nn.Module,
        inp: Tensor,
        params: list[tuple[str, int]],
        fired: list[bool],
        split: tuple[int, int] | None,
        grad_out: Tensor,
    ) -> None:
        if not self.recording:
            return
        if fired[0]:
            self._failed = _TWICE
            return
        fired[0] = True
        if self._recomputed_square:
            self._judge_recomputed()
        grad_out = grad_out.detach()
        if split is not None:  # flattened rows (B*k, ...), regrouped per example as the input was
            grad_out = grad_out.reshape(*split, *grad_out.shape[1:])
        try:
            factors = layer_factors(module, inp, grad_out)
            for param_name, index in params:
                if param_name in factors and index not in self.excluded:
                    self._add(index, factors[param_name])
        except (NotImplementedError, RuntimeError) as error:
            # A combination we cannot measure exactly: report the step as unmeasurable, never a wrong value. Out of
            # memory and device failures (RuntimeError subclasses) are no such combination: they reach the user.
            if type(error) is not RuntimeError and not isinstance(error, NotImplementedError):
                raise
            self._failed = f"per-example norms of layer {self._module_names[id(module)]!r} failed: {error}"

    def _add(self, index: int, factor: Factor, sq: Tensor | None = None) -> None:
        if sq is None:
            sq = factor_sq_norm(factor)
        for earlier in self._stored_factors[index]:
            sq = sq + 2 * factor_inner(earlier, factor)
        self._sq_norms[index] = self._sq_norms[index] + sq if index in self._sq_norms else sq
        self._pending_uses[index] -= 1
        if self._pending_uses[index] > 0:  # more uses of this parameter will arrive in this backward
            self._stored_factors[index].append(factor)
        else:
            self._stored_factors.pop(index, None)
            self._finished.add(index)

    def pop_backward(self) -> BackwardNorms | None:
        """The (P, B) per-parameter, per-example squared norms recorded since the last call (0 where a watched
        parameter got none); None if none."""
        sq_norms, failed = self._sq_norms, self._failed
        self._sq_norms, self._failed = {}, None
        self._pending_uses.clear()
        self._stored_factors.clear()
        self._finished.clear()
        self._forward_calls.clear()
        self._replayed_calls.clear()
        self._clear_graph_records()
        self.fused_output = self.fused_use = None
        if not sq_norms and failed is None:
            if self.params and len(self.excluded) == len(self.params):
                return BackwardNorms(torch.zeros(0), (), True, EVERYTHING_LEFT_OUT)
            return None
        shapes = {t.shape for t in sq_norms.values()}
        if len(shapes) > 1 and failed is None:
            failed = (
                f"layers disagree on the number of examples: {sorted(s[0] for s in shapes)} (tell the tracker the"
                " micro-batch's examples: start_micro_batch(examples=len(batch)))"
            )
        if failed is not None or not sq_norms:
            return BackwardNorms(torch.zeros(0), (), True, failed or "no per-example norm")
        any_norm = next(iter(sq_norms.values()))
        zero = torch.zeros_like(any_norm)
        for index in self.excluded:  # excluded during this backward, after some of its uses were added
            sq_norms.pop(index, None)
        stacked = torch.stack([sq_norms.get(i, zero) for i in range(len(self.params))])
        measured = tuple(i in sq_norms for i in range(len(self.params)))
        return BackwardNorms(stacked, measured, True)

    def detach(self) -> None:
        self._use_check = None
        self.examples_reordered = None
        self._clear_graph_records()
        self._excluded_at_start = frozenset()
        self._judged_square = set()
        self._broadcast_modules = set()
        self._judged_tables, self._tables_judged_now = set(), set()
        self._graphless_judgements = {}
        self._outputs_used_inside = {}
        self._model = None
        for module in self._fused_modules:
            if isinstance(vars(module).get("forward"), FusableForward):
                del module.forward
        self._fused_modules = []
        self.fused_output = self.fused_use = None
        self._forward_calls.clear()
        self._replayed_calls.clear()
        self._module_params = {}
        self._sq_norms = {}
        self._failed = None
        self._pending_uses.clear()
        self._stored_factors.clear()
        self._finished.clear()
        super().detach()
