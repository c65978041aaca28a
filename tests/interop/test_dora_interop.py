"""DoRA (``LoraConfig(use_dora=True)``) interop with HF PEFT: checkpoints load both ways with
the same outputs and gradients, merging matches PEFT's, and the documented differences from
PEFT (several active adapters, mixed batches, zero-norm rows) are pinned down.

Every adapter is built with ``init_lora_weights=False`` and its magnitude vectors multiplied by
``1 + 0.1·randn`` (seeded), so that neither the LoRA product nor the magnitude is the identity
and a layout or formula mismatch shows in the outputs.

Runs in the ``interop`` nox session, where ``peft`` is installed as a test-only dependency; the
bitsandbytes cases also need bitsandbytes and adapt-bnb.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from interop_models import ConvNet, llama  # noqa: E402
from interop_models import image as _image  # noqa: E402
from interop_models import output as _out  # noqa: E402
from interop_models import seeded_eval as _base  # noqa: E402
from interop_models import tokens as _tokens  # noqa: E402

from adapt.core import AdaptedModel, adapt  # noqa: E402
from adapt.core.testing import tiny_gpt2, tiny_llama, token_ids  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

pytestmark = pytest.mark.interop

TOL = 1e-5
#: gradients: relative tolerance (the two libraries sum the same terms in another order)
GRAD_RTOL = 1e-4
#: quantised bases: max abs logit diff relative to the largest logit
BNB_RTOL = 1e-3
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
MAGNITUDE = "lora_magnitude_vector"


CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], Callable]] = {
    "llama": (llama, {"target_modules": LLAMA_TARGETS}, _tokens),
    "gpt2": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}, _tokens),
    "embedding-only": (llama, {"target_modules": ["embed_tokens"]}, _tokens),
    "convnet": (ConvNet, {"target_modules": ["conv1", "conv2", "head"]}, _image),
}


def _kwargs(**kwargs: Any) -> dict[str, Any]:
    """The DoRA config both libraries get (the same keywords)."""
    return {"r": 4, "lora_alpha": 8, "use_dora": True, "init_lora_weights": False, **kwargs}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().item())


def _perturb_magnitudes(model: nn.Module, seed: int) -> int:
    """Multiply every DoRA magnitude by ``1 + 0.1·randn`` (seeded, in sorted-name order): at
    its initial value ``m = ‖W + s·BA‖`` DoRA is plain LoRA, and a wrongly laid-out magnitude
    would go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if MAGNITUDE in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=gen))
                count += 1
    assert count > 0, "no DoRA magnitude vectors found"
    return count


def _magnitudes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Magnitude vectors by adapt's parameter name (PEFT's ``….lora_magnitude_vector.<adapter>
    .weight`` is adapt's ``….lora_magnitude_vector.<adapter>``)."""
    return {
        _adapt_name(name): p.detach() for name, p in model.named_parameters() if MAGNITUDE in name
    }


def _adapt_name(peft_name: str) -> str:
    """A PEFT parameter name as adapt names the same parameter: PEFT keeps each magnitude in a
    small module (``.weight``), adapt in a ``ParameterDict``; every other name is the same."""
    return re.sub(rf"({MAGNITUDE}\.[^.]+)\.weight$", r"\1", peft_name)


def _saved_keys(folder: Path) -> set[str]:
    from safetensors.torch import load_file

    return set(load_file(str(folder / "adapter_model.safetensors")))


# -- 1, 2: checkpoints both ways, keys, config --------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_dora_loads_in_adapt(case: str, tmp_path: Path) -> None:
    factory, kwargs, batch_fn = CASES[case]
    base = _base(factory)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_kwargs(**kwargs)))
    _perturb_magnitudes(theirs, seed=11)
    theirs.eval().save_pretrained(tmp_path)
    if "embed_tokens" in kwargs["target_modules"]:
        # PEFT writes the base embedding next to the adapter; adapt must read that file as is
        assert "base_model.model.model.embed_tokens.base_layer.weight" in _saved_keys(tmp_path)
    batch = batch_fn(base)
    expected = _out(theirs, batch)

    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert ours.peft_config["default"].use_dora is True
    # the magnitudes arrived with PEFT's values and shapes ((1, out, 1, 1) for convs)
    mags_theirs, mags_ours = _magnitudes(theirs), _magnitudes(ours)
    assert mags_theirs.keys() == mags_ours.keys()
    for name, m in mags_theirs.items():
        assert mags_ours[name].shape == m.shape, name
        torch.testing.assert_close(mags_ours[name], m, rtol=0, atol=0)
    got = _out(ours, batch)
    diff = _max_diff(got, expected)
    print(f"dora {case}: PEFT-saved adapter in adapt, max abs diff {diff:.3g}")
    assert diff <= TOL
    assert _max_diff(expected, _out(base, batch)) > 1e-3, "adapter had no effect: vacuous"


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapt_saved_dora_loads_in_peft(case: str, tmp_path: Path) -> None:
    factory, kwargs, batch_fn = CASES[case]
    base = _base(factory)
    torch.manual_seed(2)
    ours = adapt(copy.deepcopy(base), LoraConfig(**_kwargs(**kwargs)))
    _perturb_magnitudes(ours, seed=12)
    ours.eval().save_pretrained(tmp_path / "ours")
    batch = batch_fn(base)
    expected = _out(ours, batch)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    got = _out(theirs, batch)
    diff = _max_diff(got, expected)
    print(f"dora {case}: adapt-saved adapter in PEFT, max abs diff {diff:.3g}")
    assert diff <= TOL
    assert _max_diff(expected, _out(base, batch)) > 1e-3, "adapter had no effect: vacuous"

    # keys: a subset of what PEFT writes for the same config; PEFT's extra is only the base
    # embedding it saves when an embedding is a target
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_kwargs(**kwargs)))
    peft_model.save_pretrained(tmp_path / "peft")
    ours_keys, peft_keys = _saved_keys(tmp_path / "ours"), _saved_keys(tmp_path / "peft")
    assert any(MAGNITUDE in k for k in ours_keys)
    assert ours_keys <= peft_keys, ours_keys - peft_keys
    extra = peft_keys - ours_keys
    assert all(k.endswith("embed_tokens.base_layer.weight") for k in extra), extra
    assert bool(extra) == ("embed_tokens" in kwargs["target_modules"]), extra

    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    assert "variant" not in config and "variant_options" not in config, sorted(config)


# -- 3: merging ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_dora_merge_matches_peft_and_unmerge_restores(case: str, tmp_path: Path) -> None:
    factory, kwargs, batch_fn = CASES[case]
    base = _base(factory)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_kwargs(**kwargs)))
    _perturb_magnitudes(theirs, seed=13)
    theirs.save_pretrained(tmp_path)
    batch = batch_fn(base)
    unmerged = _out(theirs.eval(), batch)
    merged_theirs = _out(theirs.merge_and_unload().eval(), batch)
    merged_ours = _out(
        AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path).merge_and_unload().eval(),
        batch,
    )
    diff = _max_diff(merged_ours, merged_theirs)
    print(
        f"dora {case}: merged vs PEFT's merged, max abs diff {diff:.3g} "
        f"(PEFT merged vs unmerged {_max_diff(merged_theirs, unmerged):.3g})"
    )
    assert diff <= TOL

    # merge → unmerge in place gives back the base weights (and the unmerged outputs)
    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    before = _out(ours, batch)
    ours.merge_adapter()
    assert _max_diff(_out(ours, batch), before) <= TOL
    merged = {
        k.replace(".base_layer", ""): v.clone()
        for k, v in ours.model.state_dict().items()
        if "lora_" not in k
    }
    ours.unmerge_adapter()
    assert _max_diff(_out(ours, batch), before) <= TOL
    restored = ours.unload().state_dict()
    original = base.state_dict()
    assert restored.keys() == original.keys() == merged.keys()
    # float32 round-off of W' = c·(W + ΔW) and back, relative to the merged weight (the
    # random embedding factors make merged entries O(10))
    worst = max(
        _max_diff(restored[k], original[k]) / max(1.0, merged[k].abs().max().item())
        for k in original
    )
    print(f"dora {case}: merge → unmerge, max weight change (relative) {worst:.3g}")
    assert worst <= 1e-6


# -- 4: training: loss and gradients ------------------------------------------------------------


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, seed: int) -> tuple[float, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks: drawn from the global generator
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {
        _adapt_name(name): p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    assert all(g is not None for g in grads.values())
    return float(loss.item()), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_dora_training_step_matches_peft(dropout: float, tmp_path: Path) -> None:
    """One forward/backward in train mode on the same weights: the loss and the gradient of
    every ``lora_A`` / ``lora_B`` / ``lora_embedding_*`` / ``lora_magnitude_vector`` agree.

    With dropout, both libraries draw one mask per adapted (non-embedding) layer from the
    global generator, in module order, and recompute ``x Wᵀ`` on the dropped-out input: with
    the same ``torch.manual_seed`` before the forward the masks are the same, so the step
    matches exactly as without dropout."""
    base = _base(llama)
    torch.manual_seed(4)
    kwargs = _kwargs(target_modules=LLAMA_TARGETS, lora_dropout=dropout)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    _perturb_magnitudes(theirs, seed=14)
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ids = token_ids(2, 12, seed=6)

    loss_theirs, grads_theirs = _loss_and_grads(theirs, ids, seed=123)
    loss_ours, grads_ours = _loss_and_grads(ours, ids, seed=123)
    assert grads_ours.keys() == grads_theirs.keys()
    assert sum(MAGNITUDE in k for k in grads_ours) == 7  # 3 targets × 2 layers + embedding
    worst = max(
        _max_diff(grads_ours[k], grads_theirs[k]) / grads_theirs[k].abs().max().item()
        for k in grads_theirs
    )
    print(
        f"dora training, dropout {dropout}: loss diff {abs(loss_ours - loss_theirs):.3g}, "
        f"worst relative gradient diff {worst:.3g}"
    )
    assert loss_ours == pytest.approx(loss_theirs, rel=1e-6, abs=1e-6)
    for name, grad in grads_theirs.items():
        assert grad.abs().max() > 0, f"{name}: zero gradient (vacuous)"
        torch.testing.assert_close(grads_ours[name], grad, rtol=GRAD_RTOL, atol=1e-7, msg=name)
    if dropout:
        # the dropout really changed the step (else equal RNG use would prove nothing)
        no_dropout = ours.eval()(input_ids=ids, labels=ids).loss.item()
        assert abs(no_dropout - loss_ours) > 1e-4


# -- 5: bitsandbytes bases ----------------------------------------------------------------------

BNB_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BNB_KINDS: dict[str, dict[str, Any]] = {
    "nf4": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": torch.float32,
    },
    "8bit": {"load_in_8bit": True},
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(root)
    return root


def _load_quantised(folder: Path, kind: str) -> nn.Module:
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("adapt.bnb")
    model = transformers.LlamaForCausalLM.from_pretrained(
        folder,
        quantization_config=transformers.BitsAndBytesConfig(**BNB_KINDS[kind]),
        device_map="cpu",
    )
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == ("Linear8bitLt" if kind == "8bit" else "Linear4bit")
    return model


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return _max_diff(a, b) / float(b.abs().max().item())


def _train_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    # train mode (no dropout anywhere here), outputs under no_grad: see the test's docstring
    model.train()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("kind", sorted(BNB_KINDS))
def test_dora_on_quantised_llama_both_ways(llama_folder: Path, kind: str, tmp_path: Path) -> None:
    """PEFT-saved DoRA on a quantised Llama loads in adapt, adapt-saved in PEFT, with the same
    logits (both run bitsandbytes' kernels for the base layers; DoRA dequantises W for the norm).

    Two PEFT traps on the CPU shape the test, both recorded, neither asserted (they are PEFT's
    and bitsandbytes' behaviour, not adapt's):

    * 4-bit: bitsandbytes repacks the weight for its CPU kernel on the first eval-mode forward,
      and PEFT's DoRA then dequantises the repacked data as if it were in the standard layout
      (max abs error 0.13 in q_proj's W here), so its norm and logits are wrong from then on
      (~26% relative on this model). The models stay in train mode, where nothing is repacked.
    * 8-bit: after PEFT's DoRA init the bitsandbytes layer's state is inconsistent
      (``state.SCB`` set, ``state.CB`` None): its first forward is right, every later one
      raises ``AttributeError`` inside bitsandbytes' int8 matmul. So each PEFT model runs
      exactly once here; adapt's run any number of times.
    """
    ids = token_ids(2, 12, seed=5)
    kwargs = _kwargs(target_modules=BNB_TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # PEFT-saved → adapt
        torch.manual_seed(1)
        theirs = peft.get_peft_model(_load_quantised(llama_folder, kind), peft.LoraConfig(**kwargs))
        _perturb_magnitudes(theirs, seed=21)
        theirs.save_pretrained(tmp_path / "peft")
        expected = _train_logits(theirs, ids)
        ours = AdaptedModel.from_pretrained(_load_quantised(llama_folder, kind), tmp_path / "peft")
        got = _train_logits(ours, ids)
        to_adapt = _relative(got, expected)
        assert _max_diff(_train_logits(ours, ids), got) == 0  # repeatable (PEFT's 8-bit is not)
        with ours.disable_adapter():
            base = _train_logits(ours, ids)

        # adapt-saved → PEFT
        torch.manual_seed(2)
        ours2 = adapt(_load_quantised(llama_folder, kind), LoraConfig(**kwargs))
        _perturb_magnitudes(ours2, seed=22)
        ours2.save_pretrained(tmp_path / "ours")
        expected2 = _train_logits(ours2, ids)
        theirs2 = peft.PeftModel.from_pretrained(
            _load_quantised(llama_folder, kind), tmp_path / "ours"
        )
        got2 = _train_logits(theirs2, ids)
        to_peft = _relative(got2, expected2)
    print(f"dora {kind}: relative max diff PEFT→adapt {to_adapt:.3g}, adapt→PEFT {to_peft:.3g}")
    assert torch.isfinite(expected).all() and torch.isfinite(expected2).all()
    assert _relative(expected, base) > 1e-2, "adapter had no effect: vacuous"
    assert to_adapt <= BNB_RTOL
    assert to_peft <= BNB_RTOL
    assert _saved_keys(tmp_path / "ours") <= _saved_keys(tmp_path / "peft")


# -- 6: several DoRA adapters active ------------------------------------------------------------


def _layer_inputs(base: nn.Module, ids: torch.Tensor, targets: list[str]) -> dict[str, Any]:
    """The input every targeted module of ``base`` sees on ``ids``, by module path."""
    inputs: dict[str, Any] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, path=path: inputs.__setitem__(path, args[0])
        )
        for path, module in base.named_modules()
        if path.rsplit(".", 1)[-1] in targets
    ]
    try:
        _out(base, {"input_ids": ids})
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _save_peft_dora(base: nn.Module, folder: Path, seed: int, **kwargs: Any) -> None:
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**_kwargs(**kwargs)))
    if kwargs.get("use_dora", True):
        _perturb_magnitudes(model, seed=seed + 100)
    model.save_pretrained(folder)


def test_several_dora_adapters_sum_their_effects(tmp_path: Path) -> None:
    """adapt: with a and b active, each targeted layer gives ``base + (out_a − base) + (out_b −
    base)``, out_a and out_b being PEFT's single-adapter outputs of the same weights.

    The identity is per layer (the model is nonlinear, so it does not hold for the logits),
    hence compared on every targeted module with the input it sees in the base model.

    Recorded difference: PEFT, in eval mode, feeds each DoRA adapter the running result
    (``result`` after the previous adapter) instead of the base output (embeddings: it scales
    the running result), so its two-adapter output is not that sum and depends on the order."""
    base = _base(llama)
    _save_peft_dora(base, tmp_path / "a", seed=5, target_modules=LLAMA_TARGETS)
    _save_peft_dora(base, tmp_path / "b", seed=6, target_modules=LLAMA_TARGETS)
    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    ours.set_adapter(["a", "b"])
    ours.eval()
    single = {
        name: peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
        for name in ("a", "b")
    }
    both_theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "a", adapter_name="a"
    )
    both_theirs.load_adapter(tmp_path / "b", adapter_name="b")
    both_theirs.base_model.set_adapter(["a", "b"])
    both_theirs.eval()

    ids = token_ids(2, 12, seed=1)
    inputs = _layer_inputs(base, ids, LLAMA_TARGETS)
    assert len(inputs) == 7
    ours_diffs: list[float] = []
    peft_gaps: list[float] = []
    with torch.no_grad():
        for path, x in inputs.items():
            plain = base.get_submodule(path)(x)
            out_a = single["a"].base_model.model.get_submodule(path)(x)
            out_b = single["b"].base_model.model.get_submodule(path)(x)
            expected = out_a + out_b - plain
            got = ours.model.get_submodule(path)(x)
            theirs_both = both_theirs.base_model.model.get_submodule(path)(x)
            diff = _max_diff(got, expected)
            gap = _max_diff(theirs_both, expected) / float(expected.abs().max().item())
            print(f"{path}: adapt a+b vs sum {diff:.3g}; PEFT a+b vs sum (relative) {gap:.3g}")
            assert _max_diff(out_a, plain) > 1e-3 and _max_diff(out_b, plain) > 1e-3
            ours_diffs.append(diff)
            peft_gaps.append(gap)
    assert max(ours_diffs) <= TOL
    # the recorded difference: on every layer PEFT's cumulative two-adapter output is
    # measurably not the sum (8.8%–12% of the output's largest entry here)
    assert min(peft_gaps) > 1e-3

    # merging both gives adapt's unmerged two-adapter output
    batch = {"input_ids": ids}
    unmerged = _out(ours, batch)
    ours.merge_adapter(["a", "b"])
    merged = _out(ours, batch)
    diff = _max_diff(merged, unmerged)
    print(f"adapt a+b merged vs unmerged logits, max abs diff {diff:.3g}")
    assert diff <= TOL
    assert _max_diff(unmerged, _out(single["a"], batch)) > 1e-3  # b counts


# -- 7: mixed batches ---------------------------------------------------------------------------


def test_mixed_batch_with_dora(tmp_path: Path) -> None:
    """PEFT refuses ``adapter_names`` when a DoRA adapter is loaded; adapt runs the batch, each
    row as the model with that row's adapter alone (here a DoRA adapter and a plain LoRA)."""
    base = _base(llama)
    _save_peft_dora(base, tmp_path / "a", seed=7, target_modules=LLAMA_TARGETS)
    _save_peft_dora(base, tmp_path / "b", seed=8, target_modules=LLAMA_TARGETS, use_dora=False)
    ids = token_ids(4, 12, seed=2)
    batch = {"input_ids": ids}
    names = ["a", "b", "__base__", "a"]

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.eval()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
        _out(theirs, {**batch, "adapter_names": names})

    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    ours.eval()
    assert ours.peft_config["a"].use_dora and not ours.peft_config["b"].use_dora
    got = _out(ours, {**batch, "adapter_names": names})
    expected = {
        name: _out(
            peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval(), batch
        )
        for name in ("a", "b")
    }
    expected["__base__"] = _out(base, batch)
    for row, name in enumerate(names):
        diff = _max_diff(got[row], expected[name][row])
        print(f"mixed batch row {row} ({name}): max abs diff vs PEFT single adapter {diff:.3g}")
        assert diff <= TOL
    assert _max_diff(expected["a"], expected["__base__"]) > 1e-3
    assert _max_diff(expected["b"], expected["__base__"]) > 1e-3


# -- 8: a zero weight row -----------------------------------------------------------------------


def test_zero_norm_row_is_finite_in_adapt_nan_in_peft() -> None:
    """A base weight row that is zero, with B = 0 (``init_lora_weights=True``): ``‖W + s·BA‖``
    is 0 on that row, so ``m / ‖…‖`` is 0/0. PEFT's output is NaN (peft #2049); adapt clamps the
    norm and stays finite, forward and backward, and equals the base model."""
    base = _base(llama)
    with torch.no_grad():
        base.model.layers[0].self_attn.q_proj.weight[3].zero_()
        base.model.layers[1].mlp.down_proj.weight[5].zero_()
    kwargs = _kwargs(target_modules=LLAMA_TARGETS, init_lora_weights=True)
    ids = token_ids(2, 12, seed=3)
    batch = {"input_ids": ids}

    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs)).eval()
    assert torch.isnan(_out(theirs, batch)).any(), "PEFT no longer gives NaN on a zero row"

    ours = adapt(copy.deepcopy(base), LoraConfig(**kwargs))
    out = _out(ours.eval(), batch)
    assert torch.isfinite(out).all()
    assert _max_diff(out, _out(base, batch)) <= TOL  # B = 0: the identity, zero row included
    ours.train()
    loss = ours(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # one step away from B = 0: still finite
    with torch.no_grad():
        for p in ours.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert torch.isfinite(_out(ours.eval(), batch)).all()
