"""LoRA on a torchao-quantised tiny Llama under ``torch.autocast("cpu", dtype=torch.bfloat16)``,
and on a Llama quantised in bfloat16: forward and backward, against the float32 run.

Under autocast torchao's int8 linear computes in its weight's dtype (it handles ``F.linear``
before autocast sees it) and its int4 linear in bfloat16; the adapters keep float32 parameters
and gradients. Tolerances are relative (gradients: Frobenius); bfloat16 keeps 8 significant
bits (≈ 0.4 % per rounding).
"""

from __future__ import annotations

import pytest
import torch
from torchao_testutils import MAIN, ids, quantised_llama, rel

from adapt.core import AdaptedModel, adapt
from adapt.core.testing import randomise_adapters
from adapt.lora import LoraConfig

#: measured worst: loss 3.2e-5, LoRA gradients 1.2e-2 (a model quantised in bfloat16 against
#: the same model quantised in float32, whose codes differ: loss 7.2e-4)
LOSS_TOLERANCE = 1e-3
GRAD_TOLERANCE = 3e-2

#: a training step's loss and the gradients, by parameter name
Run = tuple[float, dict[str, torch.Tensor]]


def adapted(kind: str, dtype: torch.dtype = torch.float32) -> AdaptedModel:
    model = adapt(
        quantised_llama(kind, dtype=dtype),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    randomise_adapters(model, scale=0.03)
    return model.train()


def loss_and_grads(model: AdaptedModel) -> Run:
    model.zero_grad()
    loss = model(input_ids=ids(), labels=ids()).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def check_close(got: Run, want: Run) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert abs(loss - ref_loss) <= LOSS_TOLERANCE * abs(ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and grads
    assert all("lora_" in n for n in grads)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.dtype == torch.float32, name  # adapters stay float32
        assert rel(grad, ref_grads[name]) <= GRAD_TOLERANCE, name


@pytest.mark.parametrize("kind", MAIN)
def test_lora_trains_under_bfloat16_autocast(kind: str) -> None:
    model = adapted(kind)
    reference = loss_and_grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(model)
    check_close(got, reference)


@pytest.mark.parametrize("kind", MAIN)
def test_lora_trains_on_a_model_quantised_in_bfloat16(kind: str) -> None:
    model = adapted(kind, torch.bfloat16)
    layers = [layer for _, layer in model.adapter_layers()]
    assert all(layer.backend.compute_dtype(layer.base_layer) == torch.bfloat16 for layer in layers)
    got = loss_and_grads(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss_and_grads(model)
    check_close(under_autocast, got)
    # the same adapters on the float32-quantised model: bfloat16 rounding apart, the same run
    reference = adapted(kind)
    reference.load_state_dict(
        {k: v.float() for k, v in model.state_dict().items() if "lora_" in k}, strict=False
    )
    ref_loss, _ = loss_and_grads(reference)
    assert abs(got[0] - ref_loss) <= 3 * LOSS_TOLERANCE * abs(ref_loss)
