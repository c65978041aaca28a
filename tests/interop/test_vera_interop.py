"""VeRA interop with HF PEFT: bit-identical basis from the same key, same outputs for the same
λ values, checkpoints both ways with and without the saved projection."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.core.testing import tiny_gpt2, tiny_llama, token_ids  # noqa: E402
from adapt.vera import VeraConfig  # noqa: E402

pytestmark = pytest.mark.interop

TOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama() -> nn.Module:
    # the kit's tiny Llama, at transformers' default max_position_embeddings
    return tiny_llama(max_position_embeddings=2048)


CASES = {
    "llama": (llama, LLAMA_TARGETS),
    "gpt2": (tiny_gpt2, ["c_attn", "c_proj", "c_fc"]),
}


def _logits(model: nn.Module) -> torch.Tensor:
    ids = token_ids(2, 10, seed=5)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_vera_loads_in_adapt(case: str, save_projection: bool, tmp_path: Path) -> None:
    factory, targets = CASES[case]
    base = factory()
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.VeraConfig(
            r=8,
            target_modules=targets,
            save_projection=save_projection,
            init_weights=False,
            projection_prng_key=7,
        ),
    ).eval()
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(theirs.base_model.vera_A["default"], ours.base_model.vera_basis.A)
    assert torch.equal(theirs.base_model.vera_B["default"], ours.base_model.vera_basis.B)
    expected = _logits(theirs)
    diff = (_logits(ours) - expected).abs().max().item()
    print(f"vera {case} save_projection={save_projection}: PEFT→adapt max abs diff {diff:.3g}")
    assert diff <= TOL
    assert (expected - _logits(base)).abs().max().item() > 1e-3, "vacuous: adapter had no effect"


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_adapt_saved_vera_loads_in_peft(case: str, save_projection: bool, tmp_path: Path) -> None:
    factory, targets = CASES[case]
    base = factory()
    torch.manual_seed(2)
    ours = adapt(
        copy.deepcopy(base),
        VeraConfig(
            r=8,
            target_modules=targets,
            save_projection=save_projection,
            init_weights=False,
            projection_prng_key=7,
        ),
    ).eval()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    diff = (_logits(ours) - _logits(theirs)).abs().max().item()
    print(f"vera {case} save_projection={save_projection}: adapt→PEFT max abs diff {diff:.3g}")
    assert diff <= TOL
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ("base_model.vera_A" in keys) == save_projection
    assert ("base_model.vera_B" in keys) == save_projection
    peft_dir = tmp_path / "peft"
    peft.get_peft_model(
        copy.deepcopy(base),
        peft.VeraConfig(r=8, target_modules=targets, save_projection=save_projection),
    ).save_pretrained(peft_dir)
    assert keys == set(load_file(str(peft_dir / "adapter_model.safetensors")))


def test_same_key_gives_peft_basis_bit_for_bit() -> None:
    base = llama()
    for key in (0, 123):
        theirs = peft.get_peft_model(
            copy.deepcopy(base),
            peft.VeraConfig(r=16, target_modules=LLAMA_TARGETS, projection_prng_key=key),
        )
        ours = adapt(
            copy.deepcopy(base),
            VeraConfig(r=16, target_modules=LLAMA_TARGETS, projection_prng_key=key),
        )
        assert torch.equal(theirs.base_model.vera_A["default"], ours.base_model.vera_basis.A)
        assert torch.equal(theirs.base_model.vera_B["default"], ours.base_model.vera_basis.B)


def test_merged_vera_matches_peft(tmp_path: Path) -> None:
    base = llama()
    torch.manual_seed(3)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.VeraConfig(r=8, target_modules=LLAMA_TARGETS, init_weights=False)
    )
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path)
    diff = (
        (_logits(ours.merge_and_unload().eval()) - _logits(theirs.merge_and_unload().eval()))
        .abs()
        .max()
        .item()
    )
    print(f"vera merged model vs PEFT merged: max abs diff {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("case", ["declared-basis", "lower-r-second"])
def test_adapt_vera_beyond_peft_still_loads_in_peft(case: str, tmp_path: Path) -> None:
    """Adapters PEFT could not have built (a basis declared larger, or a second adapter with a
    lower r) are saved with their projection, and PEFT loads them with the same outputs."""
    base = llama()
    if case == "declared-basis":
        ours = adapt(
            copy.deepcopy(base),
            VeraConfig(r=8, target_modules=LLAMA_TARGETS, basis_shape=(32, 256, 256)),
        )
        name = "default"
    else:
        ours = adapt(copy.deepcopy(base), VeraConfig(r=32, target_modules=LLAMA_TARGETS))
        ours.add_adapter("small", VeraConfig(r=4, target_modules=LLAMA_TARGETS))
        ours.set_adapter("small")
        name = "small"
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in sorted(ours.named_parameters()):
            if "vera_lambda" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    ours.eval()
    want = _logits(ours)
    ours.save_pretrained(tmp_path, selected_adapters=[name])
    folder = tmp_path if name == "default" else tmp_path / name
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    diff = (_logits(theirs) - want).abs().max().item()
    print(f"vera {case}: adapt-saved, loaded in PEFT: max abs diff {diff:.3g}")
    assert diff <= TOL


def _autocast_step(model: nn.Module, ids: torch.Tensor, autocast: bool) -> tuple[float, dict]:
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def test_bf16_autocast_step_matches_peft() -> None:
    """The same λ in both (trained-like, non-zero), one step under bf16 autocast: adapt's loss
    and λ gradients (the folded-λ node) are as close to PEFT's float32 step as PEFT's own
    bf16-autocast step is (both round to bfloat16, in different orders)."""
    base = llama()
    config = {"r": 16, "target_modules": LLAMA_TARGETS, "init_weights": False}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.VeraConfig(**config)).train()
    ours = adapt(copy.deepcopy(base), VeraConfig(**config)).train()
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for name, param in theirs.named_parameters():
            if "vera_lambda" in name:
                param.normal_(std=0.5)
                mine[name].copy_(param)
    ids = token_ids(4, 24, seed=5)
    ref_loss, ref = _autocast_step(theirs, ids, autocast=False)
    peft_loss, peft_grads = _autocast_step(theirs, ids, autocast=True)
    loss, grads = _autocast_step(ours, ids, autocast=True)
    assert grads.keys() == ref.keys() and len(grads) == 2 * 2 * len(LLAMA_TARGETS)
    print(f"vera bf16 step: loss adapt {loss:.5f}, peft {peft_loss:.5f}, fp32 {ref_loss:.5f}")
    assert abs(loss - ref_loss) <= max(2 * abs(peft_loss - ref_loss), 5e-3 * abs(ref_loss))
    worst = max(_rel(grads[n], ref[n]) for n in ref)
    peft_worst = max(_rel(peft_grads[n], ref[n]) for n in ref)
    print(f"vera bf16 step: worst λ-gradient error adapt {worst:.3g}, peft {peft_worst:.3g}")
    assert worst <= max(2 * peft_worst, 2e-2)
