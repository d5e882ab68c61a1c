"""benchmarks/per_example_ablation.py switches off what it names, and leaves the gradients as autograd's."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_gns.sources import PerExampleSource, per_example, per_example_fused
from support.per_example_norms import pop_norms_by_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import per_example_ablation as ablation
from per_example import GPT, Shape, stdlib_text_batches

SHAPE = Shape(n_layer=2, d_model=32, n_head=2, seq_len=16, batch=4)


@pytest.fixture
def restore_source() -> Iterator[None]:
    # An ablation patches the classes for the rest of the process: put them back after each test.
    patched = [
        (per_example.PerExampleSource, ("_on_forward", "_on_fused_grad", "plan_fused")),
        (per_example_fused.LinearWithPerExampleGrads, ("backward",)),
        (per_example_fused.LayerNormWithPerExampleGrads, ("backward",)),
    ]
    saved = [(cls, name, cls.__dict__[name]) for cls, names in patched for name in names]
    yield
    for cls, name, value in saved:
        setattr(cls, name, value)


def layer_norms_and_grads() -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = GPT(SHAPE)
    tokens, targets = stdlib_text_batches(SHAPE, count=1, seed=0)[0]
    source = PerExampleSource()
    source.attach(model, model.parameters())
    source.recording = True
    source.expected_examples = SHAPE.batch
    F.cross_entropy(model(tokens).transpose(1, 2), targets).backward()
    _, layers = pop_norms_by_layer(source)
    source.detach()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {name: float(v.sum()) for name, v in layers.items()}, grads


def kind(layer: str) -> str:
    if layer.split(".")[-1].startswith("ln"):
        return "layernorm"
    return "embedding" if layer in ("wte", "wpe") else "linear"


@pytest.mark.parametrize("name", ["linear", "layernorm", "embedding", "all-layers", "hooks"])
def test_an_ablation_zeroes_what_it_names_and_keeps_the_gradients(name: str, restore_source: None) -> None:
    norms, grads = layer_norms_and_grads()
    assert set(map(kind, norms)) == {"linear", "layernorm", "embedding"} and all(v > 0 for v in norms.values())
    ablation.apply(name)
    ablated_norms, ablated_grads = layer_norms_and_grads()
    off = {"all-layers": {"linear", "layernorm", "embedding"}, "hooks": {"linear", "layernorm", "embedding"}}
    switched_off = off.get(name, {name})
    for layer, value in norms.items():
        if layer == "wte":  # tied to lm_head: its norm sums an embedding's use and a Linear's, and their cross term
            continue
        if kind(layer) in switched_off:
            assert ablated_norms.get(layer, 0.0) == 0.0, layer
        else:
            assert ablated_norms[layer] == pytest.approx(value, rel=1e-5), layer
    assert grads.keys() == ablated_grads.keys()
    for param, grad in grads.items():
        torch.testing.assert_close(ablated_grads[param], grad, rtol=1e-5, atol=1e-7, msg=param)


def test_an_unknown_ablation_is_refused() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        ablation.apply("attention")
