"""Combining saved LoRA adapters without the base model (``combine_saved_adapters``, ``adapt
combine``): the same bytes as the in-model combination saved, and clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lora_testutils import ids, max_diff, tiny_llama  # noqa: E402

from adapt.core import AdaptedModel, CheckpointError, ConfigError, adapt  # noqa: E402
from adapt.core import combine_saved_adapters as combine  # noqa: E402
from adapt.core.cli import main  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

TARGETS = ["q_proj", "v_proj", "embed_tokens"]
WEIGHTS = [0.7, 0.3]


def save_sources(tmp: Path, *, extra: dict[str, Any] | None = None) -> list[Path]:
    """Two adapters of one tiny Llama (ranks 4 and 2 + a rank pattern, rsLoRA on the second),
    saved; returns their folders."""
    torch.manual_seed(0)
    kw: dict[str, Any] = {"target_modules": TARGETS, "init_lora_weights": False, **(extra or {})}
    model = adapt(tiny_llama(), LoraConfig(r=4, lora_alpha=8, **kw))
    model.add_adapter(
        "b", LoraConfig(r=2, lora_alpha=3, use_rslora=True, rank_pattern={"v_proj": 3}, **kw)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "magnitude" in name or name.endswith("lora_B.b.bias"):
                param.add_(torch.rand_like(param) * 0.1)
    model.save_pretrained(tmp)
    return [tmp, tmp / "b"]


def in_model(folders: list[Path], out: Path, kind: str, **kw: Any) -> Path:
    model = AdaptedModel.from_pretrained(tiny_llama(), folders[0], adapter_name="a")
    model.load_adapter(folders[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind, **kw)
    model.save_pretrained(out, selected_adapters=["mix"])
    return out / "mix"


def same_files(x: Path, y: Path) -> None:
    name = "adapter_model.safetensors"
    assert (x / name).read_bytes() == (y / name).read_bytes()
    assert json.loads((x / "adapter_config.json").read_text()) == json.loads(
        (y / "adapter_config.json").read_text()
    )


DETERMINISTIC = [
    ("cat", {}),
    ("svd", {"svd_rank": 3}),
    ("svd", {"svd_rank": 4, "svd_clamp": 0.9}),
    ("ties_svd", {"density": 0.5}),
    ("magnitude_prune_svd", {"density": 0.5, "svd_rank": 5}),
]


@pytest.mark.parametrize(("kind", "kw"), DETERMINISTIC)
def test_on_disk_is_the_in_model_combination_byte_for_byte(
    tmp_path: Path, kind: str, kw: dict[str, Any]
) -> None:
    folders = save_sources(tmp_path / "src")
    expected = in_model(folders, tmp_path / "model", kind, **kw)
    got = combine(folders, WEIGHTS, tmp_path / "disk", combination_type=kind, **kw)
    same_files(got, expected)
    reloaded = AdaptedModel.from_pretrained(tiny_llama(), got)
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=ids()).logits).all()


@pytest.mark.parametrize("kind", ["linear", "ties", "magnitude_prune"])
def test_factor_wise_types_on_disk_equal_in_model(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(target_modules=TARGETS, init_lora_weights=False)
    model = adapt(tiny_llama(), LoraConfig(r=4, **kw))
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=2, **kw))
    model.save_pretrained(tmp_path / "src")
    folders = [tmp_path / "src", tmp_path / "src" / "b"]
    density = None if kind == "linear" else 0.4
    expected = in_model(folders, tmp_path / "model", kind, density=density)
    got = combine(folders, WEIGHTS, tmp_path / "disk", combination_type=kind, density=density)
    same_files(got, expected)


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"lora_bias": True}])
def test_dora_and_lora_bias_on_disk(tmp_path: Path, extra: dict[str, Any]) -> None:
    targets = {"target_modules": ["q_proj", "v_proj"], **extra}
    folders = save_sources(tmp_path / "src", extra=targets)
    expected = in_model(folders, tmp_path / "model", "cat")
    got = combine(folders, WEIGHTS, tmp_path / "disk", combination_type="cat")
    same_files(got, expected)


def test_dora_weights_not_summing_to_one_need_the_base(tmp_path: Path) -> None:
    extra = {"target_modules": ["q_proj"], "use_dora": True}
    folders = save_sources(tmp_path / "src", extra=extra)
    with pytest.raises(ConfigError, match=r"needs the base weight's row norms.*sum to 1.2"):
        combine(folders, [0.7, 0.5], tmp_path / "out", combination_type="cat")
    assert not (tmp_path / "out").exists()


def test_dare_on_disk_draws_from_the_generator(tmp_path: Path) -> None:
    folders = save_sources(tmp_path / "src")

    def run(seed: int, name: str) -> bytes:
        gen = torch.Generator().manual_seed(seed)
        out = combine(folders, WEIGHTS, tmp_path / name, combination_type="dare_linear_svd",
                      density=0.5, generator=gen)  # fmt: skip
        return (out / "adapter_model.safetensors").read_bytes()

    assert run(1, "x") == run(1, "y") != run(2, "z")


def test_different_targets_are_refused_unless_the_union_is_asked_for(tmp_path: Path) -> None:
    torch.manual_seed(0)
    kw: dict[str, Any] = dict(init_lora_weights=False)
    model = adapt(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], **kw))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw))
    model.save_pretrained(tmp_path / "src")
    folders = [tmp_path / "src", tmp_path / "src" / "b"]
    with pytest.raises(ConfigError, match=r"adapt different modules.*only .*b' adapts.*v_proj"):
        combine(folders, WEIGHTS, tmp_path / "out", combination_type="cat")
    got = combine(folders, WEIGHTS, tmp_path / "out", combination_type="cat", union_targets=True)
    same_files(got, in_model(folders, tmp_path / "model", "cat"))


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_mismatched_adapters_are_refused_clearly(tmp_path: Path) -> None:
    folders = save_sources(tmp_path / "src")
    other = tmp_path / "other"
    shutil.copytree(folders[1], other)
    edit_config(other, base_model_name_or_path="org/another-model")
    edit_config(folders[0], base_model_name_or_path="org/tiny-llama")
    with pytest.raises(ConfigError, match=r"trained on different base models.*another-model"):
        combine([folders[0], other], WEIGHTS, tmp_path / "out")
    edit_config(other, base_model_name_or_path="org/tiny-llama", peft_type="VERA")
    with pytest.raises(ConfigError, match=r"one method only.*is LORA.*is VERA"):
        combine([folders[0], other], WEIGHTS, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_adapters_of_another_model_shape_are_refused(tmp_path: Path) -> None:
    folders = save_sources(tmp_path / "src")
    torch.manual_seed(0)
    wide = tiny_llama(hidden_size=48)
    adapt(wide, LoraConfig(r=4, target_modules=TARGETS)).save_pretrained(tmp_path / "wide")
    with pytest.raises(CheckpointError, match=r"fits a weight of shape .* different base models"):
        combine([folders[0], tmp_path / "wide"], WEIGHTS, tmp_path / "out")


def test_bad_calls_change_nothing_on_disk(tmp_path: Path) -> None:
    folders = save_sources(tmp_path / "src")
    before = {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="is one of the adapters being combined"):
        combine(folders, WEIGHTS, folders[1])
    with pytest.raises(ConfigError, match="2 weights for 1 adapters"):
        combine(folders[:1], WEIGHTS, tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ConfigError, match=r"not empty.*overwrite=True"):
        combine(folders, WEIGHTS, tmp_path / "full")
    (folders[1] / "adapter_model.safetensors").write_bytes(b"broken")
    before[folders[1] / "adapter_model.safetensors"] = b"broken"
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        combine(folders, WEIGHTS, tmp_path / "out")
    after = {p: p.read_bytes() for p in (tmp_path / "src").rglob("*") if p.is_file()}
    assert after == before and not (tmp_path / "out").exists()


def test_modules_to_save_adapters_are_refused(tmp_path: Path) -> None:
    folders = save_sources(tmp_path / "src", extra={"modules_to_save": ["lm_head"]})
    with pytest.raises(ConfigError, match=r"modules_to_save.*cannot be combined"):
        combine(folders, WEIGHTS, tmp_path / "out")


def test_cli_combines_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folders = save_sources(tmp_path / "src")
    out = tmp_path / "cli"
    args = ["combine", "--adapter", str(folders[0]), "--adapter", str(folders[1])]
    code = main([*args, "--weights", "0.7,0.3", "--type", "svd", "--svd-rank", "3", "--out",
                 str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "combining 0.7 × " in printed and f"wrote {out}: LORA adapter, r = 3" in printed
    same_files(out, in_model(folders, tmp_path / "model", "svd", svd_rank=3))
    assert main([*args, "--weights", "0.7", "--out", str(tmp_path / "x")]) == 1
    assert "gives 1 weights for 2 --adapter folders" in capsys.readouterr().err
    assert main([*args, "--weights", "0.7,a", "--out", str(tmp_path / "x")]) == 1
    assert "give numbers separated by commas" in capsys.readouterr().err


def test_combined_on_disk_gives_the_in_model_outputs(tmp_path: Path) -> None:
    folders = save_sources(tmp_path / "src")
    got = combine(folders, WEIGHTS, tmp_path / "disk", combination_type="cat")
    model = AdaptedModel.from_pretrained(tiny_llama(), folders[0], adapter_name="a")
    model.load_adapter(folders[1], adapter_name="b")
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="cat")
    model.set_adapter("mix")
    with torch.no_grad():
        expected = model(input_ids=ids()).logits
        reloaded = AdaptedModel.from_pretrained(tiny_llama(), got)
        assert max_diff(reloaded(input_ids=ids()).logits, expected) == 0
