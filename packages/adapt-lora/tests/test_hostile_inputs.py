"""Hostile input: every bad file or value gets a clear error and leaves the model unchanged.

Each case corrupts a good saved adapter in one way, then loads it twice: with
``AdaptedModel.from_pretrained`` onto a fresh base (which must come back untouched: no
adapter layers, same weights, same trainability), and with ``load_adapter`` next to an
existing adapter (which must leave that model exactly as it was).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lora_testutils import LLAMA_TARGETS, ids, tiny_llama
from safetensors.torch import load_file, save_file

from adapt.core import AdaptedModel, AdaptError, adapt
from adapt.lora import LoraConfig

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    model = adapt(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    model.save_pretrained(folder)
    return folder


def edit_config(**changes: object) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = json.loads((folder / CONFIG).read_text())
        data.update(changes)
        (folder / CONFIG).write_text(json.dumps(data))

    return apply


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / WEIGHTS, {"format": "pt"})

    return apply


def first_key(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(tensors)[0]


def truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def flip_header(folder: Path) -> None:
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[8:20] = b"not json!!!!"
    (folder / WEIGHTS).write_bytes(bytes(data))


def huge_header(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(struct.pack("<Q", 2**40) + data[8:])


def set_value(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(t: dict[str, torch.Tensor]) -> None:
        key = first_key(t)
        t[key] = t[key].clone()
        t[key].view(-1)[0] = value

    return edit


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated safetensors": (truncate, "corrupt or truncated"),
    "garbage safetensors header": (flip_header, "corrupt or truncated"),
    "safetensors header claiming 1 TiB": (huge_header, "corrupt or truncated"),
    "empty safetensors file": (lambda f: (f / WEIGHTS).write_bytes(b""), "corrupt or truncated"),
    "config is not JSON": (lambda f: (f / CONFIG).write_text("{'r': 4,"), "not valid JSON"),
    "config is a JSON list": (lambda f: (f / CONFIG).write_text("[1, 2]"), "JSON object"),
    "config without peft_type": (
        lambda f: (f / CONFIG).write_text(json.dumps({"r": 4})),
        "no 'peft_type'",
    ),
    "r is a string": (edit_config(r="4"), "r has the wrong type"),
    "r is negative": (edit_config(r=-4), "r must be > 0"),
    "lora_alpha is a list": (edit_config(lora_alpha=[8]), "lora_alpha"),
    "target_modules is a number": (edit_config(target_modules=3), "target_modules"),
    "unknown method": (edit_config(peft_type="FANCY_NEW"), "FANCY_NEW"),
    "PEFT feature adapt lacks (QALoRA)": (edit_config(use_qalora=True), "use_qalora"),
    "DoRA config, no magnitude tensors": (edit_config(use_dora=True), "lora_magnitude_vector"),
    "NaN in a tensor": (edit_tensors(set_value(float("nan"))), "NaN or Inf"),
    "Inf in a tensor": (edit_tensors(set_value(float("inf"))), "NaN or Inf"),
    "tensor of the wrong shape": (
        edit_tensors(lambda t: t.update({first_key(t): torch.zeros(3, 3)})),
        r"has shape \(3, 3\)",
    ),
    "integer tensor": (
        edit_tensors(lambda t: t.update({first_key(t): t[first_key(t)].to(torch.int32)})),
        "dtype torch.int32",
    ),
    "missing tensor": (edit_tensors(lambda t: t.pop(first_key(t))), "lacks 1 tensor"),
    "tensor for a module this model lacks": (
        edit_tensors(
            lambda t: t.update(
                {"base_model.model.model.layers.9.mlp.lora_A.weight": torch.zeros(4, 4)}
            )
        ),
        "match no module of this model",
    ),
    "checkpoint for another base model": (
        edit_config(target_modules=["nonexistent_proj"]),
        "nonexistent_proj",
    ),
    "pickle file instead of safetensors": (
        lambda f: (
            (f / WEIGHTS).unlink(),
            (f / "adapter_model.bin").write_bytes(b"\x80\x04K\x01."),
        ),
        "pickle file",
    ),
    "no weights file": (lambda f: (f / WEIGHTS).unlink(), f"holds no {WEIGHTS}"),
    "no config file": (lambda f: (f / CONFIG).unlink(), f"holds no {CONFIG}"),
}


def snapshot(model: torch.nn.Module) -> dict[str, object]:
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
    }


def assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before["modules"] == after["modules"]
    assert before["trainable"] == after["trainable"]
    a, b = before["state"], after["state"]
    assert isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_checkpoint(case: str, good: Path, tmp_path: Path) -> None:
    corrupt, message = CASES[case]
    folder = tmp_path / "bad"
    shutil.copytree(good, folder)
    corrupt(folder)

    base = tiny_llama()
    before = snapshot(base)
    with pytest.raises(AdaptError, match=message) as info:
        AdaptedModel.from_pretrained(base, folder)
    assert_same(before, snapshot(base))

    model = adapt(tiny_llama(), LoraConfig(r=2, target_modules=["o_proj"]))
    before = snapshot(model)
    with torch.no_grad():
        want = model(input_ids=ids()).logits
    with pytest.raises(AdaptError, match=message):
        model.load_adapter(folder, adapter_name="other")
    assert_same(before, snapshot(model))
    assert set(model.peft_config) == {"default"}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, want)
    print(f"{case}: {type(info.value).__name__}: {str(info.value)[:110]}")


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "..", "", "x" * 300, "with space", "dot.name", "__base__"]
)
def test_hostile_adapter_names(name: str, good: Path, tmp_path: Path) -> None:
    model = adapt(tiny_llama(), LoraConfig(r=2, target_modules=["o_proj"]))
    before = snapshot(model)
    with pytest.raises(AdaptError, match=r"adapter name|reserved"):
        model.load_adapter(good, adapter_name=name)
    with pytest.raises(AdaptError, match=r"adapter name|reserved"):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdaptError, match=r"adapter name|reserved"):
        AdaptedModel.from_pretrained(tiny_llama(), good, adapter_name=name)
    assert_same(before, snapshot(model))
    assert not (tmp_path.parent / "escape").exists()


def test_count(good: Path) -> None:
    """The closing note counts these."""
    print(f"hostile checkpoint cases: {len(CASES)}")
    assert len(CASES) >= 20
