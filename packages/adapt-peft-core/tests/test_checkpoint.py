"""Checkpoints: PEFT-format files, atomic writes, round trips, and every way loading fails."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from core_testutils import assert_unchanged, mlp, snapshot
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapt.core import (
    AdaptedModel,
    AdapterLayer,
    AdapterStateError,
    CheckpointError,
    ConfigError,
    MissingMethodError,
    adapt,
    load_config,
)
from adapt.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_tensors
from adapt.core.state_dict import normalise_peft_keys as _normalise_peft_keys
from adapt.core.testing import ToyConfig

KEYS = [
    "base_model.model.down.toy_A",
    "base_model.model.down.toy_B",
    "base_model.model.up.toy_A",
    "base_model.model.up.toy_B",
]


def trained() -> AdaptedModel:
    torch.manual_seed(5)
    return adapt(mlp(), ToyConfig(target_modules=["up", "down"], init_identity=False, r=3))


def out(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(x)
    return result


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    trained().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


# -- writing -----------------------------------------------------------------------------------


def test_save_pretrained_writes_peft_format(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    text = (saved / CONFIG_NAME).read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["peft_type"] == "TOY"
    assert data["inference_mode"] is True  # written as PEFT does, whatever the live value
    assert data["r"] == 3 and data["target_modules"] == ["up", "down"]
    assert data["base_model_name_or_path"] is None
    with safe_open(str(saved / WEIGHTS_NAME), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert sorted(fh.keys()) == KEYS  # no adapter name in the keys


def test_saved_tensors_are_the_adapter_weights(saved: Path, tmp_path: Path) -> None:
    model = trained()
    tensors = load_file(str(saved / WEIGHTS_NAME))
    assert torch.equal(tensors["base_model.model.up.toy_A"], model.model.up.toy_A["default"])
    assert tensors["base_model.model.up.toy_B"].shape == (12, 3)


def test_non_default_adapters_go_to_subfolders(tmp_path: Path) -> None:
    model = trained()
    model.add_adapter("task_b", ToyConfig(target_modules=["head"]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file()
    assert (tmp_path / "task_b" / CONFIG_NAME).is_file()
    with safe_open(str(tmp_path / "task_b" / WEIGHTS_NAME), framework="pt") as fh:
        assert sorted(fh.keys()) == ["base_model.model.head.toy_A", "base_model.model.head.toy_B"]
    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["task_b"])
    assert sorted(p.name for p in only.iterdir()) == ["task_b"]


def test_save_leaves_no_temp_files_and_overwrites(tmp_path: Path) -> None:
    model = trained()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        model.model.up.toy_B["default"].add_(1.0)
    model.save_pretrained(tmp_path)  # replaces the files in place
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    assert torch.equal(tensors["base_model.model.up.toy_B"], model.model.up.toy_B["default"])


def test_failed_write_keeps_the_old_checkpoint(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = (saved / WEIGHTS_NAME).read_bytes()
    old_config = (saved / CONFIG_NAME).read_text()

    def broken_save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    model = trained()
    with torch.no_grad():
        model.model.up.toy_B["default"].add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(saved)
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, WEIGHTS_NAME]  # temp file removed
    assert (saved / WEIGHTS_NAME).read_bytes() == old
    assert (saved / CONFIG_NAME).read_text() == old_config


def test_save_argument_errors(tmp_path: Path) -> None:
    model = trained()
    with pytest.raises(ConfigError, match="safetensors only; drop safe_serialization=False"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(TypeError, match=r"unexpected arguments \['max_shard_size'\]"):
        model.save_pretrained(tmp_path, max_shard_size="1GB")
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(CheckpointError, match="it is a file, not a folder"):
        model.save_pretrained(file)
    with pytest.raises(AdapterStateError, match="no adapter named 'nope'"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    model.save_pretrained(tmp_path / "skipped", is_main_process=False)
    assert not (tmp_path / "skipped").exists()


# -- loading -----------------------------------------------------------------------------------


def test_from_pretrained_round_trip(saved: Path, x: torch.Tensor) -> None:
    expected = out(trained(), x)
    loaded = AdaptedModel.from_pretrained(mlp(), saved)
    torch.testing.assert_close(out(loaded, x), expected)
    assert loaded.peft_config["default"].inference_mode is True
    assert loaded.peft_config["default"].r == 3
    assert loaded.trainable_parameters()[0] == 0  # is_trainable=False: nothing trains
    trainable = AdaptedModel.from_pretrained(mlp(), saved, adapter_name="t", is_trainable=True)
    assert trainable.active_adapters == ["t"]
    assert trainable.trainable_parameters()[0] == 3 * (8 + 12) * 2
    torch.testing.assert_close(out(trainable, x), expected)


def test_load_config(saved: Path) -> None:
    cfg = load_config(saved)
    assert isinstance(cfg, ToyConfig)
    assert cfg == ToyConfig(
        target_modules=["up", "down"], init_identity=False, r=3, inference_mode=True
    )


def test_load_adapter_next_to_the_default(tmp_path: Path, x: torch.Tensor) -> None:
    source = trained()
    source.add_adapter("b", ToyConfig(target_modules=["head"], init_identity=False))
    source.set_adapter("b")
    expected_b = out(source, x)
    source.save_pretrained(tmp_path)

    model = adapt(mlp(), ToyConfig(target_modules=["up"]))
    model.load_adapter(tmp_path / "b", adapter_name="other")
    assert model.active_adapters == ["default"]  # loaded, not made active
    model.set_adapter("other")
    model.delete_adapter("default")  # default here is an identity adapter anyway
    torch.testing.assert_close(out(model, x), expected_b)
    with pytest.raises(ConfigError, match="an adapter named 'other' exists already"):
        model.load_adapter(tmp_path / "b", adapter_name="other")
    with pytest.raises(ConfigError, match=r"invalid adapter name 'a\.b'"):
        model.load_adapter(tmp_path / "b", adapter_name="a.b")


# -- loading errors ----------------------------------------------------------------------------


def load_fails(folder: Path) -> CheckpointError | Exception:
    """Try from_pretrained on a fresh base; check the base is left unchanged; return the error."""
    base = mlp()
    base.head.requires_grad_(False)  # a user's own freezing survives a failed load
    before = snapshot(base)
    with pytest.raises(Exception) as info:
        AdaptedModel.from_pretrained(base, folder)
    assert_unchanged(base, before)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == {
        n: not n.startswith("head.") for n, _ in base.named_parameters()
    }
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())
    return info.value


def test_missing_folder(tmp_path: Path) -> None:
    err = load_fails(tmp_path / "nowhere")
    assert isinstance(err, CheckpointError)
    assert "the folder does not exist" in str(err) and "nowhere" in str(err)


def test_missing_config(saved: Path) -> None:
    (saved / CONFIG_NAME).unlink()
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    assert f"holds no {CONFIG_NAME}" in str(err) and "subfolder" in str(err)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
        ('{"r": 2}', "has no 'peft_type'; it is not an adapter config"),
        ('{"peft_type": 3}', "peft_type must be a string, got 3"),
    ],
)
def test_bad_config_file(saved: Path, text: str, message: str) -> None:
    (saved / CONFIG_NAME).write_text(text)
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    assert message in str(err)


def test_wrong_config_types_name_the_field(saved: Path) -> None:
    data = json.loads((saved / CONFIG_NAME).read_text())
    data["r"] = "3"
    (saved / CONFIG_NAME).write_text(json.dumps(data))
    err = load_fails(saved)
    assert isinstance(err, ConfigError)
    assert "ToyConfig.r has the wrong type: got '3'" in str(err)
    assert CONFIG_NAME in str(err)  # says which file


@pytest.mark.parametrize(
    ("peft_type", "hint"), [("VERA", "pip install adapt-vera"), ("NOPE", "'adapt.methods'")]
)
def test_unknown_peft_type(saved: Path, peft_type: str, hint: str) -> None:
    data = json.loads((saved / CONFIG_NAME).read_text())
    data["peft_type"] = peft_type
    (saved / CONFIG_NAME).write_text(json.dumps(data))
    err = load_fails(saved)
    assert isinstance(err, MissingMethodError)
    assert repr(peft_type) in str(err) and hint in str(err)


class Trap:
    """Unpickling it creates the file ``marker``: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_pickle_only_folder_is_refused_and_never_unpickled(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "unpickled"
    (saved / WEIGHTS_NAME).unlink()
    (saved / "adapter_model.bin").write_bytes(pickle.dumps(Trap(marker)))

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    msg = str(err)
    assert "adapter_model.bin, a pickle file, which adapt does not load by default" in msg
    assert "safetensors" in msg  # says how to convert
    assert not marker.exists()
    model = adapt(mlp(), ToyConfig(target_modules=["up"]))
    with pytest.raises(CheckpointError, match=r"does not load by default.*allow_pickle=True"):
        model.load_adapter(saved, adapter_name="b")
    assert not marker.exists()
    assert set(model.peft_config) == {"default"}


def test_missing_weights_file(saved: Path) -> None:
    (saved / WEIGHTS_NAME).unlink()
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    assert f"holds no {WEIGHTS_NAME}" in str(err)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(saved: Path, damage: str) -> None:
    file = saved / WEIGHTS_NAME
    data = file.read_bytes()
    file.write_bytes(
        {"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage]
    )
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    assert "is corrupt or truncated and cannot be read" in str(err)
    assert WEIGHTS_NAME in str(err)


def rewrite(saved: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(saved / WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(saved / WEIGHTS_NAME), metadata={"format": "pt"})


def test_missing_tensor_is_named(saved: Path) -> None:
    rewrite(saved, lambda t: t.pop("base_model.model.down.toy_B"))
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    assert "lacks 1 tensor(s)" in str(err) and "'base_model.model.down.toy_B'" in str(err)


def test_unexpected_tensor_is_named(saved: Path) -> None:
    rewrite(saved, lambda t: t.update({"base_model.model.nothere.toy_A": torch.zeros(2, 2)}))
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    msg = str(err)
    assert "1 tensor(s) in the checkpoint match no module" in msg
    assert "'base_model.model.nothere.toy_A'" in msg


def test_unexpected_shared_tensor_is_named(saved: Path) -> None:
    rewrite(saved, lambda t: t.update({"base_model.toy_shared": torch.zeros(2)}))
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    assert "unexpected tensors ['base_model.toy_shared'] for a toy adapter" in str(err)


def test_wrong_shape_is_named(saved: Path) -> None:
    rewrite(saved, lambda t: t.update({"base_model.model.up.toy_A": torch.zeros(4, 8)}))
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    msg = str(err)
    assert "'base_model.model.up.toy_A' has shape (4, 8) but the model expects (3, 8)" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_is_named(saved: Path, bad: float) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.down.toy_A"][1, 2] = bad

    rewrite(saved, poison)
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    assert "'base_model.model.down.toy_A' holds NaN or Inf values" in str(err)


def test_integer_tensor_is_named(saved: Path) -> None:
    rewrite(
        saved,
        lambda t: t.update({"base_model.model.up.toy_A": torch.zeros(3, 8, dtype=torch.int32)}),
    )
    err = load_fails(saved)
    assert isinstance(err, CheckpointError)
    assert "'base_model.model.up.toy_A' has dtype torch.int32" in str(err)


def test_failed_load_adapter_leaves_the_model_unchanged(saved: Path) -> None:
    rewrite(saved, lambda t: t.pop("base_model.model.up.toy_A"))
    model = trained()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"base_model\.model\.up\.toy_A"):
        model.load_adapter(saved, adapter_name="b")
    assert_unchanged(model, before)
    assert set(model.peft_config) == {"default"}
    assert model.model.up.adapter_names == ["default"]


def test_from_pretrained_argument_errors(saved: Path) -> None:
    with pytest.raises(TypeError, match=r"unexpected arguments \['low_cpu_mem'\]"):
        AdaptedModel.from_pretrained(mlp(), saved, low_cpu_mem=True)
    # PEFT's Hub download arguments are accepted; a local folder needs none of them
    AdaptedModel.from_pretrained(mlp(), saved, revision="main", local_files_only=True)


def test_read_tensors_directly(saved: Path) -> None:
    assert sorted(read_tensors(saved)) == KEYS


def test_normalise_peft_modules_to_save_keys() -> None:
    t = torch.zeros(1)
    tensors = {
        "base_model.model.head.original_module.bias": t,
        "base_model.model.head.modules_to_save.default.bias": t,
        "base_model.model.head.modules_to_save.default.weight": t,
        "base_model.model.head.bias": t,
    }
    assert sorted(_normalise_peft_keys(tensors)) == [
        "base_model.model.head.bias",
        "base_model.model.head.weight",
    ]


def test_modules_to_save_round_trip(tmp_path: Path, x: torch.Tensor) -> None:
    model = adapt(
        mlp(), ToyConfig(target_modules=["up"], modules_to_save=["head"], init_identity=False)
    )
    with torch.no_grad():
        model.model.head.modules_to_save["default"].bias += 1.0
    expected = out(model, x)
    model.save_pretrained(tmp_path)
    keys = sorted(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert keys == [
        "base_model.model.head.bias",
        "base_model.model.head.weight",
        "base_model.model.up.toy_A",
        "base_model.model.up.toy_B",
    ]
    loaded = AdaptedModel.from_pretrained(mlp(), tmp_path)
    torch.testing.assert_close(out(loaded, x), expected)


def test_pickle_opt_in_uses_weights_only_loading(saved: Path, tmp_path: Path) -> None:
    """allow_pickle=True reads a .bin with torch.load(weights_only=True): tensors load, and a
    pickle that would run code is refused instead of executed."""
    from safetensors.torch import load_file

    tensors = load_file(saved / WEIGHTS_NAME)
    (saved / WEIGHTS_NAME).unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    model = AdaptedModel.from_pretrained(mlp(), saved, allow_pickle=True)
    got = model.adapter_state_dict("default")
    assert all(torch.equal(got[k], v) for k, v in tensors.items())

    marker = tmp_path / "unpickled"
    (saved / "adapter_model.bin").write_bytes(pickle.dumps(Trap(marker)))
    with pytest.raises(CheckpointError, match=r"cannot be loaded with torch.load\(weights_only"):
        AdaptedModel.from_pretrained(mlp(), saved, allow_pickle=True)
    assert not marker.exists()


def test_load_adapter_state_dict_round_trips(saved: Path, x: torch.Tensor) -> None:
    source = trained()
    base = mlp()
    torch.manual_seed(9)  # other adapter values than the source's
    target = adapt(base, ToyConfig(target_modules=["up", "down"], init_identity=False, r=3))
    assert not torch.allclose(out(target, x), out(source, x))
    state = {k: v.detach().clone() for k, v in source.adapter_state_dict("default").items()}
    target.load_adapter_state_dict(state)
    torch.testing.assert_close(out(target, x), out(source, x))
    # the tensors were copied, not shared
    assert all(
        t.data_ptr() != s.data_ptr()
        for t, s in zip(target.adapter_state_dict("default").values(), state.values(), strict=True)
    )


@pytest.mark.parametrize("fault", ["shape", "missing", "extra", "nan"])
def test_load_adapter_state_dict_refuses_bad_tensors_and_changes_nothing(
    fault: str, x: torch.Tensor
) -> None:
    source = trained()
    base = mlp()
    torch.manual_seed(9)
    target = adapt(base, ToyConfig(target_modules=["up", "down"], init_identity=False, r=3))
    before = out(target, x)
    assert not torch.allclose(before, out(source, x))
    state = {k: v.detach().clone() for k, v in source.adapter_state_dict("default").items()}
    key = sorted(state)[-1]
    if fault == "shape":
        state[key] = torch.zeros(7, 7)
    elif fault == "missing":
        del state[key]
    elif fault == "extra":
        state["base_model.model.nowhere.toy_A"] = torch.zeros(2, 2)
    else:
        state[key] = torch.full_like(state[key], float("nan"))
    with pytest.raises(CheckpointError, match="state_dict: "):
        target.load_adapter_state_dict(state)
    torch.testing.assert_close(out(target, x), before, rtol=0, atol=0)


def test_load_adapter_state_dict_needs_an_existing_adapter() -> None:
    with pytest.raises(AdapterStateError, match=r"no adapter named 'b'.*add_adapter"):
        trained().load_adapter_state_dict({}, adapter_name="b")


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_saved_files_get_the_usual_permissions(tmp_path: Path, umask: int, mode: int) -> None:
    """Files are created as open() would under the umask (0644 usually), not mkstemp's 0600,
    so other users and containers can read the adapter; the save stays atomic."""
    old = os.umask(umask)
    try:
        trained().save_pretrained(tmp_path / "ckpt")
        trained().save_pretrained(tmp_path / "ckpt")  # overwriting keeps them so
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o777 == mode, name
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
