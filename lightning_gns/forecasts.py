"""What the measured noise scale forecasts for the batch size in use: pure tensor functions.

McCandlish et al. 2018 model one optimizer step at batch size ``B`` (with the learning rate tuned for
that batch) as making the progress of ``1 / (1 + B_noise / B)`` steps at an infinite batch. Over a run that
gives, per step (their eq. 2.11 and the lines after it):

- ``S / S_min = 1 + B_noise / B``: optimizer steps needed relative to the fewest possible (infinite
  batch). Near 1: the batch is large enough that more examples per step barely cut the step count.
- ``E / E_min = 1 + B / B_noise``: examples needed relative to the fewest possible (batch 1). Near 1:
  every example counts fully; 2 at ``B = B_noise``; large: most examples are wasted.

Pollux (Qiao et al. 2021) calls ``(B_noise + B_0) / (B_noise + B)`` the statistical efficiency of batch
``B`` relative to a base batch ``B_0``: the progress per example at ``B`` as a fraction of that at
``B_0``. It is 1 while the batch stays at ``B_0`` and falls below 1 as the batch grows past it.

``B_simple`` stands in for ``B_noise`` (they are equal when the Hessian is a multiple of the identity),
so these forecasts are as rough as ``B_simple`` itself; a too-small learning rate inflates it.

Kaplan et al. 2020 (eq. 5.3) fitted the critical batch of their transformer language models as a function
of the loss alone: ``B_crit(L) = B_* / L^(1 / alpha_B)`` tokens, ``B_* = 2e8``, ``alpha_B = 0.21``, with
``L`` the cross-entropy in nats per token. It is a published fit to their models and data, not a
measurement of yours.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gns._deprecation import renamed_argument

# Kaplan et al. 2020, eq. 5.3 and Table 1 ("B_* ~ 2e8 tokens, alpha_B ~ 0.21").
KAPLAN_B_STAR_TOKENS = 2.0e8
KAPLAN_ALPHA_B = 0.21


def steps_over_min(batch_size: Tensor, noise_scale: Tensor) -> Tensor:
    """``S / S_min = 1 + B_noise / B``: steps needed at batch ``B`` relative to an infinite batch.

    Example:
        >>> float(steps_over_min(torch.tensor(100.0), torch.tensor(300.0)))
        4.0
    """
    return 1 + noise_scale / batch_size


def examples_over_min(batch_size: Tensor, noise_scale: Tensor) -> Tensor:
    """``E / E_min = 1 + B / B_noise``: examples needed at batch ``B`` relative to the fewest any batch needs.

    ``E_min`` is the limit ``B -> 0``; batch 1 needs ``1 + 1 / B_noise`` times it.

    ``inf`` noise scale (no signal resolved yet) reads as 1: every example is still useful.

    Example:
        >>> round(float(examples_over_min(torch.tensor(100.0), torch.tensor(300.0))), 4)
        1.3333
    """
    return 1 + batch_size / noise_scale


def statistical_efficiency(
    batch_size: Tensor, noise_scale: Tensor, base_batch_size: Tensor | None = None, **renamed: Tensor
) -> Tensor:
    """Progress per example at ``B`` relative to ``B_0`` (Pollux): ``(B_noise + B_0) / (B_noise + B)``.

    ``base_batch_size`` is ``B_0`` (``reference_batch_size=``, its deprecated name, still works). An ``inf``
    noise scale (pure noise) reads as 1.

    Example:
        >>> round(float(statistical_efficiency(torch.tensor(400.0), torch.tensor(100.0), torch.tensor(100.0))), 4)
        0.4
    """
    old = renamed_argument("statistical_efficiency", renamed, "reference_batch_size", "base_batch_size")
    if old is not None:
        base_batch_size = old
    if base_batch_size is None:
        raise TypeError("statistical_efficiency() missing 1 required argument: 'base_batch_size'")
    efficiency = (noise_scale + base_batch_size) / (noise_scale + batch_size)
    return torch.where(noise_scale.isinf(), torch.ones_like(efficiency), efficiency)


def kaplan_critical_batch_tokens(loss_nats: Tensor) -> Tensor:
    """Kaplan et al. 2020's fit ``B_crit(L) = 2e8 / L^(1/0.21)`` tokens, for a language-model loss in nats.

    A published fit to their transformer language models (WebText2), not a measurement of your model.

    Example:
        >>> round(float(kaplan_critical_batch_tokens(torch.tensor(3.0, dtype=torch.float64))))
        1069114
    """
    return KAPLAN_B_STAR_TOKENS / loss_nats ** (1 / KAPLAN_ALPHA_B)


__all__ = [
    "KAPLAN_ALPHA_B",
    "KAPLAN_B_STAR_TOKENS",
    "examples_over_min",
    "kaplan_critical_batch_tokens",
    "statistical_efficiency",
    "steps_over_min",
]
