"""``lora_bias=True`` against HF PEFT: checkpoints (``lora_B.bias``) load both ways with the same
logits, and merging gives the same model, on GPT-2 (``Conv1D`` with biases) and a Llama with
attention biases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.core.testing import randomise_adapters, tiny_gpt2, tiny_llama, token_ids  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

pytestmark = pytest.mark.interop

MODELS: dict[str, tuple[Any, list[str]]] = {
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
    "llama-bias": (
        lambda: tiny_llama(attention_bias=True),
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    ),
}


def _kw(targets: list[str]) -> dict[str, Any]:
    return dict(r=4, lora_alpha=8, target_modules=targets, lora_bias=True)


def _perturb(model: nn.Module) -> None:
    randomise_adapters(model, 3, 0.1, where=lambda name, _: "lora_" in name)


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_checkpoint_loads_in_adapt(name: str, tmp_path: Path) -> None:
    build, targets = MODELS[name]
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**_kw(targets)))
    _perturb(theirs)
    ids = token_ids()
    with torch.no_grad():
        expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path)
    assert any(k.endswith("lora_B.bias") for k in load_file(tmp_path / "adapter_model.safetensors"))
    ours = AdaptedModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, expected, atol=1e-5)
        merged_theirs = theirs.merge_and_unload()(ids).logits
        merged_ours = ours.merge_and_unload()(ids).logits
    assert torch.allclose(merged_ours, merged_theirs, atol=1e-5)
    assert torch.allclose(merged_ours, expected, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_adapt_checkpoint_loads_in_peft(name: str, tmp_path: Path) -> None:
    build, targets = MODELS[name]
    ours = adapt(build(), LoraConfig(**_kw(targets)))
    _perturb(ours)
    ids = token_ids()
    with torch.no_grad():
        expected = ours(ids).logits
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, expected, atol=1e-5)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    peft_dir = tmp_path / "peft"
    theirs.save_pretrained(peft_dir)
    again = load_file(peft_dir / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {
        k: tuple(v.shape) for k, v in again.items()
    }
