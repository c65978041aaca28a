"""VeRA checkpoints: PEFT's keys, the projection saved once or regenerated, round trips, and
refusals of checkpoints that do not fit."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from vera_testutils import (
    LLAMA_TARGETS,
    basis_of,
    input_ids,
    randomise_lambdas,
    reference_basis,
    tiny_llama,
)

from adapt.core import AdaptedModel, AdapterLayer, CheckpointError, ConfigError, adapt
from adapt.vera import VeraConfig, VeraMethod

R = 8
MAX_IN = MAX_OUT = 128


def _trained(save_projection: bool = True, key: int = 0, targets=LLAMA_TARGETS, seed: int = 0):
    base = tiny_llama()
    model = adapt(
        copy.deepcopy(base),
        VeraConfig(
            r=R, target_modules=targets, save_projection=save_projection, projection_prng_key=key
        ),
    )
    randomise_lambdas(model, seed=seed)
    return base, model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits


def _rewrite(folder: Path, edit) -> None:
    file = folder / "adapter_model.safetensors"
    tensors = dict(load_file(str(file)))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(folder: Path, **changes) -> None:
    file = folder / "adapter_config.json"
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


# -- file contents ------------------------------------------------------------------------------


def test_saved_keys_with_projection(tmp_path: Path) -> None:
    _, model = _trained(save_projection=True)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    shared = sorted(k for k in tensors if not k.startswith("base_model.model."))
    assert shared == ["base_model.vera_A", "base_model.vera_B"]  # once, PEFT's prefix
    assert tensors["base_model.vera_A"].shape == (R, MAX_IN)
    assert tensors["base_model.vera_B"].shape == (MAX_OUT, R)
    basis = basis_of(model)
    assert torch.equal(tensors["base_model.vera_A"], basis.A)
    assert torch.equal(tensors["base_model.vera_B"], basis.B)
    assert sum("vera_A" in k for k in tensors) == 1 and sum("vera_B" in k for k in tensors) == 1
    layers = dict(model.adapter_layers())
    per_layer = sorted(k for k in tensors if k.startswith("base_model.model."))
    assert len(per_layer) == 2 * len(layers) == 28
    for path, layer in layers.items():
        lb = tensors[f"base_model.model.{path}.vera_lambda_b"]
        ld = tensors[f"base_model.model.{path}.vera_lambda_d"]
        assert lb.shape == (layer.out_features,) and ld.shape == (R,)
        assert torch.equal(lb, layer.vera_lambda_b["default"].detach())
    assert not any("default" in k or "vera_basis" in k for k in tensors)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is True
    assert config["inference_mode"] is True


def test_saved_keys_without_projection(tmp_path: Path) -> None:
    _, model = _trained(save_projection=False)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.vera_A" not in tensors and "base_model.vera_B" not in tensors
    assert all(k.startswith("base_model.model.") for k in tensors)
    assert all(k.endswith(("vera_lambda_b", "vera_lambda_d")) for k in tensors)
    assert len(tensors) == 28


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("save_projection", [True, False])
def test_round_trip_outputs_equal(tmp_path: Path, save_projection: bool) -> None:
    base, model = _trained(save_projection=save_projection, key=123)
    expected = _logits(model)
    assert (expected - _logits(base)).abs().max() > 1e-3
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(loaded), expected, atol=0, rtol=0)
    basis = basis_of(loaded)
    ref_a, ref_b = reference_basis(R, MAX_IN, MAX_OUT, key=123)
    assert torch.equal(basis.A, ref_a) and torch.equal(basis.B, ref_b)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default


def test_without_projection_the_basis_is_regenerated_from_the_key(tmp_path: Path) -> None:
    base, model = _trained(save_projection=False, key=99)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert basis_of(loaded).seed == 99
    assert torch.equal(basis_of(loaded).A, basis_of(model).A)
    torch.testing.assert_close(_logits(loaded), expected, atol=0, rtol=0)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all("vera_lambda" in n for n in trainable)


def test_with_projection_the_file_basis_is_used(tmp_path: Path) -> None:
    """A saved projection is authoritative for the first adapter (as in PEFT)."""
    base, model = _trained(save_projection=True)
    model.save_pretrained(tmp_path)
    custom_a = torch.linspace(-0.1, 0.1, R * MAX_IN).reshape(R, MAX_IN)
    _rewrite(tmp_path, lambda t: t.__setitem__("base_model.vera_A", custom_a))
    loaded = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(basis_of(loaded).A, custom_a)
    assert torch.equal(basis_of(loaded).B, basis_of(model).B)


def test_two_adapters_round_trip(tmp_path: Path) -> None:
    base, model = _trained(save_projection=False)
    # b's own layers span the same (in, out) maxima, so its key regenerates the same basis
    b_targets = ["q_proj", "gate_proj", "down_proj"]
    model.add_adapter("b", VeraConfig(r=R, target_modules=b_targets, save_projection=False))
    randomise_lambdas(model, seed=8)
    expected = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        expected[name] = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "adapter_config.json").is_file()
    loaded = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    for name in ("default", "b"):
        loaded.set_adapter(name)
        torch.testing.assert_close(_logits(loaded), expected[name], atol=0, rtol=0)


def test_lower_rank_adapter_with_projection_reloads_alone_and_second(tmp_path: Path) -> None:
    """b (r=4) lives on a r=8 basis; with save_projection its file holds the r=4 slice, which
    reproduces its outputs alone in a fresh model and fits the big basis as a second adapter."""
    base, model = _trained(save_projection=True)
    model.add_adapter("b", VeraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    randomise_lambdas(model, seed=9)
    model.set_adapter("b")
    expected = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert tensors["base_model.vera_A"].shape == (4, 64)  # b's own layers are 64 -> {64, 128}
    assert tensors["base_model.vera_B"].shape == (128, 4)
    alone = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path / "b", adapter_name="b")
    torch.testing.assert_close(_logits(alone), expected, atol=1e-6, rtol=1e-6)
    second = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path)
    second.load_adapter(tmp_path / "b", adapter_name="b")
    second.set_adapter("b")
    torch.testing.assert_close(_logits(second), expected, atol=0, rtol=0)


# -- warnings on save -----------------------------------------------------------------------------


def test_save_without_projection_of_a_sliced_basis_warns(tmp_path: Path) -> None:
    _, model = _trained(save_projection=True)
    model.add_adapter("b", VeraConfig(r=4, target_modules=["q_proj"], save_projection=False))
    with pytest.warns(
        UserWarning, match=r"'b'.*save_projection=False.*save_projection=True"
    ) as rec:
        model.save_pretrained(tmp_path)
    assert len(rec) == 1
    assert "(8, 128, 128)" in str(rec[0].message) and "(4, 64, 64)" in str(rec[0].message)
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()


def test_save_without_projection_of_the_natural_basis_does_not_warn(tmp_path: Path) -> None:
    _, model = _trained(save_projection=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path)


# -- refusals -----------------------------------------------------------------------------------


def _assert_base_untouched(model: torch.nn.Module) -> None:
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_vera_a_of_wrong_shape_is_refused(tmp_path: Path) -> None:
    base, model = _trained(save_projection=True)
    model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("base_model.vera_A", torch.zeros(R, MAX_IN - 1)))
    target = copy.deepcopy(base)
    with pytest.raises(CheckpointError) as info:
        AdaptedModel.from_pretrained(target, tmp_path)
    msg = str(info.value)
    assert f"vera_A ({R}, {MAX_IN - 1})" in msg and f"({R}, {MAX_IN})" in msg
    assert "saved for another model or config" in msg
    _assert_base_untouched(target)


def test_only_one_projection_tensor_is_refused(tmp_path: Path) -> None:
    base, model = _trained(save_projection=True)
    model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("base_model.vera_B"))
    with pytest.raises(
        CheckpointError, match=r"holds only one of base_model\.vera_A / base_model\.vera_B"
    ):
        AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_non_finite_projection_is_refused(tmp_path: Path) -> None:
    base, model = _trained(save_projection=True)
    model.save_pretrained(tmp_path)
    bad = torch.full((R, MAX_IN), float("nan"))
    _rewrite(tmp_path, lambda t: t.__setitem__("base_model.vera_A", bad))
    with pytest.raises(CheckpointError, match="finite floating-point"):
        AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_save_projection_true_but_projection_missing_is_refused(tmp_path: Path) -> None:
    base, model = _trained(save_projection=True)
    model.save_pretrained(tmp_path)

    def drop(t: dict) -> None:
        del t["base_model.vera_A"], t["base_model.vera_B"]

    _rewrite(tmp_path, drop)
    target = copy.deepcopy(base)
    with pytest.raises(CheckpointError, match="save_projection=true but the checkpoint holds no"):
        AdaptedModel.from_pretrained(target, tmp_path)
    _assert_base_untouched(target)


def test_checkpoint_for_another_model_shape_is_refused(tmp_path: Path) -> None:
    _, model = _trained(save_projection=True)
    model.save_pretrained(tmp_path)
    other = tiny_llama(intermediate_size=96)  # gate/up/down have other shapes
    with pytest.raises(CheckpointError) as info:
        AdaptedModel.from_pretrained(other, tmp_path)
    msg = str(info.value)
    assert "vera_lambda_b" in msg and "(128,)" in msg and "(96,)" in msg
    assert "another base model" in msg
    _assert_base_untouched(other)


def test_vera_b_of_wrong_shape_is_refused(tmp_path: Path) -> None:
    """An adapter on k/v only (64 -> 32) needs vera_B (32, r); a (128, r) one is refused."""
    base, model = _trained(save_projection=True, targets=["k_proj", "v_proj"])
    model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("base_model.vera_B", torch.zeros(MAX_OUT, R)))
    with pytest.raises(CheckpointError, match=r"vera_B \(128, 8\).*\(32, 8\)"):
        AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_projection_saved_with_another_key_loaded_as_second_adapter(tmp_path: Path) -> None:
    base, other = _trained(save_projection=True, key=1)
    other.save_pretrained(tmp_path)
    model = adapt(
        copy.deepcopy(base), VeraConfig(r=R, target_modules=LLAMA_TARGETS, projection_prng_key=0)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # as saved: the config's key disagrees, which is named before anything is loaded
    with pytest.raises(ConfigError, match=r"'default' uses 0, 'second' uses 1"):
        model.load_adapter(tmp_path, adapter_name="second")

    # config edited to the model's key, projection still from key 1: the tensors disagree
    _edit_config(tmp_path, projection_prng_key=0)
    with pytest.raises(CheckpointError) as info:
        model.load_adapter(tmp_path, adapter_name="second")
    assert "saved projection differs from this model's shared VeRA basis" in str(info.value)
    assert "projection_prng_key" in str(info.value)
    assert list(model.peft_config) == ["default"]
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_regenerated_adapter_needing_another_basis_is_refused_as_second(tmp_path: Path) -> None:
    base, small = _trained(save_projection=False, targets=["k_proj", "v_proj"])
    small.save_pretrained(tmp_path)
    model = adapt(copy.deepcopy(base), VeraConfig(r=R, target_modules=LLAMA_TARGETS))
    with pytest.raises(
        CheckpointError, match=r"regenerated at \(r, in, out\) = \(8, 64, 32\).*\(8, 128, 128\)"
    ):
        model.load_adapter(tmp_path, adapter_name="small")
    assert list(model.peft_config) == ["default"]
    assert basis_of(model).shape == (8, 128, 128)


def test_delete_and_method_lookup_after_failed_load(tmp_path: Path) -> None:
    base, model = _trained(save_projection=True)
    model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("base_model.vera_A", torch.zeros(2, 2)))
    fresh = adapt(copy.deepcopy(base), VeraConfig(r=R, target_modules=LLAMA_TARGETS))
    with pytest.raises(CheckpointError):
        fresh.load_adapter(tmp_path, adapter_name="x")
    assert VeraMethod.basis(fresh) is not None
    assert all(la.adapter_names == ["default"] for _, la in fresh.adapter_layers())


def test_config_file_has_no_exclude_modules_unless_used(tmp_path: Path) -> None:
    """PEFT's VeraConfig has no exclude_modules: the key stays out of the file when unused."""
    config = VeraConfig(r=8, target_modules=["q_proj", "v_proj"])
    assert "exclude_modules" not in config.to_dict()
    used = VeraConfig(r=8, target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"])
    with pytest.warns(UserWarning, match="PEFT's VeraConfig does not have"):
        data = used.to_dict()
    assert data["exclude_modules"] == ["k_proj"]
    # and adapt reads its own file back with the exclusion
    assert VeraConfig.from_dict(data).exclude_modules == ["k_proj"]
