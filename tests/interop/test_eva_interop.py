"""EVA (``init_lora_weights="eva"``, ``initialize_lora_eva_weights``) against HF PEFT on a tiny
Llama: from identical base weights, the same config and the same batches (padding, masked
labels), both give the same per-layer ranks (rank-0 layers removed in both), the same
``lora_A`` (bit for bit here; asserted to 1e-4 relative), the same ``rank_pattern``,
``alpha_pattern`` and ``target_modules``; a state dict PEFT computed loads into adapt; and the
checkpoints load both ways with the same logits once ``lora_B`` is perturbed.

``whiten=True`` differs where PEFT has a bug: its components are views of one tensor shared by a
group of layers with equal inputs (q/k/v, gate/up), divided in place by √s once per layer of
the group whose rank covers the row; adapt divides each layer's rows once. Layers outside such
groups match; inside, PEFT's row i is adapt's times ``‖row_i‖^(m_i − 1)`` (``‖row_i‖ = 1/√s_i``,
``m_i`` the number of layers of the group with rank > i), which is asserted.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.tuners.lora.eva import get_eva_state_dict as peft_get_eva  # noqa: E402
from peft.tuners.lora.eva import initialize_lora_eva_weights as peft_init_eva  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.core.testing import tiny_llama, token_ids  # noqa: E402
from adapt.lora import EvaConfig, LoraConfig, LoraLinear, initialize_lora_eva_weights  # noqa: E402

pytestmark = pytest.mark.interop

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
CASES: dict[str, dict[str, Any]] = {
    "rho2": {"rho": 2, "tau": 0.9},
    "whiten": {"rho": 2, "tau": 0.9, "whiten": True},
    "rho1": {"rho": 1, "tau": 0.9},
    "no_adjust": {"rho": 2, "tau": 0.9, "adjust_scaling_factors": False},
}
REL = 1e-4


def batches() -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(4):
        ids = token_ids(4, 16, vocab_size=128, seed=10 + i)
        mask = torch.ones_like(ids)
        mask[0, 11:] = 0
        mask[1, 14:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[2, :3] = -100  # masked labels on real tokens: left out too
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


KW: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="eva")


def peft_model(case: str) -> Any:
    config = peft.LoraConfig(eva_config=peft.EvaConfig(**CASES[case]), **KW)
    return peft.get_peft_model(tiny_llama(), config)


def adapt_model(case: str) -> AdaptedModel:
    return adapt(tiny_llama(), LoraConfig(eva_config=EvaConfig(**CASES[case]), **KW))


@pytest.fixture(scope="module")
def initialised() -> dict[str, tuple[Any, AdaptedModel]]:
    return {}


def pair(cache: dict[str, tuple[Any, AdaptedModel]], case: str) -> tuple[Any, AdaptedModel]:
    if case not in cache:
        theirs = peft_model(case)
        peft_init_eva(theirs, batches(), show_progress_bar=False)
        ours = adapt_model(case)
        initialize_lora_eva_weights(ours, batches(), show_progress_bar=False)
        cache[case] = (theirs, ours)
    return cache[case]


def lora_a(model: nn.Module) -> dict[str, torch.Tensor]:
    """``lora_A`` by path below the base model (PEFT's names without ``base_model.model.``)."""
    out = {}
    for name, module in model.named_modules():
        table = getattr(module, "lora_A", None)
        if isinstance(table, nn.ModuleDict) and "default" in table:
            out[name.removeprefix("base_model.model.")] = table["default"].weight.detach()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def in_group(path: str) -> tuple[str, ...] | None:
    return next((g for g in GROUPS if path.split(".")[-1] in g), None)


def perturb(model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                gen = torch.Generator().manual_seed(len(name) * 7 + param.shape[1])
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**batches()[0]).logits
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_patterns_and_components_match_peft(
    case: str, initialised: dict[str, tuple[Any, AdaptedModel]]
) -> None:
    theirs, ours = pair(initialised, case)
    mine, ref = lora_a(ours), lora_a(theirs)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}
    if case == "rho1":
        assert len(mine) == 14 and all(v.shape[0] == 4 for v in mine.values())
    else:
        assert len({v.shape[0] for v in mine.values()}) > 1  # ranks were redistributed
    mine_cfg, ref_cfg = ours.peft_config["default"], theirs.peft_config["default"]
    assert mine_cfg.rank_pattern == ref_cfg.rank_pattern
    assert mine_cfg.alpha_pattern == ref_cfg.alpha_pattern
    assert mine_cfg.target_modules == list(ref_cfg.target_modules)
    for path, a in mine.items():
        if case != "whiten" or in_group(path) is None:
            assert rel(a, ref[path]) <= REL, (path, rel(a, ref[path]))
    for name, module in theirs.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            layer = ours.model.get_submodule(name.removeprefix("base_model.model."))
            assert layer.scaling["default"] == pytest.approx(module.scaling["default"])


def test_whiten_differs_only_by_peft_dividing_shared_rows_once_per_layer(
    initialised: dict[str, tuple[Any, AdaptedModel]],
) -> None:
    theirs, ours = pair(initialised, "whiten")
    mine, ref = lora_a(ours), lora_a(theirs)
    checked = 0
    for path, a in mine.items():
        group = in_group(path)
        if group is None:
            continue
        members = [f"{path.rsplit('.', 1)[0]}.{name}" for name in group]  # same block
        sizes = [mine[m].shape[0] if m in mine else 0 for m in members]
        m_i = torch.tensor([sum(s > i for s in sizes) for i in range(a.shape[0])])
        expected = a * a.norm(dim=1, keepdim=True) ** (m_i[:, None] - 1)
        assert rel(expected, ref[path]) <= REL, (path, rel(expected, ref[path]))
        checked += int(bool((m_i > 1).any()))
    assert checked > 0  # the difference is really exercised


def test_a_state_dict_computed_by_peft_loads_in_adapt() -> None:
    theirs = peft_model("rho2")
    computed = peft_get_eva(theirs, batches(), show_progress_bar=False)
    assert all(k.startswith("base_model.model.") for k in computed)
    ours = adapt_model("rho2")
    initialize_lora_eva_weights(ours, eva_state_dict=computed)
    reference = adapt_model("rho2")
    initialize_lora_eva_weights(reference, batches(), show_progress_bar=False)
    got, want = lora_a(ours), lora_a(reference)
    assert got.keys() == want.keys()
    assert all(rel(got[k], want[k]) <= REL for k in got)


@pytest.mark.parametrize("case", ["rho2", "no_adjust"])
def test_checkpoints_load_both_ways(
    case: str, initialised: dict[str, tuple[Any, AdaptedModel]], tmp_path: Path
) -> None:
    theirs, ours = pair(initialised, case)
    for model in (theirs, ours):
        perturb(model)
        model.eval()
    assert (logits(ours) - logits(tiny_llama())).abs().max() > 1e-3
    assert (logits(ours) - logits(theirs)).abs().max() < 1e-5
    ours.save_pretrained(tmp_path / "adapt")
    theirs.save_pretrained(tmp_path / "peft")
    saved = [
        json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("adapt", "peft")
    ]
    for key in ("rank_pattern", "alpha_pattern", "target_modules", "init_lora_weights"):
        assert saved[0][key] == saved[1][key], key
    in_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapt").eval()
    in_adapt = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert (logits(in_peft) - logits(ours)).abs().max() < 1e-5
    assert (logits(in_adapt) - logits(theirs)).abs().max() < 1e-5
    removed = [
        p
        for p, m in ours.model.named_modules()
        if p.endswith("_proj") and not isinstance(m, LoraLinear)
    ]
    assert removed  # a layer got rank 0 on this data: gone in both, and after loading
    for path in removed:
        assert not hasattr(in_peft.base_model.model.get_submodule(path), "lora_A")
        assert not hasattr(in_adapt.model.get_submodule(path), "lora_A")
    shapes = [
        {
            k: tuple(v.shape)
            for k, v in load_file(tmp_path / d / "adapter_model.safetensors").items()
        }
        for d in ("adapt", "peft")
    ]
    assert shapes[0] == shapes[1]


def test_peft_checkpoint_of_20_layers_with_a_rank_zero_layer(tmp_path: Path) -> None:
    build = partial(tiny_llama, num_hidden_layers=3)  # 21 targets
    config = peft.LoraConfig(eva_config=peft.EvaConfig(**CASES["rho2"]), **KW)
    theirs = peft.get_peft_model(build(), config)
    peft_init_eva(theirs, batches(), show_progress_bar=False)
    assert len(lora_a(theirs)) == 20  # one layer got rank 0
    assert isinstance(theirs.peft_config["default"].target_modules, set)  # shortened
    theirs.save_pretrained(tmp_path)
    # PEFT's shortened target_modules still match the rank-0 layer, which its checkpoint has no
    # tensors for: that layer drops the adapter on load (PEFT re-creates it with B = 0, the
    # same output)
    ours = AdaptedModel.from_pretrained(build(), tmp_path)
    assert len([p for p, layer in ours.adapter_set.layers()]) == 20
    ids = token_ids()
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-5)
