"""The transformers model inside an AdaptedModel refuses its own save_pretrained while adapter
layers are in it (the keys it would write do not load back), and saves again once they are out."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from lora_testutils import LLAMA_TARGETS, ids, tiny_llama

from adapt.core import adapt
from adapt.core.errors import AdapterStateError
from adapt.lora import LoraConfig


def test_inner_save_pretrained_is_refused_while_adapted(tmp_path: Path) -> None:
    inner = tiny_llama()
    model = adapt(inner, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    with pytest.raises(AdapterStateError, match=r"adapted\.save_pretrained\(dir\)"):
        inner.save_pretrained(tmp_path / "inner")
    assert not (tmp_path / "inner").exists()
    model.save_pretrained(tmp_path / "adapter")  # the adapter itself saves as always
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_copy_is_guarded_on_its_own(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    twin = copy.deepcopy(model)
    merged = twin.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")  # the copy's layers are gone: it saves
    with pytest.raises(AdapterStateError):
        model.get_base_model().save_pretrained(tmp_path / "still")  # the original still adapted


def test_after_merge_and_unload_the_model_saves_and_reloads(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
        want = model(input_ids=ids()).logits
    merged = model.merge_and_unload()
    assert "save_pretrained" not in merged.__dict__
    merged.save_pretrained(tmp_path / "merged")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids()).logits, want, rtol=1e-4, atol=1e-5)
