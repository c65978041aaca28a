"""LoRA and VeRA interop with HF PEFT on the same bitsandbytes-quantised model (8-bit, 4-bit nf4,
4-bit fp4 with double quantisation, on the CPU): checkpoints load both ways and give the same
logits, and merging on either side gives a quantised model that still runs.

Both sides run the same bitsandbytes kernels for the base layers, so the logits should agree to
float32 round-off. Needs adapt-bnb (the quantised-layer backends) and bitsandbytes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")
pytest.importorskip("adapt.bnb")

from adapt.core import AdaptedModel, TargetError, adapt  # noqa: E402
from adapt.core.testing import randomise_adapters, tiny_llama, token_ids  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402
from adapt.vera import VeraConfig  # noqa: E402

pytestmark = pytest.mark.interop

TOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: name -> BitsAndBytesConfig kwargs
KINDS: dict[str, dict[str, Any]] = {
    "8bit": {"load_in_8bit": True},
    "nf4": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": torch.float32,
    },
    "fp4-dq": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": torch.float32,
    },
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(root)
    return root


def _load(folder: Path, kind: str) -> nn.Module:
    """A fresh quantised copy of the saved model (one per side, so neither sees the other)."""
    return transformers.LlamaForCausalLM.from_pretrained(
        folder,
        quantization_config=transformers.BitsAndBytesConfig(**KINDS[kind]),
        device_map="cpu",
    )


def _check_quantised(model: nn.Module, kind: str) -> None:
    """The base layers are bitsandbytes layers (under an adapter wrapper, if any)."""
    layer = model.model.layers[0].mlp.down_proj
    while hasattr(layer, "base_layer"):
        layer = layer.base_layer
    assert type(layer).__name__ == ("Linear8bitLt" if kind == "8bit" else "Linear4bit")


def _peft_config(method: str) -> Any:
    if method == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return peft.VeraConfig(r=16, target_modules=TARGETS, projection_prng_key=7)


def _adapt_config(method: str) -> Any:
    if method == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return VeraConfig(r=16, target_modules=TARGETS, projection_prng_key=7)


def _perturb(model: nn.Module, seed: int, scale: float = 0.1) -> int:
    """Random values for every LoRA matrix and VeRA scaling vector (λ_b starts at 0)."""
    count = randomise_adapters(
        model, seed, scale, where=lambda name, _: "lora_" in name or "vera_lambda" in name
    )
    assert count > 0, "no adapter parameters found"
    return count


def _ids() -> torch.Tensor:
    return token_ids(2, 12, seed=5)


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().item())


def _check_vera_basis(theirs: Any, ours: AdaptedModel) -> None:
    assert torch.equal(theirs.base_model.vera_A["default"], ours.base_model.vera_basis.A)
    assert torch.equal(theirs.base_model.vera_B["default"], ours.base_model.vera_basis.B)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", ["lora", "vera"])
def test_peft_saved_adapter_on_quantised_model_loads_in_adapt(
    folder: Path, method: str, kind: str, tmp_path: Path
) -> None:
    torch.manual_seed(1)
    theirs = peft.get_peft_model(_load(folder, kind), _peft_config(method))
    _check_quantised(theirs.base_model.model, kind)
    if method == "vera":
        _perturb(theirs, seed=11)
    theirs.eval()
    theirs.save_pretrained(tmp_path)

    ours = AdaptedModel.from_pretrained(_load(folder, kind), tmp_path).eval()
    _check_quantised(ours.model, kind)
    if method == "vera":
        _check_vera_basis(theirs, ours)
    expected = _logits(theirs)
    got = _logits(ours)
    diff = _max_diff(got, expected)
    print(f"{method} {kind}: PEFT-saved adapter in adapt, max abs diff {diff:.3g}")
    assert torch.isfinite(expected).all()
    assert diff <= TOL
    with theirs.disable_adapter():
        base = _logits(theirs)
    assert _max_diff(expected, base) > 1e-3, "adapter had no effect: test is vacuous"


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", ["lora", "vera"])
def test_adapt_saved_adapter_on_quantised_model_loads_in_peft(
    folder: Path, method: str, kind: str, tmp_path: Path
) -> None:
    torch.manual_seed(2)
    ours = adapt(_load(folder, kind), _adapt_config(method))
    _check_quantised(ours.model, kind)
    _perturb(ours, seed=12)
    ours.eval()
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(_load(folder, kind), tmp_path).eval()
    _check_quantised(theirs.base_model.model, kind)
    if method == "vera":
        _check_vera_basis(theirs, ours)
    expected = _logits(ours)
    got = _logits(theirs)
    diff = _max_diff(got, expected)
    print(f"{method} {kind}: adapt-saved adapter in PEFT, max abs diff {diff:.3g}")
    assert torch.isfinite(expected).all()
    assert diff <= TOL
    with ours.disable_adapter():
        base = _logits(ours)
    assert _max_diff(expected, base) > 1e-3, "adapter had no effect: test is vacuous"
    # PEFT read every tensor adapt wrote and needed no other: it writes back the same keys
    from safetensors.torch import load_file

    peft_dir = tmp_path / "peft"
    theirs.save_pretrained(peft_dir)
    ours_keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    peft_keys = set(load_file(str(peft_dir / "adapter_model.safetensors")))
    assert ours_keys == peft_keys, ours_keys ^ peft_keys


@pytest.mark.parametrize("kind", ["8bit", "nf4"])
def test_merged_lora_on_quantised_model_vs_peft(folder: Path, kind: str, tmp_path: Path) -> None:
    """Merging requantises, so the merged models differ from the unmerged ones (and from each
    other, if the two libraries requantise differently); only soundness is asserted.

    The models stay in train mode (outputs under ``torch.no_grad``) so that bitsandbytes never
    repacks a 4-bit weight for its CPU kernel before the merge: PEFT mis-merges a repacked one.
    """
    torch.manual_seed(3)
    theirs = peft.get_peft_model(_load(folder, kind), _peft_config("lora"))
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(_load(folder, kind), tmp_path)
    theirs.train()
    ours.train()
    unmerged_theirs = _logits(theirs)
    unmerged_ours = _logits(ours)
    diff = _max_diff(unmerged_ours, unmerged_theirs)
    assert diff <= TOL, f"unmerged outputs differ by {diff:.3g}"

    merged_theirs = theirs.merge_and_unload().train()
    merged_ours = ours.merge_and_unload().train()
    _check_quantised(merged_theirs, kind)
    _check_quantised(merged_ours, kind)
    out_theirs = _logits(merged_theirs)
    out_ours = _logits(merged_ours)
    change_theirs = _max_diff(out_theirs, unmerged_theirs)
    change_ours = _max_diff(out_ours, unmerged_ours)
    between = _max_diff(out_ours, out_theirs)
    print(
        f"lora {kind} merged: adapt vs PEFT max abs diff {between:.3g}; change vs unmerged: "
        f"adapt {change_ours:.3g}, PEFT {change_theirs:.3g}"
    )
    assert torch.isfinite(out_theirs).all()
    assert torch.isfinite(out_ours).all()
    if kind == "8bit":
        assert change_ours <= 1.5 * change_theirs + 1e-3


FOUR_BIT = {
    "nf4": KINDS["nf4"],
    "nf4-dq": {**KINDS["nf4"], "bnb_4bit_use_double_quant": True},
    "fp4": {**KINDS["fp4-dq"], "bnb_4bit_use_double_quant": False},
    "fp4-dq": KINDS["fp4-dq"],
}


@pytest.mark.parametrize("kind", sorted(FOUR_BIT))
def test_4bit_merge_after_eval_inference_vs_peft(folder: Path, kind: str, tmp_path: Path) -> None:
    """PEFT trap: bitsandbytes repacks a 4-bit weight for its CPU kernel on the first eval
    forward; merging after that must not corrupt the model. adapt's change in outputs is the
    same as when merging without prior inference; PEFT's is reported next to it."""

    def load(kind: str) -> nn.Module:
        return transformers.LlamaForCausalLM.from_pretrained(
            folder,
            quantization_config=transformers.BitsAndBytesConfig(**FOUR_BIT[kind]),
            device_map="cpu",
        )

    source = peft.get_peft_model(load(kind), _peft_config("lora"))
    _perturb(source, seed=21)
    source.save_pretrained(tmp_path)

    def change(lib: str, infer_first: bool) -> float:
        base = load(kind)
        if lib == "peft":
            model = peft.PeftModel.from_pretrained(base, tmp_path)
        else:
            model = AdaptedModel.from_pretrained(base, tmp_path)
        # train mode (no dropout here): bitsandbytes does not repack, so `before` leaves the
        # weights in their standard layout
        model.train()
        before = _logits(model)
        if infer_first:
            model.eval()
            _logits(model)  # an eval-mode forward repacks the 4-bit weights for the CPU kernel
            model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter()
        after = _logits(model)
        return float(((after - before).norm() / before.norm()).item())

    ours_fresh, ours_after = change("adapt", False), change("adapt", True)
    peft_fresh, peft_after = change("peft", False), change("peft", True)
    print(
        f"{kind}: merge changes outputs by — adapt {ours_fresh:.1%} (fresh) / {ours_after:.1%} "
        f"(after inference); PEFT {peft_fresh:.1%} / {peft_after:.1%}"
    )
    assert ours_after <= 1.25 * ours_fresh + 1e-3


@pytest.mark.parametrize("kind", list(KINDS))
def test_olora_on_a_quantised_base_matches_peft(folder: Path, kind: str) -> None:
    """OLoRA works from the dequantised weight and requantises the residual, in both libraries:
    the same A, B (QR of the same dequantised weight), the same requantised residual, the same
    logits. (PiSSA on a quantised base is refused by both.)"""
    kw: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="olora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = adapt(_load(folder, kind), LoraConfig(**kw))
        theirs = peft.get_peft_model(_load(folder, kind), peft.LoraConfig(**kw))
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        a = ours.model.model.layers[1].get_submodule(name)
        p = theirs.base_model.model.model.layers[1].get_submodule(name)
        for factor in ("lora_A", "lora_B"):
            mine, peft_w = (
                getattr(a, factor)["default"].weight,
                getattr(p, factor)["default"].weight,
            )
            assert torch.allclose(mine, peft_w.to(mine.dtype), atol=1e-5), (kind, name, factor)
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, atol=1e-4)
    with pytest.raises(TypeError, match="Please initialize PiSSA"):
        peft.get_peft_model(
            _load(folder, kind), peft.LoraConfig(**{**kw, "init_lora_weights": "pissa"})
        )
    with pytest.raises(TargetError, match="PiSSA on a quantised layer"):
        adapt(_load(folder, kind), LoraConfig(**{**kw, "init_lora_weights": "pissa"}))
