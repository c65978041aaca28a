"""Long-run numerics: many merge/unmerge cycles, half-precision bases, overflow."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapt.core import AdapterStateError, adapt
from adapt.lora import LoraConfig


def lora_net(dtype: torch.dtype = torch.float32, seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(128, 96), nn.Linear(96, 64)).to(dtype)
    model = adapt(
        net, LoraConfig(r=8, lora_alpha=16, target_modules=["0", "1"], init_lora_weights=False)
    )
    return net, model


def test_thousand_merge_unmerge_cycles_stay_within_float32_round_off() -> None:
    net, model = lora_net()
    before = [layer.base_layer.weight.detach().clone() for layer in net]
    for _ in range(1000):
        model.merge_adapter()
        model.unmerge_adapter()
    eps = torch.finfo(torch.float32).eps
    for layer, w0 in zip(net, before, strict=True):
        drift = (layer.base_layer.weight - w0).abs().max().item()
        # one rounding of W + ΔW, undone: at most a couple of ulps of the largest weight,
        # and not growing with the number of cycles
        assert drift <= 2 * eps * (w0.abs().max().item() + 1), drift
    print(f"1000 cycles: max drift {drift:.3g}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_merges_without_overflow(dtype: torch.dtype) -> None:
    net, model = lora_net(dtype)
    # a large adapter: B A holds values whose half-precision product would be inexact
    with torch.no_grad():
        for layer in net:
            layer.lora_B["default"].weight.mul_(50)
    x = torch.randn(16, 128, dtype=dtype)
    with torch.no_grad():
        unmerged = model(x).float()
    before = [layer.base_layer.weight.detach().clone() for layer in net]
    report = model.merge_adapter(safe_merge=True)
    assert not report.lossy
    with torch.no_grad():
        merged = model(x).float()
    assert torch.isfinite(merged).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    rel = ((merged - unmerged).norm() / unmerged.norm()).item()
    assert rel < tol, rel
    model.unmerge_adapter()
    for layer, w0 in zip(net, before, strict=True):
        w = layer.base_layer.weight
        assert w.dtype == dtype
        ulp = torch.finfo(dtype).eps * (w0.float().abs() + layer.delta_weight("default").abs())
        assert ((w.float() - w0.float()).abs() <= ulp + 1e-7).all()
    for _ in range(100):
        model.merge_adapter()
        model.unmerge_adapter()
    for layer, w0 in zip(net, before, strict=True):
        drift = (layer.base_layer.weight.float() - w0.float()).abs().max().item()
        assert drift <= 2 * torch.finfo(dtype).eps * (w0.float().abs().max().item() + 50), drift


def test_safe_merge_refuses_a_float16_overflow() -> None:
    net, model = lora_net(torch.float16)
    with torch.no_grad():
        net[0].lora_B["default"].weight.fill_(1e3)
        net[0].lora_A["default"].weight.fill_(1e3)  # ΔW = 2 · 8 · 1e6 ≫ 65504
    before = net[0].base_layer.weight.detach().clone()
    with pytest.raises(AdapterStateError, match="beyond the weight's dtype"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(net[0].base_layer.weight, before)
    assert not net[0].merged
