"""LoRA interop with HF PEFT: same weights give the same outputs, checkpoints load both ways.

Runs in the ``interop`` nox session, where ``peft`` is installed as a test-only dependency.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

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
from adapt.core.testing import tiny_bert, tiny_gpt2  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

pytestmark = pytest.mark.interop

TOL = 1e-5


CASES: dict[str, tuple[Callable[[], nn.Module], dict, Callable]] = {
    "llama": (
        llama,
        {"target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"]},
        _tokens,
    ),
    "llama-all-linear": (llama, {"target_modules": "all-linear", "use_rslora": True}, _tokens),
    "gpt2": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}, _tokens),
    "bert": (
        tiny_bert,
        {"target_modules": ["query", "value"], "modules_to_save": ["pooler"], "bias": "all"},
        _tokens,
    ),
    "convnet": (ConvNet, {"target_modules": ["conv1", "conv2", "head"]}, _image),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_in_adapt(case: str, tmp_path: Path) -> None:
    factory, kwargs, batch_fn = CASES[case]
    base = _base(factory)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    ).eval()
    peft_model.save_pretrained(tmp_path)
    batch = batch_fn(base)
    expected = _out(peft_model, batch)
    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    got = _out(ours, batch)
    diff = (got - expected).abs().max().item()
    print(f"{case}: PEFT-saved adapter in adapt, max abs diff {diff:.3g}")
    assert diff <= TOL
    assert not torch.allclose(expected, _out(base, batch)), "adapter had no effect: test is vacuous"


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapt_saved_adapter_loads_in_peft(case: str, tmp_path: Path) -> None:
    factory, kwargs, batch_fn = CASES[case]
    base = _base(factory)
    torch.manual_seed(2)
    ours = adapt(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    ).eval()
    ours.save_pretrained(tmp_path)
    batch = batch_fn(base)
    expected = _out(ours, batch)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    got = _out(theirs, batch)
    diff = (got - expected).abs().max().item()
    print(f"{case}: adapt-saved adapter in PEFT, max abs diff {diff:.3g}")
    assert diff <= TOL
    # the same keys PEFT itself would write
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, **kwargs))
    peft_dir = tmp_path / "peft"
    peft_model.save_pretrained(peft_dir)
    from safetensors.torch import load_file

    ours_keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    peft_keys = set(load_file(str(peft_dir / "adapter_model.safetensors")))
    assert ours_keys <= peft_keys
    # what PEFT writes beyond ours: embedding base weights when embeddings are targets, and
    # (bias="all") duplicate biases of modules_to_save wrappers; adapt reads both
    extra = peft_keys - ours_keys
    assert all(
        ".original_module." in k or ".modules_to_save." in k or "embed_tokens.base_layer" in k
        for k in extra
    ), extra
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["inference_mode"] is True


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_matches_peft(case: str, tmp_path: Path) -> None:
    factory, kwargs, batch_fn = CASES[case]
    if kwargs.get("modules_to_save"):
        pytest.skip("merge compares adapter layers only")
    base = _base(factory)
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    )
    peft_model.save_pretrained(tmp_path)
    batch = batch_fn(base)
    theirs = _out(peft_model.merge_and_unload().eval(), batch)
    ours = _out(
        AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path).merge_and_unload().eval(), batch
    )
    diff = (ours - theirs).abs().max().item()
    print(f"{case}: merged model vs PEFT's merged model, max abs diff {diff:.3g}")
    assert diff <= TOL


def test_second_adapter_folder_layout_matches_peft(tmp_path: Path) -> None:
    base = _base(llama)
    cfg = {"target_modules": ["q_proj"], "init_lora_weights": False}
    ours = adapt(copy.deepcopy(base), LoraConfig(r=2, **cfg))
    ours.add_adapter("other", LoraConfig(r=3, **cfg))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), tmp_path / "other", adapter_name="other"
    )
    batch = _tokens(base)
    ours.set_adapter("other")
    diff = (_out(theirs.eval(), batch) - _out(ours.eval(), batch)).abs().max().item()
    assert diff <= TOL


def test_peft_spellings_behave_as_in_peft(tmp_path: Path) -> None:
    """The same calls, written as for PEFT, give the same results in both libraries."""
    base = _base(llama)
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": "all-linear"}
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path)
    ours = AdaptedModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert ours.peft_type == theirs.peft_type == "LORA"
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    batch = _tokens(base)
    ours.disable_adapter_layers()
    theirs.base_model.disable_adapter_layers()  # PEFT has it on the tuner model
    diff = (_out(ours.eval(), batch) - _out(theirs.eval(), batch)).abs().max().item()
    assert diff <= TOL
    torch.testing.assert_close(_out(ours, batch), _out(base.eval(), batch))
    theirs.base_model.enable_adapter_layers()
    ours.enable_adapter_layers()
    # PEFT's positional order: progressbar, safe_merge
    merged = {
        "ours": ours.merge_and_unload(False, True),
        "theirs": theirs.merge_and_unload(False, True),
    }
    diff = (_out(merged["ours"].eval(), batch) - _out(merged["theirs"].eval(), batch)).abs().max()
    assert diff.item() <= TOL


def test_state_dicts_move_both_ways_like_peft_state_dict_helpers() -> None:
    """get_peft_model_state_dict → load_adapter_state_dict, and adapter_state_dict →
    set_peft_model_state_dict, give the same outputs."""
    base = _base(llama)
    kwargs = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": "all-linear"}
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    torch.manual_seed(4)  # other values
    ours = adapt(copy.deepcopy(base), LoraConfig(**kwargs))  # type: ignore[arg-type]
    batch = _tokens(base)
    ours.load_adapter_state_dict(peft.get_peft_model_state_dict(theirs))
    diff = (_out(ours.eval(), batch) - _out(theirs.eval(), batch)).abs().max().item()
    assert diff <= TOL
    torch.manual_seed(5)
    fresh = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    result = peft.set_peft_model_state_dict(fresh, ours.adapter_state_dict("default"))
    assert not result.unexpected_keys
    diff = (_out(fresh.eval(), batch) - _out(ours, batch)).abs().max().item()
    assert diff <= TOL
