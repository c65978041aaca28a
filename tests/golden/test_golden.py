"""adapt writes the golden checkpoints (``fixtures/``) byte for byte: see golden.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

import golden  # this folder is on sys.path under pytest


@pytest.mark.parametrize("case", list(golden.CASES))
def test_checkpoint_is_byte_identical(case: str, tmp_path: Path) -> None:
    folder = tmp_path / case
    golden.CASES[case](folder)
    want = golden.FIXTURES / case
    for name in golden.FILES:
        got, expected = (folder / name).read_bytes(), (want / name).read_bytes()
        assert got == expected, (
            f"{case}/{name} differs from the golden file ({len(got)} vs {len(expected)} bytes); "
            "if the format change is intended, rewrite with `python tests/golden/golden.py "
            "--write` and say so in the commit"
        )
    assert sorted(p.name for p in folder.iterdir()) == sorted(golden.FILES)


def test_fixtures_are_not_trivial() -> None:
    """The golden adapters hold real values (not all zeros), the configs their method."""
    from safetensors.torch import load_file

    for case in golden.CASES:
        tensors = load_file(str(golden.FIXTURES / case / "adapter_model.safetensors"))
        assert tensors and any(bool(t.abs().sum() > 0) for t in tensors.values()), case
        config = json.loads((golden.FIXTURES / case / "adapter_config.json").read_text())
        method = "LORA" if case.startswith(("lora", "peft")) else case.split("-")[0].upper()
        assert config["peft_type"] == method, case
        assert config["base_model_name_or_path"] == golden.BASE_NAME
    peft_tensors = load_file(str(golden.FIXTURES / "peft-lora" / "adapter_model.safetensors"))
    resaved = load_file(str(golden.FIXTURES / "peft-lora-resaved" / "adapter_model.safetensors"))
    assert sorted(peft_tensors) == sorted(resaved)
    assert all(torch.equal(peft_tensors[k], resaved[k]) for k in peft_tensors)
