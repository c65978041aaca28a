"""The scripts of docs/guides/distributed.md, run as the guide says: under torchrun, 2 CPU ranks.

Every python block of the guide is a script (its docstring starts with its name, ``name.py:``)
and is marked for the docs session to skip; here each runs, in one of three launches (plain
torch, accelerate, DeepSpeed), and each must leave an adapter that loads.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from launching import torchrun

from adapt.core import AdaptedModel
from adapt.core.testing import tiny_llama

HERE = Path(__file__).resolve().parent
GUIDE = HERE.parent.parent / "docs" / "guides" / "distributed.md"
#: launch -> the scripts (with their argument) it runs, and the adapter folders they write
LAUNCHES = {
    "torch": ["train.py:ddp", "train.py:fsdp", "train.py:fsdp1", "train_adalora.py",
              "train_qlora_fsdp.py"],
    "accelerate": ["train_accelerate.py"],
    "deepspeed": ["train_deepspeed.py:lora", "train_deepspeed.py:adalora"],
}  # fmt: skip
WRITES = {
    "train.py": "out/adapter",
    "train_adalora.py": "out/adalora",
    "train_qlora_fsdp.py": "out/qlora",
    "train_accelerate.py": "out/accelerate",
    "train_deepspeed.py": "out/deepspeed/final",
}
TIMEOUT = 200


def scripts() -> dict[str, str]:
    """name -> source of every python block in the guide."""
    found = {}
    for block in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S):
        name = re.match(r'"""(\w+\.py):', block)
        assert name, f"a python block of {GUIDE.name} does not name its script:\n{block[:200]}"
        found[name[1]] = block
    return found


def test_every_block_is_a_script_run_here() -> None:
    text = GUIDE.read_text()
    assert text.count("```python") == len(scripts()) == len(WRITES)
    assert text.count("<!-- docs: skip -->") == text.count("```python")
    assert {s.partition(":")[0] for specs in LAUNCHES.values() for s in specs} == set(WRITES)


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_guide_scripts_run_under_torchrun(launch: str, tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    for name, source in scripts().items():
        (tmp_path / "scripts" / name).write_text(source)
    if launch == "deepspeed":
        pytest.importorskip("deepspeed")
    args = [str(tmp_path), *LAUNCHES[launch]]
    proc = torchrun(HERE / "guide_runner.py", args, tmp_path, TIMEOUT)
    output = proc.output
    assert proc.returncode == 0, output[-8000:]
    for spec in LAUNCHES[launch]:
        name, _, arg = spec.partition(":")
        folder = tmp_path / f"{Path(name).stem}-{arg or 'default'}" / WRITES[name]
        assert (folder / "adapter_model.safetensors").is_file(), (spec, output[-4000:])
        # unseeded: the kit's tiny Llama at transformers' default max_position_embeddings
        base = tiny_llama(None, training=True, max_position_embeddings=2048)
        AdaptedModel.from_pretrained(base, folder)
    if launch == "accelerate":
        assert "2 processes" in proc.stdout, output[-4000:]
    if launch == "torch":
        assert "ranks kept per matrix" in proc.stdout
