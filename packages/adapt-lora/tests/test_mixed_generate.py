"""``generate(adapter_names=...)``: one LoRA adapter per sample through greedy decoding, with
the KV cache (prefill and every decoding step see the same routing) and without it, on a
Llama (``nn.Linear``) and a GPT-2 (transformers ``Conv1D``); equal-length prompts and
left-padded prompts of different lengths with an attention mask."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lora_testutils import ids, tiny_gpt2, tiny_llama  # noqa: E402

from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

#: one adapter per sample; "c" is loaded but routed to no sample
ROUTE = ["a", "b", "__base__", "a"]
NEW = 8  # new tokens per sample
PAD = 0
#: prompt lengths of the left-padded batch (the longest sets the width)
LENGTHS = [6, 3, 5, 4]
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
BUILDERS: dict[str, Callable[..., Any]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _model(arch: str) -> AdaptedModel:
    """The tiny model with adapters a (r4), b (r2) and c (r4), none of them a no-op."""
    torch.manual_seed(7)
    targets = TARGETS[arch]
    model = adapt(
        BUILDERS[arch](),
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        adapter_name="a",
    )
    model.add_adapter(
        "b", LoraConfig(r=2, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    model.add_adapter(
        "c", LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    return model.eval()


def _prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(input_ids, attention_mask, prompts)``: the batch of 4 (left-padded with ``PAD`` when
    ``padded``) and each sample's own unpadded prompt."""
    full = ids(batch=len(ROUTE), length=max(LENGTHS))
    lengths = LENGTHS if padded else [max(LENGTHS)] * len(ROUTE)
    mask = torch.zeros_like(full)
    batch = torch.full_like(full, PAD)
    prompts = []
    for row, n in enumerate(lengths):
        batch[row, -n:] = full[row, :n]
        mask[row, -n:] = 1
        prompts.append(full[row : row + 1, :n])
    return batch, mask, prompts


def _generate(model: Any, input_ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> Any:
    """Greedy decoding of ``NEW`` tokens (no early stop at an eos), with scores and logits."""
    kw.setdefault("use_cache", True)
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=PAD,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            **kw,
        )


def _alone(model: AdaptedModel, prompt: torch.Tensor, name: str) -> torch.Tensor:
    """The new tokens of one sample generated alone, ``name`` active (or no adapter)."""
    mask = torch.ones_like(prompt)
    if name == "__base__":
        with model.disable_adapter():
            out = _generate(model, prompt, mask)
    else:
        model.set_adapter(name)
        out = _generate(model, prompt, mask)
    return out.sequences[0, prompt.shape[1] :]


ARCHS = pytest.mark.parametrize("arch", ["llama", "gpt2"])
PADDING = pytest.mark.parametrize("padded", [False, True], ids=["equal-lengths", "left-padded"])


@ARCHS
@PADDING
def test_each_sample_generates_what_it_generates_alone(arch: str, padded: bool) -> None:
    model = _model(arch)
    batch, mask, prompts = _prompts(padded)
    mixed = _generate(model, batch, mask, adapter_names=ROUTE)
    new = mixed.sequences[:, batch.shape[1] :]
    assert new.shape == (len(ROUTE), NEW)
    for row, (prompt, name) in enumerate(zip(prompts, ROUTE, strict=True)):
        assert torch.equal(new[row], _alone(model, prompt, name)), (row, name)
    # the adapters matter: each adapted sample differs from its own prompt's base decoding
    for row in (0, 1, 3):
        assert not torch.equal(new[row], _alone(model, prompts[row], "__base__")), row


@ARCHS
@PADDING
def test_base_rows_are_bitwise_the_disabled_model(arch: str, padded: bool) -> None:
    """The ``__base__`` sample of a mixed batch computes exactly what the same batch computes
    with every adapter disabled: tokens, scores and logits, bit for bit."""
    model = _model(arch)
    batch, mask, _ = _prompts(padded)
    mixed = _generate(model, batch, mask, adapter_names=ROUTE)
    with model.disable_adapter():
        base = _generate(model, batch, mask)
    row = ROUTE.index("__base__")
    got, want = mixed.sequences[row], base.sequences[row]
    assert torch.equal(got, want)
    for step in range(NEW):
        got, want = mixed.scores[step][row], base.scores[step][row]
        assert torch.equal(got, want), step
        got, want = mixed.logits[step][row], base.logits[step][row]
        assert torch.equal(got, want), step
    # and the adapted samples are not the base model's
    assert not torch.equal(mixed.logits[0][0], base.logits[0][0])


@ARCHS
@PADDING
def test_cache_on_and_off_give_the_same_tokens(arch: str, padded: bool) -> None:
    model = _model(arch)
    batch, mask, _ = _prompts(padded)
    cached = _generate(model, batch, mask, adapter_names=ROUTE, use_cache=True)
    uncached = _generate(model, batch, mask, adapter_names=ROUTE, use_cache=False)
    with_cache, without_cache = cached.sequences, uncached.sequences
    assert torch.equal(with_cache, without_cache)
    for step in range(NEW):
        torch.testing.assert_close(cached.logits[step], uncached.logits[step])


@ARCHS
def test_routing_ends_with_generate(arch: str) -> None:
    """After a mixed-batch generate, a plain generate runs the active adapter on every sample
    again (the routing does not outlive the call), and the active adapter is unchanged."""
    model = _model(arch)
    batch, mask, _ = _prompts(padded=True)
    model.set_adapter("b")
    before = _generate(model, batch, mask)
    _generate(model, batch, mask, adapter_names=ROUTE)
    assert model.active_adapter == "b"
    after = _generate(model, batch, mask)
    old_tokens, new_tokens = before.sequences, after.sequences
    assert torch.equal(old_tokens, new_tokens)
    for step in range(NEW):
        assert torch.equal(before.logits[step], after.logits[step])


@ARCHS
def test_generate_after_prepare_mixed_batches_for_compile(arch: str) -> None:
    """With the fixed-shape mixing of ``prepare_mixed_batches_for_compile()`` set up, a mixed
    generate still gives every sample its own adapter's tokens."""
    model = _model(arch)
    batch, mask, _ = _prompts(padded=True)
    want = _generate(model, batch, mask, adapter_names=ROUTE)
    model.prepare_mixed_batches_for_compile()
    got = _generate(model, batch, mask, adapter_names=ROUTE)
    got_tokens, want_tokens = got.sequences, want.sequences
    assert torch.equal(got_tokens, want_tokens)
    for step in range(NEW):
        torch.testing.assert_close(got.logits[step], want.logits[step])
