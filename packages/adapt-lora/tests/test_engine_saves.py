"""save_pretrained in one process, for what distributed engines hand it (the engines themselves
run for real in tests/distributed): a gathered ``state_dict=`` as PEFT takes it, wrapper path
segments, tensors left sharded (refused, nothing written), and ZeRO-3's recorded shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_testutils import ids, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

from adapt.core import AdaptedModel, CheckpointError, adapt
from adapt.core.backends import DenseBackend
from adapt.core.distributed import clean_key, logical_shape
from adapt.lora import LoraConfig


def adapted(seed: int = 0) -> AdaptedModel:
    model = adapt(tiny_llama(seed), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def saved(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("form", ["model", "ddp-prefixed", "peft-keys", "fsdp-named"])
def test_state_dict_argument_writes_the_same_adapter(tmp_path: Path, form: str) -> None:
    model = adapted()
    model.save_pretrained(tmp_path / "plain")
    # what an engine hands back: the whole model's state dict in some spelling, gathered (here:
    # clones, so a wrong lookup would show as missing keys, not as the live tensors)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    if form == "ddp-prefixed":
        full = {f"module.{k}": v for k, v in full.items()}
    elif form == "peft-keys":
        full = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    elif form == "fsdp-named":
        full = {
            k.replace("layers.0.", "layers.0._fsdp_wrapped_module."): v for k, v in full.items()
        }
    model.save_pretrained(tmp_path / "given", state_dict=full)
    assert_same(saved(tmp_path / "given"), saved(tmp_path / "plain"))


def test_state_dict_argument_takes_its_values_not_the_models(tmp_path: Path) -> None:
    model = adapted()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in full if "lora_A" in k)
    full[key] = torch.full_like(full[key], 0.5)
    model.save_pretrained(tmp_path, state_dict=full)
    written = saved(tmp_path)
    assert any(torch.equal(t, full[key]) for t in written.values())


def test_state_dict_argument_missing_adapter_tensors_is_refused(tmp_path: Path) -> None:
    model = adapted()
    full = {k: v for k, v in model.state_dict().items() if "lora_B" not in k}
    with pytest.raises(CheckpointError, match=r"lacks 4 of the adapter's tensors.*lora_B"):
        model.save_pretrained(tmp_path / "out", state_dict=full)
    assert not (tmp_path / "out").exists()


def test_state_dict_argument_on_other_ranks_writes_nothing(tmp_path: Path) -> None:
    model = adapted()
    model.save_pretrained(tmp_path / "out", state_dict=model.state_dict(), is_main_process=False)
    assert not (tmp_path / "out").exists()


def test_a_tensor_left_sharded_is_refused_and_nothing_written(tmp_path: Path) -> None:
    """What FSDP1 leaves outside its gather: a 1-D piece of the flat buffer in place of A."""
    model = adapted()
    layer = model.model.model.layers[0].self_attn.q_proj
    weight = layer.lora_A["default"].weight
    with torch.no_grad():
        weight.data = weight.data.flatten()[:100].clone()
    with pytest.raises(CheckpointError) as info:
        model.save_pretrained(tmp_path / "out")
    message = str(info.value)
    assert "layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "(100,)" in message and "(4, 32)" in message and "summon_full_params" in message
    assert not (tmp_path / "out").exists()


def test_an_empty_tensor_is_refused(tmp_path: Path) -> None:
    """What ZeRO-3 leaves when nothing gathers a partition: an empty (0,) tensor."""
    model = adapted()
    weight = model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    weight.data = torch.empty(0)
    with pytest.raises(CheckpointError, match=r"shape \(0,\) where the adapter has \(16, 4\)"):
        model.save_pretrained(tmp_path / "out")


def test_shapes_follow_reloads_of_other_ranks(tmp_path: Path) -> None:
    """The recorded shapes are the adapter's: a new adapter, a loaded one, a deleted one."""
    model = adapted()
    model.add_adapter("wide", LoraConfig(r=8, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "both")
    again = AdaptedModel.from_pretrained(tiny_llama(), tmp_path / "both")
    again.load_adapter(tmp_path / "both" / "wide", "wide")
    again.save_pretrained(tmp_path / "again")
    assert_same(saved(tmp_path / "again" / "wide"), saved(tmp_path / "both" / "wide"))
    again.delete_adapter("wide")
    again.save_pretrained(tmp_path / "one")
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["r"] == 4


def test_wrapper_segments_are_not_written() -> None:
    assert clean_key("base_model.model.layers.0._fsdp_wrapped_module.q.lora_A.weight") == (
        "base_model.model.layers.0.q.lora_A.weight"
    )
    assert clean_key("a._checkpoint_wrapped_module.b._orig_mod.c") == "a.b.c"


def test_zero3_recorded_shape_is_the_shape() -> None:
    """DeepSpeed ZeRO-3 empties a partitioned weight to (0,) and records its shape in
    ``ds_shape`` (here set by hand on a GPT-2 ``Conv1D``, whose shape the backend reads from
    the weight; the real engine: tests/distributed/test_deepspeed.py)."""
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    full = DenseBackend().shape(conv)
    weight = conv.weight
    weight.ds_shape = torch.Size(weight.shape)  # type: ignore[attr-defined]
    weight.ds_id = 0  # type: ignore[attr-defined]
    weight.data = torch.empty(0)
    assert logical_shape(weight) == (32, 96)
    assert DenseBackend().shape(conv) == full == (32, 96)


def test_model_still_runs_after_refused_save(tmp_path: Path) -> None:
    model = adapted()
    before = model(input_ids=ids()).logits
    weight = model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    keep = weight.data
    weight.data = torch.empty(0)
    with pytest.raises(CheckpointError):
        model.save_pretrained(tmp_path / "out")
    weight.data = keep
    assert torch.equal(model(input_ids=ids()).logits, before)


def test_a_reshaped_tensor_in_one_process_is_the_users_and_written(tmp_path: Path) -> None:
    """Same rank, other sizes, one process (e.g. resized token embeddings in modules_to_save):
    not an engine's piece, so it is written as it is."""
    model = adapted()
    weight = model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight
    weight.data = torch.zeros(12, 4)
    model.save_pretrained(tmp_path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert saved(tmp_path)[key].shape == (12, 4)
