"""Per-example gradients of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``, factored, from one batched replay.

torch has no vmap batching rule for the recurrent kernels, so the generic replay would run the layer once
per example. Instead the layer is run again, step by step, on the whole batch (the same equations as
PyTorch's, with the weights as constants), and one ``autograd.grad`` with the output gradients gives each
step's gate pre-activation gradients. Each weight's per-example gradient is then a sum over steps of outer
products, as for a Linear on a sequence: ``W_ih``: ``sum_t dgates_t x_t^T``, ``W_hh``:
``sum_t dgates'_t h_{t-1}^T``, ``W_hr`` (LSTM projections): ``sum_t dh_t m_t^T``; biases sum the gate
gradients. The factors go through the same Gram-or-materialise choice as every other layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gns.sources.per_example_factors import Dense, Factor, Materialized


def replays(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` running torch's own forward (the equations here)."""
    kind = next((k for k in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(module, k)), None)
    return kind is not None and type(module).forward is kind.forward and "forward" not in vars(module)


def rnn_factors(module: nn.RNNBase, x: Tensor, hx: Any, grads: list[Tensor | None]) -> dict[str, Factor]:
    """Factored per-example gradients of the layer's parameters, keyed by parameter name.

    ``x`` in the layer's own layout (3-D), ``hx`` the initial state as passed (always given: zeros when the
    call had none), ``grads`` the gradients of the flattened output (output, h_n[, c_n]) or None.
    """
    lstm = isinstance(module, nn.LSTM)
    directions = 2 if module.bidirectional else 1
    layout = (lambda t: t) if module.batch_first else (lambda t: t.transpose(0, 1))
    h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
    # Under autocast the input may come in half precision (another layer's output) beside float32 weights: the
    # replay, outside autocast, runs in the weights' dtype.
    first_weight = module.weight_ih_l0
    assert isinstance(first_weight, Tensor)
    dtype = first_weight.dtype
    x, h0 = x.to(dtype), h0.to(dtype)
    c0 = None if c0 is None else c0.to(dtype)
    probes: dict[str, Any] = {}  # name -> tensors whose gradients make the factors
    saved: dict[str, Any] = {}  # name -> the other side of each outer product
    finals_h, finals_c = [], []
    with torch.enable_grad():
        inp = layout(x)  # (B, T, in)
        steps = inp.shape[1]
        for layer in range(module.num_layers):
            outputs = []
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                weights = {
                    k: getattr(module, f"{k}{suffix}").detach()
                    for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
                    if hasattr(module, f"{k}{suffix}")
                }
                pre_ih = F.linear(inp, weights["weight_ih"], weights.get("bias_ih"))  # (B, T, G)
                if not pre_ih.requires_grad:
                    pre_ih.requires_grad_()
                state = layer * directions + direction
                h, c = h0[state], (c0[state] if c0 is not None else None)
                hidden_pre: list[Tensor] = []
                previous: list[Tensor] = []
                projected: list[Tensor] = []
                unprojected: list[Tensor] = []
                out: list[Tensor | None] = [None] * steps
                order = range(steps - 1, -1, -1) if direction else range(steps)
                for t in order:
                    previous.append(h)
                    pre_hh = F.linear(h, weights["weight_hh"], weights.get("bias_hh"))
                    if not pre_hh.requires_grad:
                        pre_hh.requires_grad_()
                    hidden_pre.append(pre_hh)
                    h, c = _cell(module, pre_ih[:, t], pre_hh, h, c)
                    if "weight_hr" in weights:
                        unprojected.append(h)
                        h = F.linear(h, weights["weight_hr"])
                        projected.append(h)
                    out[t] = h
                finals_h.append(h)
                if c is not None:
                    finals_c.append(c)
                outputs.append(torch.stack(out, dim=1))  # type: ignore[arg-type]
                probes[f"ih{suffix}"] = pre_ih
                probes[f"hh{suffix}"] = hidden_pre
                saved[f"ih{suffix}"] = inp.detach()
                saved[f"hh{suffix}"] = torch.stack(previous, dim=1).detach()
                if projected:
                    probes[f"hr{suffix}"] = projected
                    saved[f"hr{suffix}"] = torch.stack(unprojected, dim=1).detach()
            inp = torch.cat(outputs, dim=2) if directions > 1 else outputs[0]
        replayed = [layout(inp), torch.stack(finals_h)] + ([torch.stack(finals_c)] if lstm else [])
        # Under autocast the layer ran in half precision; the replay runs in the input's dtype.
        pairs = [(o, g.to(o.dtype)) for o, g in zip(replayed, grads, strict=True) if g is not None and o.requires_grad]
        names = list(probes)
        flat = [t for n in names for t in (probes[n] if isinstance(probes[n], list) else [probes[n]])]
        found = torch.autograd.grad(
            [o for o, _ in pairs], flat, [g for _, g in pairs], allow_unused=True, materialize_grads=True
        )
    factors: dict[str, Factor] = {}
    own = {n for n, _ in module.named_parameters()}
    at = 0
    for name in names:
        per_step = isinstance(probes[name], list)
        count = len(probes[name]) if per_step else 1
        # Per-step gradients in processing order, like the inputs they pair with (reversed in time for the
        # reverse direction), so the outer products match either way.
        delta = torch.stack(list(found[at : at + count]), dim=1) if per_step else found[at]
        at += count
        kind, suffix = name[:2], name[2:]
        factors[f"weight_{kind}{suffix}"] = Dense(delta, saved[name])
        if kind != "hr" and f"bias_{kind}{suffix}" in own:
            factors[f"bias_{kind}{suffix}"] = Materialized(delta.sum(dim=1))
    return factors


def _cell(
    module: nn.RNNBase, pre_ih: Tensor, pre_hh: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One step of the layer's equations (PyTorch's gate order) from the two pre-activations."""
    if isinstance(module, nn.LSTM):
        assert c is not None
        i, f, g, o = (pre_ih + pre_hh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if isinstance(module, nn.GRU):
        ih_r, ih_z, ih_n = pre_ih.chunk(3, dim=1)
        hh_r, hh_z, hh_n = pre_hh.chunk(3, dim=1)
        r, z = torch.sigmoid(ih_r + hh_r), torch.sigmoid(ih_z + hh_z)
        n = torch.tanh(ih_n + r * hh_n)
        return (1 - z) * n + z * h, None
    activation = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    return activation(pre_ih + pre_hh), None
