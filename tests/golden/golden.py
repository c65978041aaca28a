"""Golden checkpoints: what adapt writes today, kept byte for byte (issue 21: the core redesign
must not change a single byte of them).

Each case writes an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``):

* ``<method>-dense``: a seeded ``adapt()`` of a tiny Llama, saved (LoRA, VeRA, AdaLoRA);
* ``<method>-nf4``: the same on the Llama loaded 4-bit (bitsandbytes nf4) by transformers;
* ``lora-resaved``: ``lora-dense`` loaded into a fresh base and saved again;
* ``peft-lora-resaved``: the PEFT-written ``fixtures/peft-lora`` loaded by adapt and saved.

``python tests/golden/golden.py --write`` rewrites ``fixtures/`` (only for an intended format
change, said so in the commit); ``--peft`` also rewrites ``fixtures/peft-lora`` with PEFT.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_NAME = "golden/tiny-llama"  # base_model_name_or_path in every config, whatever the folder
TARGETS = ["q_proj", "v_proj", "down_proj"]


def dense_llama() -> torch.nn.Module:
    """The kit's tiny Llama (:func:`adapt.core.testing.tiny_llama`), seed 0, as constructed."""
    from adapt.core.testing import tiny_llama

    model = tiny_llama(0, training=True)
    model.config._name_or_path = BASE_NAME
    return model


def nf4_llama() -> torch.nn.Module:
    import transformers

    folder = Path(tempfile.mkdtemp(prefix="golden-llama-"))
    try:
        dense_llama().save_pretrained(folder)
        quantisation = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        model = transformers.LlamaForCausalLM.from_pretrained(
            folder, quantization_config=quantisation, device_map="cpu", dtype=torch.float32
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    model.config._name_or_path = BASE_NAME
    return model


def config(method: str) -> Any:
    if method == "lora":
        from adapt.lora import LoraConfig

        return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian")
    if method == "vera":
        from adapt.vera import VeraConfig

        return VeraConfig(r=8, target_modules=TARGETS)
    from adapt.adalora import AdaLoraConfig

    return AdaLoraConfig(init_r=6, target_r=3, total_step=10, target_modules=TARGETS)


def seeded_save(method: str, base: Callable[[], torch.nn.Module]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        from adapt.core import adapt

        model = base()
        torch.manual_seed(1)
        adapt(model, config(method)).save_pretrained(folder)

    return write


def resaved(source: Callable[[], Path]) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        from adapt.core import AdaptedModel

        AdaptedModel.from_pretrained(dense_llama(), source()).save_pretrained(folder)

    return write


CASES: dict[str, Callable[[Path], None]] = {
    **{f"{m}-dense": seeded_save(m, dense_llama) for m in ("lora", "vera", "adalora")},
    **{f"{m}-nf4": seeded_save(m, nf4_llama) for m in ("lora", "vera", "adalora")},
    "lora-resaved": resaved(lambda: FIXTURES / "lora-dense"),
    "peft-lora-resaved": resaved(lambda: FIXTURES / "peft-lora"),
}


def write_peft_lora(folder: Path) -> None:
    """The PEFT-written input of ``peft-lora-resaved`` (needs peft)."""
    import peft

    model = dense_llama()
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian")
    peft.get_peft_model(model, cfg).save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's model card: not part of the format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite fixtures/")
    parser.add_argument("--peft", action="store_true", help="also rewrite fixtures/peft-lora")
    args = parser.parse_args()
    if not args.write:
        parser.error("nothing to do: pass --write (the check is tests/golden/test_golden.py)")
    if args.peft:
        shutil.rmtree(FIXTURES / "peft-lora", ignore_errors=True)
        write_peft_lora(FIXTURES / "peft-lora")
    for name, write in CASES.items():
        shutil.rmtree(FIXTURES / name, ignore_errors=True)
        write(FIXTURES / name)
        print(f"wrote {FIXTURES / name}", file=sys.stderr)


if __name__ == "__main__":
    main()
