"""``adapt inspect`` asks the method what to show: a third-party method defined here (not one
core knows) shows its own config keys, modules and ranks; without it, the generic rule."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from core_testutils import mlp
from torch import nn

from adapt.core import AdapterConfig, AdapterLayer, Method, MissingMethodError, adapt
from adapt.core.cli import main
from adapt.core.cli.layout import GENERIC_SUMMARY_KEYS, split_key
from adapt.core.layer import adapter_dtype_device
from adapt.core.protocols import ModelView
from adapt.core.registry import Registry
from adapt.core.testing import isolated_registry


@dataclasses.dataclass
class GatedConfig(AdapterConfig):
    """``out = base(x) + gate * up(down(x))``; ``r`` is down's width."""

    peft_type: ClassVar[str] = "GATED"

    r: int = 2
    gain: float = 0.5


class GatedLayer(AdapterLayer):
    method: ClassVar[str] = "gated"
    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("gated_down", "gated_up", "gated_gate")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.gated_down = nn.ModuleDict()  # saved as gated_down.weight
        self.gated_up = nn.ModuleDict()
        self.gated_gate = nn.ParameterDict()  # saved as gated_gate

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        r = kwargs.get("r", config.r)
        dtype, device = adapter_dtype_device(self)
        down = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        up = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)
        nn.init.normal_(up.weight, std=1 / math.sqrt(r))
        self.gated_down[adapter_name] = down
        self.gated_up[adapter_name] = up
        self.gated_gate[adapter_name] = nn.Parameter(torch.full((1,), config.gain, dtype=dtype))

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        hidden = self.gated_down[adapter_name](x.to(self.gated_gate[adapter_name].dtype))
        out: torch.Tensor = self.gated_gate[adapter_name] * self.gated_up[adapter_name](hidden)
        return out

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        up, down = self.gated_up[adapter_name].weight, self.gated_down[adapter_name].weight
        delta: torch.Tensor = self.gated_gate[adapter_name] * (up @ down)
        return delta


class GatedMethod(Method[GatedConfig]):
    name: ClassVar[str] = "gated"
    peft_type: ClassVar[str] = "GATED"
    package: ClassVar[str] = "adapt-gated-test"
    config_class: ClassVar[type[AdapterConfig]] = GatedConfig
    summary_keys: ClassVar[tuple[str, ...]] = ("gain", "r")
    tensor_prefixes: ClassVar[tuple[str, ...]] = ("gated_",)

    def layer_kwargs(
        self, model: ModelView, config: GatedConfig, adapter_name: str, path: str
    ) -> dict[str, Any]:
        return {"r": config.r + 1} if path == "down" else {}

    def rank_of(self, tensors: Mapping[str, tuple[int, ...]]) -> int | None:
        shape = tensors.get("gated_down.weight")
        return shape[0] if shape else None


def _register(reg: Registry, method: Method[Any]) -> None:
    reg.register_method(method, name="gated")
    reg.register_layer(GatedLayer, name="gated-linear")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A GATED adapter on ``up`` (rank 2) and ``down`` (rank 3), with ``head`` saved whole."""
    with isolated_registry() as reg:
        _register(reg, GatedMethod())
        model = adapt(
            mlp(), GatedConfig(target_modules=["up", "down"], modules_to_save=["head"], gain=0.25)
        )
        model.save_pretrained(tmp_path / "gated")
    return tmp_path / "gated"


def _inspect(folder: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> list[str]:
    assert main(["inspect", str(folder), *extra]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out.splitlines()


def test_a_third_party_method_shows_its_keys_modules_and_ranks(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with isolated_registry() as reg:
        _register(reg, GatedMethod())
        lines = _inspect(folder, capsys)
    assert lines[:6] == [
        f"adapter:      {folder}",
        "method:       GATED",
        "base model:   (not recorded)",
        "targets:      ['up', 'down']",
        "gain:         0.25",  # the method's keys, in its order
        "r:            2",
    ]
    assert "tensors:      8 in 3 modules, 147 parameters" in lines
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["module", "rank", "tensors"]
    assert table[2:] == [
        "down    3     gated_down.weight [3, 12], gated_gate [1], gated_up.weight [8, 3]",
        "head          bias [5], weight [5, 8]",
        "up      2     gated_down.weight [2, 8], gated_gate [1], gated_up.weight [12, 2]",
    ]


def test_without_the_method_inspect_uses_the_generic_rule(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with isolated_registry():  # nothing provides GATED
        lines = _inspect(folder, capsys)
    assert "method:       GATED" in lines  # no note: today's message for an unknown method
    assert "r:            2" in lines and not any(line.startswith("gain:") for line in lines)
    # cut at the first segment starting with "gated_" (the peft_type's), no ranks
    rows = [line.split("  ")[0] for line in lines[lines.index("") + 3 :]]
    assert rows == ["down", "head", "up"]
    assert all(line[8:12].strip() == "" for line in lines[lines.index("") + 3 :])


def test_a_broken_plugin_falls_back_to_the_generic_rule(
    folder: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Registry, name: str) -> Method[Any]:
        raise MissingMethodError(f"the adapter method {name!r} is installed but failed to import")

    with isolated_registry() as reg:
        _register(reg, GatedMethod())
        monkeypatch.setattr(Registry, "get_method", broken)
        lines = _inspect(folder, capsys)
    assert "r:            2" in lines and not any(line.startswith("gain:") for line in lines)
    assert any(line.startswith("down  ") for line in lines)


def test_a_failing_rank_of_leaves_the_rank_blank(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Failing(GatedMethod):
        def rank_of(self, tensors: Mapping[str, tuple[int, ...]]) -> int | None:
            raise KeyError("gated_down.weight")

    with isolated_registry() as reg:
        _register(reg, Failing())
        lines = _inspect(folder, capsys)
    assert "gain:         0.25" in lines
    down = next(line for line in lines if line.startswith("down "))
    assert down.split()[1] == "gated_down.weight"  # no rank column value


def test_json_and_all_are_unchanged_by_the_method(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with isolated_registry() as reg:
        _register(reg, GatedMethod())
        lines = _inspect(folder, capsys, "--all", "--json")
    start = lines.index("{")
    data = json.loads("\n".join(lines[start:]))
    assert data["config"]["peft_type"] == "GATED"
    assert data["tensors"]["base_model.model.down.gated_down.weight"] == [3, 12]


def test_method_defaults_fit_a_generic_method() -> None:
    assert Method.summary_keys == GENERIC_SUMMARY_KEYS == ("r",)
    assert Method.tensor_prefixes == ()
    assert Method().rank_of({"x.weight": (4, 4)}) is None


@pytest.mark.parametrize(
    ("key", "prefixes", "expected"),
    [
        ("base_model.model.a.b.lora_A.weight", ("lora_",), ("a.b", "lora_A.weight")),
        ("base_model.model.a.b.lora_A.weight", ("foo_",), ("a.b.lora_A", "weight")),
        ("base_model.model.lm_head.weight", ("lora_",), ("lm_head", "weight")),
        ("base_model.model.emb.vera_lambda_d", ("vera_",), ("emb", "vera_lambda_d")),
        ("base_model.model.x.w", (), ("x", "w")),
    ],
)
def test_split_key(key: str, prefixes: tuple[str, ...], expected: tuple[str, str]) -> None:
    assert split_key(key, prefixes) == expected


def test_unknown_method_and_missing_files_keep_their_messages(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "NOPE"}))
    lines = _inspect(folder, capsys)
    assert "method:       NOPE" in lines
    (folder / "adapter_model.safetensors").unlink()
    assert main(["inspect", str(folder)]) == 1
    assert capsys.readouterr().err == (
        f"adapt inspect: error: {str(folder)!r} holds no adapter_model.safetensors\n"
    )
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    assert main(["inspect", str(folder)]) == 1
    assert "is corrupt and cannot be read" in capsys.readouterr().err
