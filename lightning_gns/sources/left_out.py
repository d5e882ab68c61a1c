"""What the per-example estimate leaves out, and why: from the model's structure and from the hooks at run time.

The per-example source watches the parameters of the layers it has a path for. Every other optimized
parameter is left out of both batch sizes' norms; :func:`unwatched_reasons` says why from the module
tree (an unsupported layer type, a raw ``nn.Parameter`` of a module that uses it in its own forward, a
parametrized tensor, ...). Parameters the source watches but found unmeasurable carry the reason the
source recorded. :func:`left_out_message` writes both up for the user.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from lightning_gns.sources.per_example import (
    NORM_LAYERS,
    SUPPORTED_LAYERS,
    Layers,
    is_supported,
    runs_own_forward,
    unsupported_embedding_options,
)

NOT_IN_MODEL = "not a parameter of the model (the optimizer steps a tensor no module of the model owns)"


def callable_name(function: object) -> str:
    """``module.qualname`` of a function as messages name it, through ``functools.partial`` wrappers."""
    while hasattr(function, "func"):  # functools.partial
        function = function.func
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__qualname__)}"


def parameter_names(model: nn.Module | None, params: Iterable[nn.Parameter]) -> dict[int, str]:
    """Parameter id -> its name in ``model.named_parameters()`` (the first name of a tied one).

    Parameters the model does not hold get a placeholder with their position and shape.
    """
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    out = {}
    for position, p in enumerate(params):
        out[id(p)] = names.get(id(p), f"<optimized parameter {position}, shape {tuple(p.shape)}>")
    return out


def unwatched_reasons(model: nn.Module, params: Iterable[nn.Parameter], layers: Layers) -> dict[int, str]:
    """Parameter id -> why no per-example path covers it, for each of ``params`` (those the source does not watch).

    Read off the module that owns each parameter (the first in ``named_modules`` order for a tied one).
    """
    owners: dict[int, tuple[str, nn.Module]] = {}
    for module_name, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (module_name, module))
    return {id(p): _reason(owners.get(id(p)), layers) for p in params}


def _reason(owner: tuple[str, nn.Module] | None, layers: Layers) -> str:
    if owner is None:
        return NOT_IN_MODEL
    module_name, module = owner
    kind = type(module).__name__
    if isinstance(module, nn.utils.parametrize.ParametrizationList):
        return (
            "parametrized tensor (torch.nn.utils.parametrize, e.g. weight_norm or spectral_norm): its gradient"
            " reaches the original tensors, which no per-example path reads"
        )
    if layers == "norm" and not isinstance(module, NORM_LAYERS):
        return "not an nn.LayerNorm or nn.RMSNorm (layers='norm'; other norm classes are measured with layers='all')"
    if layers == "norm" and not runs_own_forward(module):
        return f"{kind} has a forward of its own (layers='norm' measures LayerNorm and RMSNorm as torch defines them)"
    if isinstance(module, SUPPORTED_LAYERS) and not is_supported(module, "all"):
        return f"{kind} with an option per-example norms do not support ({_unsupported_options(module)})"
    if not any(name != "parametrizations" for name, _ in module.named_children()):  # a leaf, parametrized or not
        return f"unsupported layer {kind}"
    where = f"{module_name!r} ({kind})" if module_name else f"the top module ({kind})"
    return f"raw parameter used in the forward of {where}, outside any layer the per-example source hooks"


def _unsupported_options(module: nn.Module) -> str:
    options: dict[str, bool] = {}
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return ", ".join(unsupported_embedding_options(module)) or "its configuration"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        options = {
            "groups > 1": module.groups != 1,
            f"padding_mode={module.padding_mode!r}": module.padding_mode != "zeros",
            "padding='same' that pads one side more": module.padding == "same",
        }
    return ", ".join(name for name, present in options.items() if present) or "its configuration"


def left_out_message(
    left_out: Mapping[str, str], numels: Mapping[str, int], total: int, updated: int | None = None
) -> str:
    """One message listing every left-out parameter, grouped by reason, with each group's share of ``total``.

    ``updated``: the number of parameters left out since the previous message, when this one replaces it.
    """
    groups: dict[str, list[str]] = {}
    for name, reason in left_out.items():
        groups.setdefault(reason, []).append(name)
    missing = sum(numels[n] for n in left_out)
    lines = [
        f"GradientNoiseScale(mode='per_example') covers {_share(total - missing, total)} of the {total:,} optimized"
        f" parameter elements"
        + (f" (updated: {updated} more parameter(s) left out since the last message)" if updated else "")
        + f". Left out of both batch sizes' norms, {len(left_out)} parameter(s) ({_share(missing, total)}), so"
        " B_simple is the noise scale of the covered part only:"
    ]
    for reason, names in sorted(groups.items(), key=lambda item: -sum(numels[n] for n in item[1])):
        share = _share(sum(numels[n] for n in names), total)
        lines.append(f"- {reason} ({share}): {', '.join(names)}")
    return "\n".join(lines)


def low_coverage_message(covered: float) -> str:
    return (
        f"GradientNoiseScale(mode='per_example') covers only {covered:.1%} of the optimized parameter elements:"
        " the logged gns/b_simple is the noise scale of that part, NOT the model's noise scale, and the two can"
        " differ by tens of percent. To measure every parameter, accumulate gradients over 2 or more"
        " micro-batches per optimizer step (Trainer(accumulate_grad_batches=2): mode='microbatch' measures every"
        " parameter), or train on several processes with DDP (mode='ddp')."
    )


def _share(part: float, total: float) -> str:
    if not total:
        return "n/a"
    percent = 100 * part / total
    if 0 < percent < 0.1:
        return f"{percent:.2g}%"
    return f"{percent:.1f}%"
