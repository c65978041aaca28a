"""``combine_saved_adapters`` (core's part, with the toy method): what core checks before the
method computes (one method, one base model, the same modules, the output folder), what it
hands the method and writes, and the default refusal of a method without the hook."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from core_testutils import mlp

from adapt.core import (
    AdapterConfig,
    CheckpointError,
    CombineOptions,
    ConfigError,
    adapt,
    combine_saved_adapters,
)
from adapt.core.registry import Registry
from adapt.core.testing import ToyConfig, ToyMethod, registered_toy


class SummingToy(ToyMethod):
    """The toy method with an on-disk combination: the weighted sum of every tensor."""

    seen: list[Any] = []

    def combine_checkpoints(
        self,
        configs: Sequence[AdapterConfig],
        tensors: Sequence[Mapping[str, torch.Tensor]],
        weights: Sequence[float],
        options: CombineOptions,
    ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        self.seen.append((list(configs), [dict(t) for t in tensors], list(weights), options))
        if options.combination_type == "fail":
            raise ConfigError("adapter #2 cannot be combined")
        out = {k: sum(w * t[k] for t, w in zip(tensors, weights, strict=True)) for k in tensors[0]}
        return configs[0], {k: torch.as_tensor(v) for k, v in out.items()}


def save_two(tmp: Path, targets: tuple[list[str], list[str]] = (["up"], ["up"])) -> list[Path]:
    folders = []
    for i, target in enumerate(targets):
        model = adapt(mlp(), ToyConfig(target_modules=target, init_identity=False))
        model.save_pretrained(tmp / f"a{i}")
        folders.append(tmp / f"a{i}")
    return folders


def test_a_method_without_the_hook_is_refused(tmp_path: Path) -> None:
    folders = save_two(tmp_path)
    with pytest.raises(ConfigError, match="cannot combine saved adapters without the base model"):
        combine_saved_adapters(folders, [0.5, 0.5], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def summing(registry: Registry) -> Any:
    SummingToy.seen = []
    with registered_toy(registry, method=SummingToy()) as method:
        yield method


def test_core_hands_the_method_the_files_and_writes_its_result(
    tmp_path: Path, summing: SummingToy
) -> None:
    folders = save_two(tmp_path)
    out = combine_saved_adapters(folders, [0.25, 0.75], tmp_path / "out", combination_type="x")
    configs, tensors, weights, options = SummingToy.seen[0]
    assert all(isinstance(c, ToyConfig) for c in configs) and weights == [0.25, 0.75]
    assert options.combination_type == "x"
    key = "base_model.model.up.toy_A"
    assert key in tensors[0]
    from safetensors.torch import load_file

    written = load_file(str(out / "adapter_model.safetensors"))
    assert torch.allclose(written[key], 0.25 * tensors[0][key] + 0.75 * tensors[1][key])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "TOY" and config["inference_mode"] is True


def test_method_errors_say_which_folder_is_which(tmp_path: Path, summing: SummingToy) -> None:
    folders = save_two(tmp_path)
    with pytest.raises(ConfigError, match=r"adapter #2 cannot be combined \[#1 = .*a0', #2 = "):
        combine_saved_adapters(folders, [0.5, 0.5], tmp_path / "out", combination_type="fail")
    assert not (tmp_path / "out").exists()


def edit(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_core_refusals(tmp_path: Path, summing: SummingToy) -> None:
    folders = save_two(tmp_path)
    edit(folders[0], base_model_name_or_path="org/m", revision="v1")
    edit(folders[1], base_model_name_or_path="org/m", revision="v2")
    with pytest.raises(ConfigError, match=r"different base models.*'org/m' \(revision 'v2'\)"):
        combine_saved_adapters(folders, [0.5, 0.5], tmp_path / "out")
    edit(folders[1], revision="v1", peft_type="LORA")
    with pytest.raises(ConfigError, match=r"of one method only.*is TOY.*is LORA"):
        combine_saved_adapters(folders, [0.5, 0.5], tmp_path / "out")
    edit(folders[1], peft_type="TOY")
    with pytest.raises(ConfigError, match="3 weights for 2 adapters"):
        combine_saved_adapters(folders, [0.5, 0.5, 1.0], tmp_path / "out")
    with pytest.raises(ConfigError, match="adapters must be a list of adapter folders"):
        combine_saved_adapters(str(folders[0]), [1.0], tmp_path / "out")
    with pytest.raises(CheckpointError, match="no adapter at"):
        combine_saved_adapters([folders[0], tmp_path / "nowhere"], [0.5, 0.5], tmp_path / "out")
    assert not SummingToy.seen and not (tmp_path / "out").exists()
    out = combine_saved_adapters(folders, [0.5, 0.5], tmp_path / "out")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "org/m"
    )


def test_different_modules_need_union_targets(tmp_path: Path, summing: SummingToy) -> None:
    folders = save_two(tmp_path, (["up"], ["up", "down"]))
    with pytest.raises(ConfigError, match=r"only .*a1' adapts \['down'\].*union_targets=True"):
        combine_saved_adapters(folders, [0.5, 0.5], tmp_path / "out")
    combine_saved_adapters(folders, [0.5, 0.5], tmp_path / "out", union_targets=True)
    _, tensors, _, _ = SummingToy.seen[0]  # what to do with the union is the method's call
    assert "base_model.model.down.toy_A" in tensors[1]
    assert "base_model.model.down.toy_A" not in tensors[0]
