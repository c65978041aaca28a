"""Quantised layers that no installed backend serves are refused at injection, never read as
dense: real optimum-quanto ``QLinear`` (an ``nn.Linear`` subclass whose weight is a quantised
tensor subclass reporting float32) and real torchao (a plain ``nn.Linear`` whose weight tensor was
swapped). Before this, merge "succeeded" with a zero error and the adapter was gone."""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import pytest
import torch
from torch import nn

from adapt.core import MergeReport, TargetError, adapt, backends, register_backend
from adapt.core.registry import GROUP_BACKENDS, get_registry
from adapt.lora import LoraConfig


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def quanto_net() -> nn.Sequential:
    quanto = pytest.importorskip("optimum.quanto")
    model = net()
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    return model


def torchao_net() -> nn.Sequential:
    quantization = pytest.importorskip("torchao.quantization")
    model = net()
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig())
    return model


def state(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


@pytest.fixture
def only_lora(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """adapt-lora alone: installed backend plugins (adapt-torchao, say) and the install hints
    of installed distributions hidden, so the refusal of an unserved weight is what is tested."""
    from adapt.core import backends
    from adapt.core.testing import isolated_registry
    from adapt.lora import METHOD, LoraLinear

    monkeypatch.setattr(backends, "_declared_hints", lambda: ())
    with isolated_registry() as registry:
        registry.register_method(METHOD)
        registry.register_layer(LoraLinear, name="lora-linear")
        yield


@pytest.mark.usefixtures("only_lora")
@pytest.mark.parametrize("make", [quanto_net, torchao_net], ids=["optimum-quanto", "torchao"])
def test_unknown_quantised_weight_is_refused_and_the_model_is_untouched(make) -> None:  # type: ignore[no-untyped-def]
    model = make()
    weight_type = type(model[0].weight)
    before = state(model)
    x = torch.randn(3, 32)
    with torch.no_grad():
        out = model(x)
    with pytest.raises(TargetError) as info:
        adapt(model, LoraConfig(r=4, target_modules=["0", "2"]))
    message = str(info.value)
    assert "cannot adapt '0'" in message  # the layer
    assert f"{type(model[0]).__module__}.{type(model[0]).__qualname__}" in message  # its type
    weight_name = f"{weight_type.__module__}.{weight_type.__qualname__}"
    assert weight_name in message  # the weight's type
    package = backends.install_hints().get(weight_name)
    if package is not None:  # a known quantiser (torchao): what to install
        assert f"install it with `pip install {package}`" in message
    else:  # an unknown one (optimum-quanto): why, and what to write
        assert "not a plain tensor" in message
        assert "'adapt.backends' entry point" in message
    assert state(model) == before  # nothing half-applied
    with torch.no_grad():
        assert torch.equal(model(x), out)


class QuantoBackend:
    """A minimal backend for optimum-quanto's QLinear: read the dequantised weight, write a merge
    back by requantising (what a real plugin would ship)."""

    base_types: ClassVar[tuple[type | str, ...]] = ("optimum.quanto.nn.qlinear.QLinear",)
    lossy: ClassVar[bool] = True

    def shape(self, base: nn.Module) -> tuple[int, int]:
        return base.in_features, base.out_features  # type: ignore[return-value]

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        return base.weight.dequantize()  # type: ignore[operator]

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        # a float weight, then quanto's own freeze() quantises it with the layer's qtype
        base.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        base.freeze()  # type: ignore[operator]
        error = (base.weight.dequantize() - weight).abs().max()  # type: ignore[operator]
        return MergeReport(float(error), float(error / weight.abs().max()), lossy=True)

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        return torch.float32


def test_a_backend_that_claims_the_type_serves_it() -> None:
    model, reference = quanto_net(), quanto_net()  # (quanto tensors cannot be deep-copied)
    register_backend(QuantoBackend(), name="test-quanto")
    try:
        adapted = adapt(model, LoraConfig(r=4, target_modules=["0", "2"]))
        with torch.no_grad():
            for p in adapted.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.1)
        x = torch.randn(3, 32)
        with torch.no_grad():
            before = reference(x)
            unmerged = adapted(x)
            merged = adapted.merge_and_unload()(x)
        assert (unmerged - before).abs().max() > 1e-2  # the adapter does something ...
        assert (merged - unmerged).abs().max() < 0.1 * (unmerged - before).abs().max()  # ... kept
    finally:
        get_registry().unregister(GROUP_BACKENDS, "test-quanto")
