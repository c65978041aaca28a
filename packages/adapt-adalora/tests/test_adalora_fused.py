"""AdaLoRA's fused training path (one autograd node per layer, ``SVDLinear.fused_forward``):
the loss and every gradient (A, E, B, the input embeddings) equal the general path's, in float32
and under bf16 autocast; taken only where it applies."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from adalora_testutils import LLAMA_TARGETS, ids, llama

from adapt.adalora import AdaLoraConfig, SVDLinear
from adapt.core import adapt
from adapt.core.lowrank_linear import LowRankLinearFunction
from adapt.core.testing import counting_apply, loss_and_grads, randomise_adapters


def model_of(**kw: Any) -> Any:
    torch.manual_seed(0)
    cfg = AdaLoraConfig(
        init_r=6, target_r=3, total_step=50, target_modules=LLAMA_TARGETS, lora_alpha=12, **kw
    )
    model = adapt(llama(), cfg)
    randomise_adapters(model)  # E non-zero: every factor gets a gradient
    model.model.enable_input_require_grads()
    return model.train()


def step(model: Any, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    return loss_and_grads(model, ids(), torch.bfloat16 if autocast else None)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_step_equals_the_general_path(
    autocast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    with counting_apply(LowRankLinearFunction) as count:
        loss, grads = step(model_of(), autocast)
    assert count.calls == 2 * len(LLAMA_TARGETS)  # every layer of both blocks (bf16 inputs too)
    monkeypatch.setattr(SVDLinear, "fused_forward", lambda *a: None)
    ref_loss, ref = step(model_of(), autocast)
    tol = 2e-2 if autocast else 1e-5
    assert abs(loss - ref_loss) <= tol * max(1.0, abs(ref_loss))
    names = [n for n in ref if "lora_E" in n or "lora_A" in n or "lora_B" in n]
    assert grads.keys() == ref.keys() and len(names) == 3 * 2 * len(LLAMA_TARGETS)
    for name, want in ref.items():
        scale = max(1.0, want.abs().max().item())
        assert (grads[name] - want).abs().max().item() <= tol * scale, name


@pytest.mark.parametrize("case", ["no_grad", "dropout"])
def test_not_taken(case: str) -> None:
    model = model_of(lora_dropout=0.1) if case == "dropout" else model_of()
    with counting_apply(LowRankLinearFunction) as count:
        if case == "no_grad":
            with torch.no_grad():
                model(input_ids=ids())
        else:
            loss_and_grads(model, ids())
    assert count.calls == 0
