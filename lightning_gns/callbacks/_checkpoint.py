"""Checks of the callbacks' checkpoint states before they are loaded.

An edited or corrupted state (a NaN average, a count below zero, an accumulation of 0) would otherwise be
loaded as is and show up much later as NaN weights or a ZeroDivisionError. Each check raises a
``ValueError`` that names the callback, the key and what is wrong with it. No Lightning import here.
"""

from __future__ import annotations

import ast
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch

# Optional keys are those the loaders have always defaulted (to none / empty), so that checkpoints of earlier
# versions still load; lr_scaling is saved since the check of a changed rule.
GNS_KEYS = frozenset({"metric", "beta"})
GNS_OPTIONAL_KEYS = frozenset({"layer_metrics", "base_batch_size", "contributed", "contributed_mode", "batch_size_fn"})
ADAPTIVE_KEYS = frozenset({"accumulation", "base_accumulation", "lr_factor"})
# Keys saved under another name by earlier versions: old -> new.
GNS_RENAMED_KEYS = {"reference_batch_size": "base_batch_size"}
ADAPTIVE_RENAMED_KEYS = {"reference_accumulation": "base_accumulation"}
ADAPTIVE_OPTIONAL_KEYS = frozenset(
    {
        "pending",
        "last_change_step",
        "micro_batch_size",
        "epoch_units",
        "epoch_micro_batches",
        "units_epoch",
        "history",
        "lr_scaling",
        "decisions",
        "pending_record",
        "estimate_moments",
        "last_ema",
        "world_size",
    }
)
_COUNTS = ("measured_steps", "skipped_steps")
# Metric states that checkpoints of earlier versions lack (the metric then starts them afresh), and their shapes.
_OPTIONAL_METRIC_STATES = {"estimate_moments": (6,)}
_SIZES = ("last_b_small", "last_b_big")


def _fail(callback: str, key: str, problem: str) -> ValueError:
    return ValueError(
        f"{callback}: the checkpoint's {key!r} {problem}. The callback's saved state was edited or corrupted:"
        f" resume from another checkpoint, or delete the {callback} entry of checkpoint['callbacks'] to start"
        " the callback afresh."
    )


def _check_keys(
    callback: str, where: str, found: Iterable[Any], required: frozenset[str], optional: frozenset[str]
) -> None:
    found = set(found)
    missing = sorted(required - found)
    if missing:
        raise _fail(callback, f"{where}{missing[0]}", "is missing")
    extra = sorted(str(k) for k in found - required - optional)
    if extra:
        expected = sorted(required | optional)
        raise _fail(callback, f"{where}{extra[0]}", f"is not a key this version saves (expected {expected})")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_metric_states(callback: str, where: str, states: Any, names: Iterable[str]) -> None:
    """One :class:`~lightning_gns.GradientNoiseScaleMetric`'s saved states (``where`` prefixes the key names)."""
    if not isinstance(states, Mapping):
        raise _fail(callback, where.rstrip("."), f"must be a dict of tensors, got {type(states).__name__}")
    optional = frozenset(_OPTIONAL_METRIC_STATES)
    _check_keys(callback, where, states, frozenset(names) - optional, optional & frozenset(names))
    values: dict[str, float] = {}
    for name, value in states.items():
        key = f"{where}{name}"
        if not isinstance(value, torch.Tensor):
            raise _fail(callback, key, f"must be a tensor, got {type(value).__name__}")
        if name in _OPTIONAL_METRIC_STATES:
            _check_moments(callback, key, value, _OPTIONAL_METRIC_STATES[name])
            continue
        if value.shape != ():
            raise _fail(callback, key, f"must be a scalar tensor (shape ()), got shape {tuple(value.shape)}")
        if name in _COUNTS and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise _fail(callback, key, f"must be an integer count, got dtype {value.dtype}")
        values[name] = float(value)
    for name in _COUNTS:
        if values[name] < 0:
            raise _fail(callback, f"{where}{name}", f"is {values[name]:g}, must be a count >= 0")
    for name in ("grad_sq_norm_ema", "trace_cov_ema"):
        if not math.isfinite(values[name]):
            raise _fail(callback, f"{where}{name}", f"is {values[name]}, must be finite")
    weight = values["ema_weight"]
    # 1 - beta^n reaches exactly 1.0 in float64 after enough steps, so 1 is legal.
    if not 0.0 <= weight <= 1.0:
        raise _fail(callback, f"{where}ema_weight", f"is {weight}, must lie in [0, 1] (it is 1 - beta^steps)")
    if (weight > 0) != (values["measured_steps"] > 0):
        raise _fail(
            callback,
            f"{where}ema_weight",
            f"is {weight} with measured_steps={values['measured_steps']:g}; both are 0 before the first measured"
            " step and positive after it",
        )
    if weight == 0 and (values["grad_sq_norm_ema"] != 0 or values["trace_cov_ema"] != 0):
        raise _fail(callback, f"{where}ema_weight", "is 0 while the averages are not (no step entered them)")
    for name in _SIZES:
        size = values[name]
        if not (math.isnan(size) or (math.isfinite(size) and size >= 0)):  # NaN: nothing measured yet
            raise _fail(callback, f"{where}{name}", f"is {size}, must be a batch size >= 0 (or NaN before a step)")


def validate_gns_state(
    state: Any, metric_names: Iterable[str], beta: float, callback: str = "GradientNoiseScale"
) -> None:
    """The state of :meth:`GradientNoiseScale.state_dict`; raises ``ValueError`` naming the first bad key."""
    if not isinstance(state, Mapping):
        raise _fail(callback, "state", f"must be a dict, got {type(state).__name__}")
    names = list(metric_names)
    _check_keys(callback, "", state, GNS_KEYS, GNS_OPTIONAL_KEYS)
    saved_beta = state["beta"]
    if not _is_number(saved_beta) or float(saved_beta) != beta:
        raise _fail(callback, "beta", f"is {saved_beta!r}, but the state was stored under beta={beta!r}")
    validate_metric_states(callback, "metric.", state["metric"], names)
    layers = state.get("layer_metrics", {})
    if not isinstance(layers, Mapping):
        raise _fail(callback, "layer_metrics", f"must be a dict layer name -> states, got {type(layers).__name__}")
    for layer, states in layers.items():
        if not isinstance(layer, str):
            raise _fail(callback, "layer_metrics", f"has a layer name {layer!r} that is not a string")
        validate_metric_states(callback, f"layer_metrics.{layer}.", states, names)
    base = state.get("base_batch_size")
    if base is not None:
        if not isinstance(base, torch.Tensor) or base.numel() != 1:
            raise _fail(callback, "base_batch_size", f"must be None or a one-element tensor, got {base!r}")
        value = float(base)
        if not (math.isfinite(value) and value > 0):
            raise _fail(callback, "base_batch_size", f"is {value}, must be a positive finite batch size")
    if not isinstance(state.get("batch_size_fn", ""), str):
        raise _fail(callback, "batch_size_fn", f"must be the counting function's name, got {state['batch_size_fn']!r}")
    contributed = state.get("contributed")
    if contributed is not None and (
        not isinstance(contributed, list) or not all(isinstance(name, str) for name in contributed)
    ):
        raise _fail(callback, "contributed", f"must be None or a list of parameter names, got {contributed!r}")
    contributed_mode = state.get("contributed_mode")
    if contributed_mode not in (None, "per_example", "microbatch", "ddp"):
        raise _fail(callback, "contributed_mode", f"must be None or a mode name, got {contributed_mode!r}")


def _check_accumulation(callback: str, key: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise _fail(callback, key, f"is {value!r}, must be an int >= 1 (micro-batches per optimizer step)")


def _check_moments(callback: str, key: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise _fail(callback, key, f"must have shape {shape}, got {tuple(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise _fail(callback, key, "must be finite")
    weight = float(value[0])
    if not 0.0 <= weight <= 1.0:
        raise _fail(callback, key, f"has weight {weight}, must lie in [0, 1] (it is 1 - beta^steps)")


def _check_factor(callback: str, key: str, value: Any) -> None:
    if not _is_number(value) or not (math.isfinite(value) and value > 0):
        raise _fail(callback, key, f"is {value!r}, must be a positive finite learning-rate factor")


def renamed_keys(state: Any, renamed: Mapping[str, str]) -> Any:
    """``state`` with the keys earlier versions saved under an old name under their new one.

    Left as it is when it is not a dict or already holds a new name (the checks then say what is wrong).
    """
    if not isinstance(state, Mapping) or any(new in state for new in renamed.values()):
        return state
    return {renamed.get(key, key): value for key, value in state.items()}


def validate_adaptive_state(state: Any, lr_scalings: Iterable[str], callback: str = "AdaptiveBatchSize") -> None:
    """The state of :meth:`AdaptiveBatchSize.state_dict`; raises ``ValueError`` naming the first bad key.

    Bounds are not checked here: an accumulation outside newly configured bounds is legal and is moved
    into them by the callback.
    """
    if not isinstance(state, Mapping):
        raise _fail(callback, "state", f"must be a dict, got {type(state).__name__}")
    _check_keys(callback, "", state, ADAPTIVE_KEYS, ADAPTIVE_OPTIONAL_KEYS)
    world_size = state.get("world_size")
    if world_size is not None and not (_is_int(world_size) and world_size >= 1):
        raise _fail(callback, "world_size", f"must be an int >= 1, got {world_size!r}")
    started = state["accumulation"] is not None
    if started or state["base_accumulation"] is not None:  # both None: saved before training started
        _check_accumulation(callback, "accumulation", state["accumulation"])
        _check_accumulation(callback, "base_accumulation", state["base_accumulation"])
    _check_factor(callback, "lr_factor", state["lr_factor"])
    pending = state.get("pending")
    if pending is not None:
        if not isinstance(pending, (tuple, list)) or len(pending) != 2:
            raise _fail(callback, "pending", f"is {pending!r}, must be None or (accumulation, lr_factor)")
        _check_accumulation(callback, "pending[0]", pending[0])
        _check_factor(callback, "pending[1]", pending[1])
    last = state.get("last_change_step")
    if last is not None and (not _is_int(last) or last < 0):
        raise _fail(callback, "last_change_step", f"is {last!r}, must be None or an optimizer step >= 0")
    micro = state.get("micro_batch_size")
    if micro is not None and not (_is_number(micro) and math.isfinite(micro) and micro >= 1):
        raise _fail(callback, "micro_batch_size", f"is {micro!r}, must be None or a finite number >= 1")
    for key in ("epoch_units", "epoch_micro_batches"):  # under DDP the ranks' means: not whole numbers
        value = state.get(key, 0)
        if not (_is_number(value) and math.isfinite(value) and value >= 0):
            raise _fail(callback, key, f"is {value!r}, must be a finite number >= 0")
    units_epoch = state.get("units_epoch")
    if units_epoch is not None and (not _is_int(units_epoch) or units_epoch < 0):
        raise _fail(callback, "units_epoch", f"is {units_epoch!r}, must be an int >= 0")
    history = state.get("history", [])
    if not isinstance(history, list):
        raise _fail(callback, "history", f"must be a list of changes, got {type(history).__name__}")
    for i, entry in enumerate(history):
        if not isinstance(entry, Mapping) or not {"step", "accumulation", "lr_factor"} <= set(entry):
            raise _fail(callback, f"history[{i}]", f"is {entry!r}, must be a dict with step, accumulation, lr_factor")
    decisions = state.get("decisions", [])
    if not isinstance(decisions, list) or not all(isinstance(entry, Mapping) for entry in decisions):
        raise _fail(callback, "decisions", "must be a list of dicts (one per decision step)")
    record = state.get("pending_record")
    if record is not None and not isinstance(record, Mapping):
        raise _fail(callback, "pending_record", f"is {record!r}, must be None or a dict")
    for key in ("estimate_moments", "last_ema"):
        values = state.get(key)
        if values is not None and not (
            isinstance(values, (list, tuple))
            and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        ):
            raise _fail(callback, key, f"is {values!r}, must be None or a list of finite numbers")
    if "lr_scaling" in state and state["lr_scaling"] not in tuple(lr_scalings):
        raise _fail(callback, "lr_scaling", f"is {state['lr_scaling']!r}, not one of {tuple(lr_scalings)}")


def parse_state_key(key: Any, qualname: str) -> dict[str, Any] | None:
    """The keyword arguments ``Callback._generate_state_key`` formatted into ``key`` (``None``: another callback).

    Lightning formats ``f"{qualname}{kwargs!r}"``, e.g. ``"GradientNoiseScale{'mode': 'auto', 'beta': 0.99}"``.
    """
    if not isinstance(key, str) or not key.startswith(qualname + "{"):
        return None
    try:
        parsed = ast.literal_eval(key[len(qualname) :])
    except (ValueError, SyntaxError):
        return None
    return parsed if isinstance(parsed, dict) else None


def foreign_states(
    callback_states: Mapping[Any, Any], qualname: str, own_key: str, current_keys: Iterable[Any]
) -> list[dict[str, Any]]:
    """Settings of the ``qualname`` states in a checkpoint that no current callback will load.

    Lightning hands a callback only the state saved under its own ``state_key``; one saved under another
    key (the same callback class with other settings) is dropped without a word.
    """
    if own_key in callback_states:
        return []
    taken = set(current_keys)
    found = []
    for key in callback_states:
        if key in taken:
            continue
        settings = parse_state_key(key, qualname)
        if settings is not None:
            found.append(settings)
    return found
