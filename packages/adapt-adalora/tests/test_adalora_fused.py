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
from adapt.core.testing import randomise_adapters


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
    model.zero_grad()
    batch = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = LowRankLinearFunction.apply

    def counting(*args: Any) -> Any:
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(LowRankLinearFunction, "apply", counting)
    return calls


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_step_equals_the_general_path(
    autocast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = count_calls(monkeypatch)
    loss, grads = step(model_of(), autocast)
    assert calls[0] == 2 * len(
        LLAMA_TARGETS
    )  # every layer of both blocks (autocast: bf16 inputs too)
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
def test_not_taken(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_of(lora_dropout=0.1) if case == "dropout" else model_of()
    calls = count_calls(monkeypatch)
    if case == "no_grad":
        with torch.no_grad():
            model(input_ids=ids())
    else:
        model(input_ids=ids(), labels=ids()).loss.backward()
    assert calls[0] == 0
