"""The fast paths of the adapter forward must compute the definition, and only run when safe:

* training: the adapter's B product, scale and sum fused into one kernel, in place on the
  output of a plain ``nn.Linear`` base (no new activation-sized tensor);
* no-grad inference over many rows: ``x (W + ΔW)ᵀ`` as one GEMM.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from adapt.core import AdapterLayer, adapt
from adapt.lora import LoraConfig, LoraLinear


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))


def _adapted(dropout: float = 0.0) -> Any:
    model = adapt(
        _net(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_dropout=dropout)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def _definition(model: Any, x: torch.Tensor) -> torch.Tensor:
    """base(x) + s·B(A x) per layer, written out by hand."""
    h = x
    for layer in (model.model[0], model.model[2]):
        base = layer.base_layer
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        h = base(h) + layer.scaling["default"] * (h @ a.T @ b.T)
        if layer is model.model[0]:
            h = torch.relu(h)
    return h


def test_training_forward_and_gradients_equal_the_definition() -> None:
    model = _adapted()
    model.train()
    x = torch.randn(3, 5, 32, requires_grad=True)
    out = model(x)
    torch.testing.assert_close(out, _definition(model, x), rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    got_x = x.grad.clone()
    model.zero_grad()
    x.grad = None
    _definition(model, x).square().sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and len(got) == 4
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(got_x, x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 32), (2, 3, 32), (2, 2, 3, 32)])
def test_in_place_on_2d_3d_and_other_inputs(shape: tuple[int, ...]) -> None:
    model = _adapted()
    x = torch.randn(*shape)
    torch.testing.assert_close(model(x), _definition(model, x), rtol=1e-5, atol=1e-6)


def test_a_forward_hook_on_the_base_still_sees_the_base_output() -> None:
    model = _adapted()
    seen: list[torch.Tensor] = []
    layer = model.model[0]
    layer.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out))
    x = torch.randn(4, 32)
    model(x)
    torch.testing.assert_close(seen[0], layer.base_layer(x))
    assert not layer.may_add_in_place(layer.base_layer(x))


def test_not_in_place_on_other_bases() -> None:
    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(MyLinear(8, 8))
    model = adapt(net, LoraConfig(r=2, target_modules=["0"]))
    layer = model.model[0]
    assert not layer.may_add_in_place(layer.base_layer(torch.randn(2, 8)))
    plain = adapt(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"]))
    assert plain.model[0].may_add_in_place(plain.model[0].base_layer(torch.randn(2, 8)))


def _count_merged_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = AdapterLayer._merged_weight_forward

    def spy(self: AdapterLayer, x: torch.Tensor, names: Any) -> torch.Tensor:
        calls.append(1)
        return real(self, x, names)

    monkeypatch.setattr(AdapterLayer, "_merged_weight_forward", spy)
    return calls


def test_no_grad_inference_over_many_rows_merges_on_the_fly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_merged_forwards(monkeypatch)
    model = _adapted().eval()
    x = torch.randn(4, 64, 32)  # 256 rows: building ΔW is cheaper than the adapter products
    with torch.no_grad():
        out = model(x)
    assert len(calls) == 2
    torch.testing.assert_close(out, _definition(model, x).detach(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4


def test_merged_on_the_fly_only_when_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_merged_forwards(monkeypatch)
    model = _adapted(dropout=0.3).eval()
    with torch.no_grad():
        model(torch.randn(1, 1, 32))  # one token (generation): unmerged
    assert calls == []
    model(torch.randn(4, 64, 32))  # gradients recorded: unmerged
    assert calls == []
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 64, 32))  # dropout active: unmerged
    assert calls == []
    model.eval()
    with torch.no_grad():
        model(torch.randn(4, 64, 32))
    assert len(calls) == 2


def test_merged_on_the_fly_with_several_adapters_and_disable() -> None:
    model = _adapted()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    model.set_adapter(["default", "other"])
    model.eval()
    x = torch.randn(4, 64, 32)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        fast = model(x)
    slow = reference(x)  # with grad: the unmerged path
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(x), _net()(x))  # the same seed: the base network


def test_subclasses_do_not_inherit_the_on_the_fly_merge() -> None:
    class Custom(LoraLinear):
        pass

    assert LoraLinear.__dict__["delta_weight_forward"] is True
    assert "delta_weight_forward" not in Custom.__dict__


def test_add_delta_weight_is_w_plus_delta() -> None:
    layer = _adapted().model[0]
    w = layer.base_layer.weight
    torch.testing.assert_close(
        layer.add_delta_weight(w, "default"), w + layer.delta_weight("default")
    )


def _fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from adapt.lora.lora_kernels import LoraLinearFunction

    calls: list[int] = []
    real = LoraLinearFunction.apply

    def spy(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(LoraLinearFunction, "apply", spy)
    return calls


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_fused_training_forward_with_trainable_bias(
    monkeypatch: pytest.MonkeyPatch, bias: str
) -> None:
    calls = _fused_calls(monkeypatch)
    model = adapt(_net(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], bias=bias))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.train()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 5, 32)
    model(x).square().sum().backward()
    assert len(calls) == 2  # both layers took the fused path
    monkeypatch.setattr(LoraLinear, "fused_forward", lambda self, x, name: None)
    reference(x).square().sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    assert any("bias" in n for n in got) == (bias != "none")
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_path_skipped_with_active_dropout_or_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fused_calls(monkeypatch)
    model = _adapted(dropout=0.2)
    model.train()
    model(torch.randn(2, 3, 32)).sum().backward()
    assert calls == []
    model = _adapted()
    model.train()
    model.model[0].base_layer.register_forward_pre_hook(lambda mod, args: None)
    model(torch.randn(2, 3, 32)).sum().backward()
    assert len(calls) == 1  # only the second layer
