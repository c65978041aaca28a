"""``add_weighted_adapter`` on real bitsandbytes 8-bit and 4-bit bases: the combination reads
only the adapters (the quantised storage is untouched), gives the exact weighted sum for
``cat`` and full-rank ``svd``, combines DoRA magnitudes against the dequantised weight's norms,
and the result saves and reloads like any adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from bnb_testutils import MAIN_KINDS, llama_folder, load_llama, quantised_net, raw_storage

from adapt.core import AdaptedModel, adapt
from adapt.lora import LoraConfig


def two_adapters(kind: str, **extra: Any) -> AdaptedModel:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(target_modules=["up", "down"], init_lora_weights=False, **extra)
    model = adapt(quantised_net(kind), LoraConfig(r=4, lora_alpha=8, **kw))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, **kw))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "magnitude" in name:
                param.mul_(1 + 0.1 * torch.rand_like(param))
    return model


def storages(model: AdaptedModel) -> dict[str, dict[str, torch.Tensor]]:
    return {path: raw_storage(layer.get_base_layer()) for path, layer in model.adapter_layers()}


def same_storage(a: dict[str, dict[str, torch.Tensor]], b: dict[str, Any]) -> bool:
    return all(torch.equal(a[p][k], b[p][k]) for p in a for k in a[p])


@pytest.mark.parametrize("kind", MAIN_KINDS)
@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_exact_types_on_a_quantised_base(kind: str, combination: str) -> None:
    model = two_adapters(kind)
    before = storages(model)
    model.add_weighted_adapter(["default", "b"], [0.6, -0.3], "mix", combination, svd_rank=6)
    assert same_storage(before, storages(model))
    for _, layer in model.adapter_layers():
        want = 0.6 * layer.delta_weight("default") - 0.3 * layer.delta_weight("b")
        got = layer.delta_weight("mix")
        assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item() + 1e-7


@pytest.mark.parametrize("kind", MAIN_KINDS)
def test_dora_magnitudes_use_the_dequantised_norms(kind: str) -> None:
    model = two_adapters(kind, use_dora=True)
    weights = [0.8, 0.5]  # not summing to 1: m₀ (the dequantised weight's row norms) enters
    model.add_weighted_adapter(["default", "b"], weights, "mix", "cat")
    for _, layer in model.adapter_layers():
        m = layer.lora_magnitude_vector
        m0 = layer.backend.get_weight(layer.get_base_layer()).float().norm(dim=1)
        want = m0 + weights[0] * (m["default"] - m0) + weights[1] * (m["b"] - m0)
        assert (m["mix"] - want).abs().max().item() < 1e-5 * want.abs().max().item()


def test_combined_adapter_on_a_4bit_transformers_model_saves_and_reloads(tmp_path: Path) -> None:
    folder = llama_folder(tmp_path / "base")
    try:
        load_llama(folder, "nf4")
    except AttributeError as exc:  # transformers 4.46 cannot load bnb models on the CPU
        import transformers

        pytest.skip(f"transformers {transformers.__version__} cannot load bnb on the CPU: {exc}")
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = adapt(load_llama(folder, "nf4"), LoraConfig(r=4, **kw))
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=4, **kw))
    model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "mix", "svd", svd_rank=4)
    model.set_adapter("mix")
    ids = torch.arange(12).view(2, 6) % 60
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "out", selected_adapters=["mix"])
    reloaded = AdaptedModel.from_pretrained(load_llama(folder, "nf4"), tmp_path / "out" / "mix")
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max().item() < 1e-5
