"""Renamed public arguments and attributes: the old names still work, with a DeprecationWarning naming the new one."""

from __future__ import annotations

import pytest
import torch

from lightning_gns import AdaptiveBatchSize
from lightning_gns.batch_schedule import adascale_gain, lr_factor
from lightning_gns.forecasts import statistical_efficiency


def test_reference_batch_is_base_batch() -> None:
    new = lr_factor("adascale", 4.0, trace_cov=64.0, grad_sq_norm=1.0, base_batch=32.0)
    with pytest.warns(DeprecationWarning, match=r"lr_factor\(reference_batch=\.\.\.\) is deprecated: .* base_batch"):
        old = lr_factor("adascale", 4.0, trace_cov=64.0, grad_sq_norm=1.0, reference_batch=32.0)
    assert old == new == pytest.approx(2.0)
    with pytest.warns(DeprecationWarning, match=r"adascale_gain\(reference_batch=\.\.\.\)"):
        assert adascale_gain(30.0, 1.0, 3.0, reference_batch=10.0) == adascale_gain(30.0, 1.0, 3.0, base_batch=10.0)


def test_reference_batch_size_is_base_batch_size() -> None:
    batch, noise, base = torch.tensor(400.0), torch.tensor(100.0), torch.tensor(100.0)
    with pytest.warns(DeprecationWarning, match=r"statistical_efficiency\(reference_batch_size=\.\.\.\)"):
        old = statistical_efficiency(batch, noise, reference_batch_size=base)
    assert float(old) == float(statistical_efficiency(batch, noise, base_batch_size=base)) == pytest.approx(0.4)
    with pytest.raises(TypeError, match="missing 1 required argument: 'base_batch_size'"):
        statistical_efficiency(batch, noise)


def test_other_unknown_keywords_are_still_refused() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'base'"):
        lr_factor("sqrt", 4.0, base=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'reference'"):
        statistical_efficiency(torch.tensor(1.0), torch.tensor(1.0), reference=torch.tensor(1.0))


def test_reference_accumulation_is_base_accumulation() -> None:
    callback = AdaptiveBatchSize()
    callback.base_accumulation = 3
    with pytest.warns(DeprecationWarning, match=r"AdaptiveBatchSize.reference_accumulation is deprecated"):
        assert callback.reference_accumulation == 3
