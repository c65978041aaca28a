"""``AdaptedModel.adapter_layers()`` searches an adapter layer only through its ``base_layer``:
it finds exactly what a full ``named_modules`` walk finds, in the same order, on models with
many adapters, DoRA, embeddings, trainable tokens and ``modules_to_save``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from adapt.core import adapt
from adapt.core.layer import AdapterLayer
from adapt.core.testing import tiny_gpt2, tiny_llama
from adapt.lora import LoraConfig


def full_walk(root: torch.nn.Module) -> list[str]:
    return [p for p, m in root.named_modules() if isinstance(m, AdapterLayer)]


@pytest.mark.parametrize(
    "kw",
    [
        {"target_modules": ["q_proj", "v_proj", "down_proj"]},
        {"target_modules": ["q_proj", "embed_tokens"], "use_dora": True},
        {"target_modules": ["k_proj"], "modules_to_save": ["lm_head"]},
        {"target_modules": ["o_proj"], "trainable_token_indices": [1, 2]},
    ],
)
def test_the_walk_finds_what_named_modules_finds(kw: dict[str, Any]) -> None:
    model = adapt(tiny_llama(), LoraConfig(r=4, **kw), "a0")
    for i in range(1, 4):
        model.add_adapter(f"a{i}", LoraConfig(r=2 + i, **kw))
    found = [p for p, _ in model.adapter_layers()]
    assert found and found == full_walk(model.model)


def test_gpt2_conv1d() -> None:
    model = adapt(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_fc"]), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["c_proj"]))
    found = [p for p, _ in model.adapter_layers()]
    assert found and found == full_walk(model.model)
