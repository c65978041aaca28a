"""``trainable_token_indices``: only the listed rows of the embedding train and change the
output; tied output heads follow; merge / unmerge / disable / delete / mixed batches / several
adapters; refusals that leave the model as it was; PEFT's checkpoint layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from adapt.core import AdaptedModel, ConfigError, TargetError, adapt
from adapt.core.testing import assert_mixed_batch_matches, tiny_llama
from adapt.lora import LoraConfig

IDS = torch.tensor([[1, 5, 7, 9, 2, 5], [3, 3, 1, 0, 7, 8]])


def config(tokens: Any = (1, 5, 7), **kw: Any) -> LoraConfig:
    kw.setdefault("target_modules", ["q_proj"])
    return LoraConfig(
        r=2, trainable_token_indices=list(tokens) if isinstance(tokens, tuple) else tokens, **kw
    )


def set_rows(model: AdaptedModel, value: float, name: str = "default") -> None:
    with torch.no_grad():
        model.model.model.embed_tokens.trainable_tokens_delta[name].fill_(value)


@pytest.mark.parametrize("tied", [False, True])
def test_only_the_listed_rows_change(tied: bool) -> None:
    base = tiny_llama(tie_word_embeddings=tied)
    weight = base.model.embed_tokens.weight.detach().clone()
    reference = base(IDS).logits
    model = adapt(base, config())
    assert torch.allclose(model(IDS).logits, reference, atol=1e-6)
    set_rows(model, 3.0)
    emb = model.model.model.embed_tokens
    out = emb(IDS)
    want = weight.clone()
    want[[1, 5, 7]] = 3.0
    assert torch.allclose(out, want[IDS], atol=1e-6)
    logits = model(IDS).logits
    logits.sum().backward()
    grad = emb.trainable_tokens_delta["default"].grad
    assert grad is not None and grad.shape == (3, 64)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    head = model.model.lm_head
    if tied:  # the head reads the same rows: logits of tokens 1, 5, 7 use the new rows
        assert head.trainable_tokens_delta["default"] is emb.trainable_tokens_delta["default"]
    else:
        assert type(head).__name__ == "Linear"


@pytest.mark.parametrize("tied", [False, True])
def test_merge_unmerge_disable_and_merge_and_unload(tied: bool) -> None:
    model = adapt(tiny_llama(tie_word_embeddings=tied), config())
    set_rows(model, 0.5)
    with torch.no_grad():
        expected = model(IDS).logits
        with model.disable_adapter():
            base_out = model(IDS).logits
        model.merge_adapter()
        assert torch.allclose(model(IDS).logits, expected, atol=1e-5)
        model.unmerge_adapter()
        assert torch.allclose(model(IDS).logits, expected, atol=1e-5)
        with model.disable_adapter():
            assert torch.allclose(model(IDS).logits, base_out, atol=1e-6)
        merged = model.merge_and_unload()
        assert torch.allclose(merged(IDS).logits, expected, atol=1e-5)
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied


def test_several_adapters_delete_and_mixed_batches() -> None:
    model = adapt(tiny_llama(), config())
    model.add_adapter("other", config((2, 3), target_modules=["v_proj"]))
    model.add_adapter("same", config((5,), target_modules=["v_proj"]))
    set_rows(model, 1.0)
    set_rows(model, -1.0, "other")
    assert_mixed_batch_matches(model, IDS, ["default", "other"])
    model.set_adapter(["default", "other"])  # disjoint tokens: both apply
    model(IDS)
    model.set_adapter(["default", "same"])
    with pytest.raises(Exception, match="train the same tokens"):
        model(IDS)
    model.set_adapter("default")
    model.delete_adapter("other")
    emb = model.model.model.embed_tokens
    assert list(emb.trainable_tokens_delta) == ["default", "same"]


def test_dict_form_and_an_output_head(tmp_path: Path) -> None:
    model = adapt(tiny_llama(), config({"embed_tokens": [1, 2], "lm_head": [3, 4, 5]}))
    with torch.no_grad():
        model.model.lm_head.trainable_tokens_delta["default"].add_(0.5)
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    keys = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert keys["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] == (
        2,
        64,
    )
    assert keys["base_model.model.lm_head.token_adapter.trainable_tokens_delta"] == (3, 64)
    loaded = AdaptedModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.allclose(loaded(IDS).logits, expected, atol=1e-6)


def test_tied_saves_one_tensor(tmp_path: Path) -> None:
    model = adapt(tiny_llama(tie_word_embeddings=True), config())
    set_rows(model, 2.0)
    expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    keys = [k for k in load_file(tmp_path / "adapter_model.safetensors") if "token" in k]
    assert keys == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    loaded = AdaptedModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path)
    assert torch.allclose(loaded(IDS).logits, expected, atol=1e-5)


def test_refusals_leave_the_model_as_it_was() -> None:
    base = tiny_llama(tie_word_embeddings=True)
    layout = [type(m).__name__ for m in base.modules()]
    for kw, error, match in (
        ({"tokens": [1, 200]}, ConfigError, "outside 0..127"),
        ({"tokens": [1, 1]}, ConfigError, "repeats"),
        ({"tokens": {"nothing_here": [1]}}, ConfigError, "matches no module"),
        ({"tokens": {"embed_tokens": [1], "lm_head": [2]}}, ConfigError, "share one weight"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, TargetError, "target module and also"),
        ({"modules_to_save": ["embed_tokens"]}, Exception, "modules_to_save|target"),
    ):
        tokens = kw.pop("tokens", (1, 5))
        with pytest.raises(error, match=match):
            adapt(base, config(tokens, **kw))
        assert [type(m).__name__ for m in base.modules()] == layout
    model = adapt(base, config())
    with pytest.raises(TargetError, match="cannot also be a LoRA target"):
        model.add_adapter("x", LoraConfig(r=2, target_modules=["embed_tokens"]))


@pytest.mark.parametrize("tied", [False, True])
def test_half_precision_embeddings_train_under_autocast(tied: bool) -> None:
    """A bf16 model trained under bf16 autocast: the delta rows are float32 (adapter weights of
    a half-precision base are, as in PEFT), the embedding's output keeps the model's dtype, the
    output at init is the base's, a step changes only the listed rows, and merge / unmerge give
    the unmerged output back."""
    base = tiny_llama(tie_word_embeddings=tied).to(torch.bfloat16)
    weight = base.model.embed_tokens.weight.detach().clone()
    reference = base(IDS).logits
    model = adapt(base, config())
    emb = model.model.model.embed_tokens
    delta = emb.trainable_tokens_delta["default"]
    assert delta.dtype == torch.float32
    assert emb(IDS).dtype == torch.bfloat16
    assert torch.equal(model(IDS).logits, reference)
    model.train()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert delta.grad is not None and torch.isfinite(delta.grad).all()
    optimiser.step()
    rows = emb(IDS.new_tensor([[0, 1, 2, 3, 5, 7, 8, 9]]))[0]
    changed = [(rows[i] != weight[t]).any().item() for i, t in enumerate([0, 1, 2, 3, 5, 7, 8, 9])]
    assert changed == [False, True, False, False, True, True, False, False]
    model.eval()
    with torch.no_grad():
        unmerged = model(IDS).logits
        model.merge_adapter()
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=2e-2, atol=2e-2)
        model.unmerge_adapter()
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=2e-2, atol=2e-2)
