"""LoRA on MoE expert parameters (``target_parameters``) against HF PEFT: checkpoints load both
ways with PEFT's exact keys and shapes (stacked r·E factors, nested ``base_layer`` for the
second parameter of a module), the same outputs and gradients, merging as PEFT merges, on tiny
Mixtral and Qwen3-MoE models built from configs and every expert kernel transformers has.

Adapters are built with ``init_lora_weights=False`` (B random too), so a layout mismatch
(which rows of A or columns of B belong to which expert) shows in the outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.core.parameter_layer import ParameterLayer  # noqa: E402
from adapt.core.testing import tiny_mixtral, tiny_qwen3_moe, token_ids  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

pytestmark = pytest.mark.interop

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
BUILDS: dict[str, Callable[..., nn.Module]] = {"mixtral": tiny_mixtral, "qwen3moe": tiny_qwen3_moe}
CASES = [(m, i) for m in BUILDS for i in ("eager", "grouped_mm", "batched_mm")]
KW: dict[str, Any] = dict(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=PARAMS
)


@pytest.fixture(autouse=True)
def _fused_experts() -> None:
    if not any(n.endswith("experts.gate_up_proj") for n, _ in tiny_mixtral().named_parameters()):
        pytest.skip("this transformers stores experts as Linear modules")


def base(model: str, impl: str) -> nn.Module:
    return BUILDS[model](experts_implementation=impl).eval()


def ids() -> torch.Tensor:
    return token_ids(2, 12, vocab_size=128, seed=1)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(input_ids=ids()).logits
    return out


def peft_model(model: str, impl: str) -> Any:
    torch.manual_seed(1)
    cfg = peft.LoraConfig(init_lora_weights=False, **KW)
    return peft.get_peft_model(base(model, impl), cfg).eval()


def adapt_model(model: str, impl: str) -> AdaptedModel:
    torch.manual_seed(1)
    return adapt(base(model, impl), LoraConfig(init_lora_weights=False, **KW)).eval()


@pytest.mark.parametrize("model,impl", CASES)
def test_peft_saved_adapter_loads_in_adapt(model: str, impl: str, tmp_path: Path) -> None:
    theirs = peft_model(model, impl)
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(base(model, impl), tmp_path)
    diff = (logits(ours) - logits(theirs)).abs().max().item()
    assert diff < 1e-5, diff
    assert (logits(ours) - logits(base(model, impl))).abs().max() > 1e-3


@pytest.mark.parametrize("model,impl", CASES)
def test_adapt_saved_adapter_loads_in_peft(model: str, impl: str, tmp_path: Path) -> None:
    ours = adapt_model(model, impl)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(model, impl), tmp_path).eval()
    assert (logits(ours) - logits(theirs)).abs().max().item() < 1e-5
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_parameters"] == PARAMS
    mine = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    peft_dir = tmp_path / "peft"
    peft_model(model, impl).save_pretrained(peft_dir)
    ref = {k: tuple(v.shape) for k, v in load_file(peft_dir / "adapter_model.safetensors").items()}
    assert mine == ref  # same keys (nesting included) and shapes
    peft_saved = json.loads((peft_dir / "adapter_config.json").read_text())
    assert set(peft_saved["target_modules"]) == set(saved["target_modules"])


@pytest.mark.parametrize("model,impl", [("mixtral", "grouped_mm"), ("qwen3moe", "eager")])
def test_gradients_match_peft(model: str, impl: str, tmp_path: Path) -> None:
    theirs = peft_model(model, impl)
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(base(model, impl), tmp_path, is_trainable=True)
    grads = []
    for m in (ours, theirs):
        m.train()
        m(input_ids=ids(), labels=ids()).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("model,impl", [("mixtral", "grouped_mm"), ("qwen3moe", "batched_mm")])
def test_merge_matches_peft(model: str, impl: str, tmp_path: Path) -> None:
    theirs = peft_model(model, impl)
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(base(model, impl), tmp_path)
    mine = ours.merge_and_unload()
    ref = theirs.merge_and_unload()
    assert not any(isinstance(m, ParameterLayer) for m in mine.modules())
    for (name, p), (name_ref, q) in zip(
        mine.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert name == name_ref
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
    assert (logits(mine) - logits(ref)).abs().max().item() < 1e-5
