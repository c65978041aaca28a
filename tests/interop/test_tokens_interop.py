"""``trainable_token_indices`` against HF PEFT: the same checkpoint keys and shapes
(``<embedding>.token_adapter.trainable_tokens_delta``; nothing for a tied head), checkpoints
loading both ways with the same logits, and the same merged model; untied and tied embeddings,
list and dict forms."""

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
from adapt.core.testing import randomise_adapters, tiny_llama  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

pytestmark = pytest.mark.interop

IDS = torch.tensor([[1, 5, 7, 9, 2, 5], [3, 3, 1, 0, 7, 8]])
CASES: dict[str, tuple[bool, Any]] = {
    "list-untied": (False, [1, 5, 7]),
    "list-tied": (True, [1, 5, 7]),
    "dict-untied": (False, {"embed_tokens": [1, 2], "lm_head": [3, 4, 5]}),
}


def _kw(tokens: Any) -> dict[str, Any]:
    return dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=tokens
    )


def _perturb(model: nn.Module) -> None:
    randomise_adapters(
        model,
        4,
        0.2,
        where=lambda n, p: ("lora_" in n or "trainable_tokens_delta" in n) and p.requires_grad,
    )


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(folder / "adapter_model.safetensors").items()}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_checkpoint_loads_in_adapt(case: str, tmp_path: Path) -> None:
    tied, tokens = CASES[case]
    theirs = peft.get_peft_model(
        tiny_llama(tie_word_embeddings=tied), peft.LoraConfig(**_kw(tokens))
    )
    _perturb(theirs)
    with torch.no_grad():
        expected = theirs(IDS).logits
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(tiny_llama(tie_word_embeddings=tied), tmp_path)
    with torch.no_grad():
        assert torch.allclose(ours(IDS).logits, expected, atol=1e-4, rtol=1e-5)
        merged = ours.merge_and_unload()(IDS).logits
        assert torch.allclose(merged, theirs.merge_and_unload()(IDS).logits, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_adapt_checkpoint_loads_in_peft(case: str, tmp_path: Path) -> None:
    tied, tokens = CASES[case]
    ours = adapt(tiny_llama(tie_word_embeddings=tied), LoraConfig(**_kw(tokens)))
    _perturb(ours)
    with torch.no_grad():
        expected = ours(IDS).logits
    ours.save_pretrained(tmp_path / "adapt")
    theirs = peft.PeftModel.from_pretrained(
        tiny_llama(tie_word_embeddings=tied), tmp_path / "adapt"
    )
    with torch.no_grad():
        assert torch.allclose(theirs(IDS).logits, expected, atol=1e-4, rtol=1e-5)
    theirs.save_pretrained(tmp_path / "peft")
    assert _shapes(tmp_path / "adapt") == _shapes(tmp_path / "peft")
