"""Per-example gradients of any module's parameters, by replaying its forward one example at a time.

For a module that no dedicated path covers (a custom norm such as ``LlamaRMSNorm``, a scale module, a
grouped convolution, ``nn.MultiheadAttention``, a weight under ``torch.nn.utils.parametrize``; recurrent
layers are captured here too but replayed by :mod:`per_example_rnn`), the forward hook keeps the module's
inputs and, when its outputs' gradients arrive, computes every example's parameter gradient as
``torch.func.vjp`` of ``functional_call(module, params, inputs of that example)`` with that example's output
gradient as the cotangent, vmapped over the examples. This is exact (the same function, differentiated per
example) and materialises a (B, *shape) gradient per parameter: it costs about one more forward and backward
of the module, per example batched.

What cannot be replayed is refused with a reason, never measured wrongly: random operations (vmap's
``randomness="error"`` raises on dropout), inputs without the batch dimension where it is expected,
``PackedSequence`` inputs, forward pre-hooks whose effect is unknown, sharded (DTensor) parameters.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy
import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.rnn import PackedSequence
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_gns.sources import per_example_rnn
from lightning_gns.time_major import OBSERVES_ONLY

# Modules with children whose parameters only the parent's forward uses (functionally): replayed whole.
COMPOSITE_LAYERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.RNNBase)
_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")
# Forward pre-hooks the replay knows how to run: the old hook-based weight_norm and spectral_norm.
_KNOWN_PRE_HOOKS = (WeightNorm, SpectralNorm)


def replays_whole(module: nn.Module) -> bool:
    """Whether the generic path takes ``module`` with all its children: a known composite or a parametrized module."""
    return isinstance(module, COMPOSITE_LAYERS) or parametrize.is_parametrized(module) or _known_pre_hooks(module)


def _known_pre_hooks(module: nn.Module) -> bool:
    return any(isinstance(h, _KNOWN_PRE_HOOKS) for h in module._forward_pre_hooks.values())


def attach_problem(module: nn.Module, params: list[Tensor]) -> str | None:
    """Why the generic path cannot measure ``module`` at all, or None."""
    kind = type(module).__name__
    if any(type(p).__name__ == "DTensor" for p in params):
        return f"{kind} has sharded (DTensor) parameters, which a per-example replay of its forward cannot use"
    return None


def _input_dim(module: nn.Module, position: int | str, value: Any) -> int | None:
    """The batch dimension of one top-level input of ``module`` (None: no batch dimension by design)."""
    if isinstance(module, nn.RNNBase):
        if position in (0, "input"):
            return 0 if module.batch_first else 1
        return 1  # hx: (layers * directions, B, hidden), whatever batch_first says
    if isinstance(module, nn.MultiheadAttention):
        name = _MHA_ARGS[position] if isinstance(position, int) and position < len(_MHA_ARGS) else position
        if name in ("query", "key", "value"):
            return 0 if module.batch_first else 1
        if name == "attn_mask" and isinstance(value, Tensor) and (value.dim() == 2 or module.num_heads > 1):
            return None  # (L, S) is shared; (B * heads, L, S) is split below the batch dimension
    return 0


def _output_dims(module: nn.Module, count: int) -> list[int]:
    """The batch dimension of each tensor of the module's flattened output."""
    if isinstance(module, nn.RNNBase):  # output, then h_n (and c_n): (layers * directions, B, hidden)
        return [0 if module.batch_first else 1] + [1] * (count - 1)
    if isinstance(module, nn.MultiheadAttention):  # attn_output, attn_weights (B, ...)
        return [0 if module.batch_first else 1] + [0] * (count - 1)
    return [0] * count


def unknown_pre_hooks(module: nn.Module) -> list[Any]:
    """The forward pre-hooks of ``module`` that may change what its forward computes (torch.nn.utils.prune's masks,
    a user's hook), less the weight and spectral norms the replay knows and hooks that only observe."""
    if not module._forward_pre_hooks:
        return []
    return [
        h
        for h in module._forward_pre_hooks.values()
        if not isinstance(h, _KNOWN_PRE_HOOKS) and not getattr(h, OBSERVES_ONLY, False) and not _gathers_shards(h)
    ]


def _gathers_shards(hook: Any) -> bool:
    """FSDP2's pre-forward (``fully_shard``): it gathers the parameters' shards, the layer computes with them."""
    owner = getattr(hook, "__self__", None) or getattr(getattr(hook, "func", None), "__self__", None)
    return owner is not None and type(owner).__module__.startswith("torch.distributed.fsdp.")


def forward_problem(module: nn.Module, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why this call of ``module`` cannot be replayed per example (before looking at shapes), or None."""
    kind = type(module).__name__
    if any(isinstance(v, PackedSequence) for v in (*args, *kwargs.values())):
        return f"layer {name!r} ({kind}) was called on a PackedSequence, which has no per-example batch dimension"
    unknown = unknown_pre_hooks(module)
    if unknown:
        return (
            f"layer {name!r} ({kind}) has a forward pre-hook ({type(unknown[0]).__name__}) whose effect a per-example"
            " replay of its forward cannot reproduce"
        )
    dropout = getattr(module, "dropout", 0.0)
    # A one-layer recurrent layer applies no dropout (it sits between layers).
    dropping = isinstance(dropout, float) and dropout > 0 and module.training
    single_rnn = isinstance(module, nn.RNNBase) and module.num_layers == 1
    if dropping and isinstance(module, COMPOSITE_LAYERS) and not single_rnn:
        return f"dropout inside {name!r} (nn.{kind}, dropout={dropout}) cannot be replayed per example"
    if isinstance(module, COMPOSITE_LAYERS):
        first = args[0] if args else kwargs.get("input", kwargs.get("query"))
        if not isinstance(first, Tensor) or first.dim() != 3:
            shape = tuple(first.shape) if isinstance(first, Tensor) else type(first).__name__
            return f"layer {name!r} (nn.{kind}) was called on an input of shape {shape} without a batch dimension"
    return None


@dataclass
class Replay:
    """One call of a module, kept for its per-example replay when the output gradients arrive."""

    module: nn.Module
    wanted: dict[str, Tensor]  # measured parameters by name (detached)
    fixed: dict[str, Tensor]  # the other parameters and the buffers as the forward saw them
    spec: Any  # tree structure of (args, kwargs)
    leaves: list[Any]  # flattened (args, kwargs), tensors detached
    batched: list[tuple[int, int]]  # (leaf position, batch dimension) of the inputs split per example
    outputs: list[int]  # positions in the flattened output of the tensors whose gradients are the cotangents
    output_dims: list[int]
    output_like: list[tuple[torch.Size, torch.dtype, torch.device]]
    autocast: tuple[str, torch.dtype] | None
    # The call's own outputs (detached), set on the calls whose replay is compared with them (per_example.py): a
    # layer whose output for one example depends on the others without a gradient (``x.detach().mean(0)``) replays
    # another function, which no graph check can see.
    expected: list[Tensor] | None = None
    # Batched leaves whose per-example slice is passed as it is, not given a batch dimension of 1: an
    # nn.MultiheadAttention mask of (B * heads, T, S) split into (B, heads, T, S), whose slice (heads, T, S) is the
    # mask of a batch of one.
    as_sliced: frozenset[int] = frozenset()


class ReplayMismatch(RuntimeError):
    """The replay of a call, one example at a time, did not compute the call's outputs."""


def capture(
    module: nn.Module,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output: Any,
    param_names: list[str],
    expected: int | None,
    holds_no_examples: Callable[[Tensor], bool] | None = None,
) -> tuple[Replay, list[Tensor]] | str | None:
    """The replay of this call and the output tensors to hook; why it cannot be split per example; or None.

    None: no output needs a gradient (nothing to measure in this call). An input that would broadcast over a wider
    one (``(T, d)`` beside ``(B, T, d)`` at ``T == B``) is not split where ``holds_no_examples`` proves it a table
    shared by the examples; otherwise the call is refused as ambiguous.
    """
    out_leaves = tree_flatten(output)[0]
    # One tensor returned twice (``return h, h``) is hooked once: its gradient already sums both uses, and the
    # replay, given it for each place, would count it twice.
    firsts: dict[int, int] = {}
    for i, t in enumerate(out_leaves):
        if isinstance(t, Tensor) and t.requires_grad:
            firsts.setdefault(id(t), i)
    selected = sorted(firsts.values())
    if not selected:
        return None
    problem = forward_problem(module, name, args, kwargs)
    if problem is not None:
        return problem
    all_dims = _output_dims(module, len(out_leaves))
    dims = [all_dims[i] for i in selected]
    tensors = [out_leaves[i] for i in selected]
    first = tensors[0]
    batch = expected if expected is not None else (first.shape[dims[0]] if first.dim() > dims[0] else 0)
    for t, d in zip(tensors, dims, strict=True):
        if t.dim() <= d or t.shape[d] != batch:
            where = "leading dimension" if d == 0 else f"dimension {d}"
            return (
                f"layer {name!r} ({type(module).__name__}) gave an output of shape {tuple(t.shape)} whose {where} is"
                f" not the micro-batch's {batch} examples (inputs broadcast over the batch, or a layout the"
                " per-example replay does not know)"
            )
    if isinstance(module, nn.RNNBase) and per_example_rnn.replays(module):
        args, kwargs = _with_initial_state(module, args, kwargs, batch)
    if isinstance(module, nn.RNNCellBase):
        args, kwargs = _with_initial_cell_state(module, args, kwargs)
    leaves, spec = tree_flatten((args, kwargs))
    positions: list[tuple[int | str, Any]] = [(i, a) for i, a in enumerate(args)] + list(kwargs.items())
    batched: list[tuple[int, int]] = []
    originals: dict[int, Tensor] = {}
    at = 0
    for position, value in positions:
        count = len(tree_flatten(value)[0])
        dim = _input_dim(module, position, value)
        for k in range(at, at + count):
            leaf = leaves[k]
            if isinstance(leaf, Tensor):
                leaves[k] = leaf.detach()
                if dim is not None and leaf.dim() > dim and leaf.shape[dim] == batch:
                    batched.append((k, dim))
                    originals[k] = leaf
        at += count
    shared = _broadcast_inputs(batched, originals)
    if shared:
        undecided = [k for k in shared if holds_no_examples is None or not holds_no_examples(originals[k])]
        if undecided:
            shape, widest = tuple(originals[undecided[0]].shape), tuple(originals[shared[undecided[0]]].shape)
            return (
                f"layer {name!r} ({type(module).__name__}) was called with an input of shape {shape} beside one of"
                f" shape {widest}: it may be one row per example or a table broadcast over them (positions as many"
                " as the examples), which the shapes cannot tell. Use a batch size other than the sequence length, or"
                " accumulate gradients over 2 or more micro-batches (mode='microbatch' norms whole gradients)"
            )
        batched = [(k, d) for k, d in batched if k not in shared]  # a table shared by the examples: not split
    as_sliced = _split_head_mask(module, positions, leaves, batched, batch)
    if not batched:
        return (
            f"layer {name!r} ({type(module).__name__}) was called without an input whose batch dimension holds the"
            f" micro-batch's {batch} examples: its gradient cannot be split per example"
        )
    wanted_names = set(param_names)
    wanted: dict[str, Tensor] = {}
    fixed: dict[str, Tensor] = {}
    for n, p in module.named_parameters():
        (wanted if n in wanted_names else fixed)[n] = p.detach()
    # Buffers as this call left them: a later call may update them in place (spectral_norm's u and v).
    fixed.update({n: b.detach().clone() for n, b in module.named_buffers()})
    device = first.device.type
    autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
    replay = Replay(
        module,
        wanted,
        fixed,
        spec,
        leaves,
        batched,
        selected,
        dims,
        [(t.shape, t.dtype, t.device) for t in tensors],
        autocast,
        as_sliced=as_sliced,
    )
    return replay, tensors


def _split_head_mask(
    module: nn.Module,
    positions: list[tuple[int | str, Any]],
    leaves: list[Any],
    batched: list[tuple[int, int]],
    batch: int,
) -> frozenset[int]:
    """An nn.MultiheadAttention ``attn_mask`` of shape ``(B * heads, T, S)`` (one mask per sequence, a packed
    batch's block-diagonal one): viewed as ``(B, heads, T, S)`` and split along the examples (in place in
    ``leaves`` and ``batched``); the positions of such leaves."""
    if not isinstance(module, nn.MultiheadAttention) or batch < 2:
        return frozenset()
    heads = module.num_heads
    at = 0
    for position, value in positions:
        count = len(tree_flatten(value)[0])
        if position in ("attn_mask", 5) and count == 1:
            leaf = leaves[at]
            if isinstance(leaf, Tensor) and leaf.dim() == 3 and leaf.shape[0] == batch * heads and heads > 1:
                leaves[at] = leaf.reshape(batch, heads, *leaf.shape[1:])
                batched.append((at, 0))
                return frozenset({at})
        at += count
    return frozenset()


_MAX_INSIDE_WALK = 2000  # nodes of one call's graph; a cell's is a few dozen


def outputs_used_inside(outputs: list[Tensor], inputs: list[Tensor]) -> list[int]:
    """The positions of the ``outputs`` that the call itself used to compute another of them (``nn.LSTMCell``'s
    ``c``, from which it computes ``h = o * tanh(c)``).

    A hook on such a tensor receives its whole gradient, the part that flows back through the other output
    included, and the replay, given that output's gradient too, would count that part twice: silently wrong
    norms. The caller hooks an alias of it instead, which only the model's later uses reach. Found by walking
    the graph from each other output down to the call's inputs; a walk that runs long (a layer that reads tensors
    from outside its inputs) counts as finding it: an alias is exact either way.
    """
    if len(outputs) < 2:
        return []
    nodes = [t.grad_fn for t in outputs]
    stops = {t.grad_fn for t in inputs if t.grad_fn is not None}
    used = []
    for j, target in enumerate(nodes):
        if target is None or target in stops:
            continue
        starts = [n for i, n in enumerate(nodes) if i != j and n is not None and n is not target]
        seen: set[Any] = set()
        while starts and target not in seen:
            if len(seen) > _MAX_INSIDE_WALK:
                seen.add(target)
                break
            node = starts.pop()
            if node in seen or node in stops:
                continue
            seen.add(node)
            starts.extend(f for f, _ in node.next_functions if f is not None)
        if target in seen:
            used.append(j)
    return used


def _broadcast_inputs(batched: list[tuple[int, int]], originals: dict[int, Tensor]) -> dict[int, int]:
    """The inputs split along their first dimension that may be tables over positions instead of one row per example,
    beside a wider input split there too: ``(T, d)`` or ``(T, T)`` beside ``(B, T, d)`` at ``T == B``; each with the
    wider one's leaf index."""
    leading = [k for k, d in batched if d == 0]
    if len(leading) < 2:
        return {}
    widest = max(leading, key=lambda k: originals[k].dim())
    wide_shape = tuple(originals[widest].shape)

    def ambiguous(shape: tuple[int, ...]) -> bool:
        if len(shape) >= len(wide_shape):
            return False
        # (T, d) beside (B, T, d): a table aligned from the right; (T, T) beside (B, T, d) at T == B: a mask over
        # positions (causal) or one row per example (padding), which the shapes cannot tell either.
        return shape == wide_shape[-len(shape) :] or (
            len(shape) >= 2 and len(wide_shape) >= 2 and shape[0] == shape[1] == wide_shape[1]
        )

    return {k: widest for k in leading if ambiguous(tuple(originals[k].shape))}


def _with_initial_cell_state(
    module: nn.RNNCellBase, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A cell's call with its default zero state made explicit, one per example (``cell(x)``, the first step of a
    loop): the zeros the cell makes itself have no batch dimension under vmap, and the replay failed."""
    if (len(args) > 1 and args[1] is not None) or kwargs.get("hx") is not None:
        return args, kwargs
    x = args[0] if args else kwargs["input"]
    if x.dim() != 2:
        return args, kwargs
    h = x.new_zeros(x.shape[0], module.hidden_size)
    hx: Any = (h, h) if isinstance(module, nn.LSTMCell) else h
    if args:
        return (x, hx, *args[2:]), {k: v for k, v in kwargs.items() if k != "hx"}
    return args, {**kwargs, "hx": hx}


def _with_initial_state(
    module: nn.RNNBase, args: tuple[Any, ...], kwargs: dict[str, Any], batch: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call with its default zero initial state made explicit (one per example).

    The state the recurrent layer creates itself has no batch dimension under vmap, and its in-place updates
    then fail for some dtypes (float64 on CPU); zeros passed per example are the same state.
    """
    if (len(args) > 1 and args[1] is not None) or kwargs.get("hx") is not None:
        return args, kwargs
    x = args[0] if args else kwargs["input"]
    layers = module.num_layers * (2 if module.bidirectional else 1)
    out = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    h = x.new_zeros(layers, batch, out)
    hx: Any = (h, x.new_zeros(layers, batch, module.hidden_size)) if isinstance(module, nn.LSTM) else h
    kwargs = {k: v for k, v in kwargs.items() if k != "hx"}
    if args:
        return (args[0], hx, *args[2:]), kwargs
    return args, {**kwargs, "hx": hx}


class _Runner(nn.Module):
    """Calls the module's ``forward`` without its hooks (the known weight_norm/spectral_norm ones run by hand)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inner = self.inner
        for hook in inner._forward_pre_hooks.values():
            if isinstance(hook, WeightNorm):
                setattr(inner, hook.name, hook.compute_weight(inner))
            elif isinstance(hook, SpectralNorm):  # u and v as the forward's power iteration left them
                setattr(inner, hook.name, hook.compute_weight(inner, do_power_iteration=False))
        return inner.forward(*args, **kwargs)


@contextlib.contextmanager
def _replay_state(module: nn.Module) -> Iterator[None]:
    """Parametrized spectral norms in eval mode (no second power iteration), hook-set weights restored after."""
    spectral = [m for m in module.modules() if isinstance(m, _SpectralNorm) and m.training]
    hooked = [h.name for h in module._forward_pre_hooks.values() if isinstance(h, _KNOWN_PRE_HOOKS)]
    saved = {n: vars(module)[n] for n in hooked if n in vars(module)}
    for m in spectral:
        m.training = False
    try:
        yield
    finally:
        for m in spectral:
            m.training = True
        for n in hooked:
            if n in saved:
                setattr(module, n, saved[n])


def replay_inputs(replay: Replay) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's (args, kwargs) as captured (tensors detached)."""
    args, kwargs = tree_unflatten(replay.leaves, replay.spec)
    return args, kwargs


_BATCHING_RULE_WARNING = r".*There is a performance drop because we have not yet implemented the batching rule.*"


def per_example_grads(replay: Replay, grads: list[Tensor | None]) -> dict[str, Tensor]:
    """Each example's gradient of every measured parameter, (B, *shape), laid out like the parameter."""
    cotangents = [
        g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
        for g, (shape, dtype, device) in zip(grads, replay.output_like, strict=True)
    ]
    runner = _Runner(replay.module)
    fixed = {f"inner.{n}": t for n, t in replay.fixed.items()}

    def one(example_inputs: list[Tensor], example_cotangents: list[Tensor]) -> dict[str, Any]:
        leaves = list(replay.leaves)
        for (k, dim), value in zip(replay.batched, example_inputs, strict=True):
            leaves[k] = value if k in replay.as_sliced else value.unsqueeze(dim)
        args, kwargs = tree_unflatten(leaves, replay.spec)

        def outputs(wanted: dict[str, Tensor]) -> tuple[Tensor, ...]:
            params = {**fixed, **{f"inner.{n}": t for n, t in wanted.items()}}
            out = tree_flatten(functional_call(runner, params, args, kwargs))[0]
            return tuple(out[i] for i in replay.outputs)

        pulled = vjp(outputs, replay.wanted)
        replayed, pull = pulled[0], pulled[1]
        unsqueezed = tuple(c.unsqueeze(d) for c, d in zip(example_cotangents, replay.output_dims, strict=True))
        grads: dict[str, Any] = pull(unsqueezed)[0]
        if replay.expected is not None:
            grads = {**grads, _REPLAYED: [o.squeeze(d) for o, d in zip(replayed, replay.output_dims, strict=True)]}
        return grads

    inputs = [replay.leaves[k] for k, _ in replay.batched]
    in_dims = ([d for _, d in replay.batched], list(replay.output_dims))
    autocast = (
        torch.autocast(replay.autocast[0], dtype=replay.autocast[1])
        if replay.autocast is not None
        else contextlib.nullcontext()
    )
    with warnings.catch_warnings(), _replay_state(replay.module), autocast, torch.enable_grad(), _host_random_kept():
        warnings.filterwarnings("ignore", message=_BATCHING_RULE_WARNING, category=UserWarning)
        per_example: dict[str, Any] = vmap(one, in_dims=in_dims, randomness="error")(inputs, cotangents)
    if replay.expected is not None:
        _check_replayed(per_example.pop(_REPLAYED), replay)
    return per_example


_REPLAYED = "\0replayed outputs"  # no parameter's name


@contextlib.contextmanager
def _host_random_kept() -> Iterator[None]:
    """Raise :class:`ReplayMismatch` if the replay draws from Python's or NumPy's random generator (vmap's
    ``randomness="error"`` sees torch's draws only: a LayerDrop-style ``random.random()`` in a forward draws anew
    in the replay, unlike the forward's draw), and put both generators back as they were, so that the training's
    own draws stay what they are without the callback."""
    python_state = random.getstate()
    numpy_state = numpy.random.get_state()
    try:
        yield
    finally:
        drew = random.getstate() != python_state
        numpy_after: Any = numpy.random.get_state()
        before: Any = numpy_state
        drew = drew or numpy_after[2] != before[2] or not numpy.array_equal(numpy_after[1], before[1])
        if drew:
            random.setstate(python_state)
            numpy.random.set_state(numpy_state)
    if drew:
        raise ReplayMismatch(
            "its forward draws from Python's or NumPy's random generator (random.random(), as LayerDrop does), which"
            " the replay cannot draw as the forward did"
        )


def _check_replayed(replayed: list[Tensor], replay: Replay) -> None:
    """Raise :class:`ReplayMismatch` where the replayed outputs (examples first) are not the call's (a host sync:
    on a call's first replays only)."""
    assert replay.expected is not None
    for got, want, dim in zip(replayed, replay.expected, replay.output_dims, strict=True):
        want = want.movedim(dim, 0).to(got.dtype)
        if got.shape != want.shape:
            raise ReplayMismatch("its replayed output has another shape than its output")
        # Where the forward's own output is not finite (an inf in one example's input, a model's NaN on padded
        # rows) there is nothing to compare; the step is skipped as non-finite anyway. NaN != NaN would leave
        # the layer out for the whole run.
        finite = torch.isfinite(want)
        # Detached: nothing here may be saved for a backward (an activation checkpoint counts what is saved).
        want, got = torch.where(finite, want, 0.0), torch.where(finite, got.detach(), 0.0)
        # vmap's kernels differ from the batched ones by rounding; a batch statistic replayed per example by O(1).
        # The whole-output rule holds every element to a share of the output's largest magnitude. In full precision
        # each element is also held to its own scale, the largest magnitude at its position over the examples (with
        # a floor of a thousandth of the output's largest, for positions near zero in every example): one output
        # channel of 3e4 (a large bias, a massive activation) must not excuse an O(1) mismatch in the others. Half
        # precision rounds a product before its bias is added, by about one ulp of the terms, and keeps the
        # whole-output rule alone.
        largest = want.abs().max().clamp_min(1e-12) if want.numel() else want.new_tensor(1e-12)
        if got.dtype in (torch.float16, torch.bfloat16) or replay.autocast:
            tolerance = 1e-2 * largest
        else:
            scale = want.abs().amax(dim=0, keepdim=True) if want.dim() > 0 and want.shape[0] > 0 else want.abs()
            relative = 1e-3 if got.dtype == torch.float32 else 1e-8
            tolerance = torch.minimum(1e-4 * largest, relative * torch.maximum(scale, 1e-3 * largest))
        if not bool(((got - want).abs() <= tolerance).all()):
            raise ReplayMismatch(
                "its output for an example depends on the other examples of the batch through something without a"
                " gradient (a statistic over the batch such as x.detach().mean(0), or state the call changed): the"
                " per-example replay computes another function"
            )


def replay_failure(name: str, module: nn.Module, error: Exception) -> str:
    """The reason a failed replay leaves the module's parameters out."""
    kind = type(module).__name__
    if isinstance(error, ReplayMismatch):
        return f"the per-example replay of {name!r} ({kind}) does not reproduce its forward: {error}"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "random" in text and "vmap" in text:
        return (
            f"a random operation (dropout?) inside {name!r} ({kind}) cannot be replayed per example"
            " (its parameters need the same random draw per example as in the forward)"
        )
    return f"the per-example replay of {name!r} ({kind}) failed ({type(error).__name__}: {text[:200]})"
