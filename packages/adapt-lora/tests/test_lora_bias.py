"""``lora_bias=True`` (a bias on ``lora_B``, PEFT's): the definition ``base + s·(B A x + b_B)`` on
every path (training, inference, merged-weight inference, autocast, mixed batches), merging into
the base bias and back, refusals (no base bias to merge into, embeddings, incompatible options)
that leave the model as it was, and checkpoints with PEFT's key ``lora_B.bias``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adapt.core import AdaptedModel, AdapterStateError, ConfigError, TargetError, adapt
from adapt.core.testing import (
    assert_mixed_batch_matches,
    randomise_adapters,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)
from adapt.lora import LoraConfig


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(12, 10)
        self.nobias = nn.Linear(10, 8, bias=False)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nobias(torch.relu(self.lin(x)))


def definition(layer: Any, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    base = layer.get_base_layer()
    a, b = layer.lora_A[name], layer.lora_B[name]
    s = layer.scaling[name]
    if isinstance(base, nn.Conv2d):
        return base(x) + s * b(a(x))
    return base(x) + s * (x @ a.weight.T @ b.weight.T + b.bias)


def config(**kw: Any) -> LoraConfig:
    kw.setdefault("target_modules", ["lin", "conv"])
    return LoraConfig(r=3, lora_alpha=6, lora_bias=True, **kw)


def test_the_bias_is_zero_at_init_and_trains() -> None:
    model = adapt(Net(), config())
    layer = model.model.lin
    assert torch.equal(layer.lora_B["default"].bias, torch.zeros(10))
    x = torch.randn(4, 12)
    assert torch.allclose(model(x), model.model.nobias(torch.relu(layer.base_layer(x))))
    model(x).sum().backward()
    assert layer.lora_B["default"].bias.grad is not None
    random = adapt(Net(), config(init_lora_weights=False)).model.lin.lora_B["default"].bias
    assert random.abs().max() > 0 and random.abs().max() <= 1 / 3**0.5


@pytest.mark.parametrize("mode", ["train", "no_grad", "autocast"])
def test_every_forward_path_adds_the_scaled_bias(mode: str) -> None:
    model = adapt(Net(), config())
    randomise_adapters(model, scale=0.3)
    layer, conv = model.model.lin, model.model.conv
    x, img = torch.randn(64, 12), torch.randn(2, 3, 5, 5)
    if mode == "no_grad":
        with torch.no_grad():
            got, want = layer(x), definition(layer, x)
            got_c, want_c = conv(img), definition(conv, img)
    elif mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, got_c = layer(x), conv(img)
        want, want_c = definition(layer, x), definition(conv, img)
    else:
        got, want = layer(x), definition(layer, x)
        got_c, want_c = conv(img), definition(conv, img)
    tol = 2e-2 if mode == "autocast" else 1e-6  # bf16 rounding of the products
    for out, ref in ((got, want), (got_c, want_c)):
        assert float((out.float() - ref).norm() / ref.norm()) < tol


def test_merge_adds_the_bias_into_the_base_bias_and_unmerge_takes_it_back() -> None:
    model = adapt(Net(), config())
    randomise_adapters(model, scale=0.3)
    layer = model.model.lin
    x = torch.randn(5, 12)
    expected = layer(x).detach()
    bias_before = layer.base_layer.bias.detach().clone()
    model.merge_adapter()
    assert torch.allclose(layer(x), expected, atol=1e-5)
    s = layer.scaling["default"]
    assert torch.allclose(layer.base_layer.bias, bias_before + s * layer.lora_B["default"].bias)
    model.unmerge_adapter()
    assert torch.allclose(layer.base_layer.bias, bias_before, atol=1e-6)
    merged = model.merge_and_unload()
    assert isinstance(merged.lin, nn.Linear)
    assert torch.allclose(merged.lin(x), expected, atol=1e-5)


def test_merging_into_a_layer_without_bias_is_refused_and_nothing_changes() -> None:
    model = adapt(Net(), config(target_modules=["lin", "nobias"]))
    randomise_adapters(model, scale=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(AdapterStateError, match="has no bias to merge it into"):
            call()
        after = model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in before.items())
        assert not model.model.lin.merged and not model.model.nobias.merged
    # without lora_bias the same layer merges
    plain = adapt(Net(), LoraConfig(r=3, target_modules=["nobias"]))
    plain.merge_adapter()


def test_refusals() -> None:
    for kw, match in (
        ({"use_dora": True}, "lora_bias=True works with"),
        ({"init_lora_weights": "pissa"}, "lora_bias=True works with"),
        ({"target_parameters": ["lin.weight"]}, "lora_bias=True works with"),
        ({"lora_bias": "yes"}, "lora_bias must be true or false"),
    ):
        with pytest.raises(ConfigError, match=match):
            LoraConfig(**{"r": 3, "lora_bias": True, "target_modules": ["lin"], **kw})
    base = tiny_llama()
    layout = [type(m).__name__ for m in base.modules()]
    with pytest.raises(TargetError, match="not supported on"):
        adapt(base, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], lora_bias=True))
    assert [type(m).__name__ for m in base.modules()] == layout


def test_mixed_batch_routes_the_bias_per_sample() -> None:
    model = adapt(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn", "c_proj"], lora_bias=True))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["c_attn", "c_proj"]))
    randomise_adapters(model, scale=0.2)
    ids = token_ids(batch=3)
    assert_mixed_batch_matches(model, ids, ["default", "plain", "__base__"])


def test_checkpoint_keys_and_round_trip(tmp_path: Path) -> None:
    model = adapt(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], lora_bias=True))
    randomise_adapters(model, scale=0.2)
    ids = token_ids()
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    bias_keys = [k for k in keys if k.endswith("lora_B.bias")]
    assert (
        bias_keys == ["base_model.model.transformer.h.0.attn.c_attn.lora_B.bias"]
        or len(bias_keys) == 2
    )
    assert keys[bias_keys[0]].shape == (192,)
    loaded = AdaptedModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert loaded.peft_config["default"].lora_bias is True
    assert torch.allclose(loaded(ids).logits, expected, atol=1e-6)
