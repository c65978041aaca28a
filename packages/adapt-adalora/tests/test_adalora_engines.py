"""Rank allocation refuses to prune on gradients it did not see (the engines themselves run for
real in tests/distributed: DeepSpeed ZeRO-2/3 through the Trainer, FSDP1, FSDP2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adalora_testutils import LLAMA_TARGETS, ids, llama
from safetensors.torch import load_file

from adapt.adalora import AdaLoraConfig, capture_deepspeed_gradients
from adapt.adalora.layer import kept_ranks
from adapt.core import AdaptedModel, AdapterStateError, adapt
from adapt.core.testing import randomise_adapters


def model(**kwargs: object) -> AdaptedModel:
    config = AdaLoraConfig(
        init_r=4, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=6,
        target_modules=LLAMA_TARGETS, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    adapted = adapt(llama(), config)
    randomise_adapters(adapted)
    return adapted


def step(adapted: AdaptedModel, opt: torch.optim.Optimizer) -> None:
    batch = ids()
    adapted(input_ids=batch, labels=batch).loss.backward()
    opt.step()


def test_allocation_without_gradients_is_refused() -> None:
    """After zero_grad (or where an engine holds the gradients) nothing can be scored: PEFT
    would score zero everywhere and prune every rank."""
    adapted = model()
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-3)
    step(adapted, opt)
    opt.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in adapted.adapter_state_dict("default").items()}
    with pytest.raises(AdapterStateError, match=r"found no gradient.*before optimizer.zero_grad"):
        adapted.update_and_allocate(0)
    after = adapted.adapter_state_dict("default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_all_zero_importance_never_prunes() -> None:
    """Gradients that are all zero leave every score at zero: refused, no rank is masked."""
    adapted = model()
    for p in adapted.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    adapted.update_and_allocate(0)
    adapted.update_and_allocate(1)  # warm-up: scores only
    with pytest.raises(AdapterStateError, match=r"importance is zero.*no rank was pruned"):
        adapted.update_and_allocate(2)  # the first masking step
    assert adapted.peft_config["default"].rank_pattern is None
    for layer_path, layer in adapted.adapter_layers():
        assert bool((layer.lora_E["default"] != 0).all()), layer_path


def test_kept_ranks_prunes_the_tensors_given() -> None:
    a, e, b = torch.randn(4, 8), torch.randn(4, 1), torch.randn(6, 4)
    kept = kept_ranks({"lora_A": a, "lora_E": e, "lora_B": b}, [True, False, True, False])
    assert torch.equal(kept["lora_A"], a[[0, 2]])
    assert torch.equal(kept["lora_E"], e[[0, 2]])
    assert torch.equal(kept["lora_B"], b[:, [0, 2]])


def test_budgeted_save_is_pruned_from_the_gathered_tensors(tmp_path: Path) -> None:
    """save_pretrained prunes what it gathered (state_dict= included), not the live layers."""
    adapted = model()
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-3)
    for s in range(6):
        step(adapted, opt)
        adapted.update_and_allocate(s)
        opt.zero_grad()
    adapted.save_pretrained(tmp_path / "plain")
    adapted.save_pretrained(tmp_path / "given", state_dict=adapted.state_dict())
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    given = load_file(str(tmp_path / "given" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in given.items()}
    assert any(v.shape[0] == 2 for k, v in plain.items() if k.endswith("lora_A"))
    assert all(torch.equal(plain[k], given[k]) for k in plain)


def test_capture_needs_a_deepspeed_optimizer() -> None:
    pytest.importorskip("deepspeed")
    adapted = model()
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(TypeError, match=r"DeepSpeed engine or its optimizer.*AdamW"):
        capture_deepspeed_gradients(adapted, opt)
