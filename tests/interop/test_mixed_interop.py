"""Mixed batches (``adapter_names=``) against HF PEFT: the same LoRA adapters saved by adapt and
loaded into PEFT, one adapter (or ``__base__``) per sample, the same logits. PEFT serves mixed
batches for LoRA only (its VeRA and AdaLoRA refuse them; adapt's are checked against their
definition in those packages' tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from interop_models import llama  # noqa: E402
from interop_models import seeded_eval as _base  # noqa: E402

from adapt.core import adapt  # noqa: E402
from adapt.core.testing import tiny_gpt2  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

pytestmark = pytest.mark.interop

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (llama, {"target_modules": [*LINEAR, "embed_tokens"]}),
    "llama lora_bias": (llama, {"target_modules": LINEAR, "lora_bias": True}),
    "llama rslora": (llama, {"target_modules": LINEAR, "use_rslora": True}),
    "gpt2": (tiny_gpt2, {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_batch_logits_equal_peft(tmp_path: Path, case: str) -> None:
    factory, extra = CASES[case]
    torch.manual_seed(0)
    ours = adapt(_base(factory), LoraConfig(r=4, init_lora_weights=False, **extra), "a0")
    for i in range(1, 5):
        ours.add_adapter(f"a{i}", LoraConfig(r=2 + i, lora_alpha=3 * i, init_lora_weights=False,
                                             **extra))  # fmt: skip
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.endswith("bias") and "lora_B" in name:
                param.normal_()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(_base(factory), tmp_path / "a0", adapter_name="a0")
    for i in range(1, 5):
        theirs.load_adapter(tmp_path / f"a{i}", f"a{i}")
    vocab = ours.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (7, 9), generator=torch.Generator().manual_seed(2))
    names = ["a0", "a3", "__base__", "a1", "a3", "a4", "a2"]
    with torch.no_grad():
        mine = ours(input_ids=ids, adapter_names=names).logits
        peft_out = theirs(input_ids=ids, adapter_names=names).logits
    assert (mine - peft_out).abs().max().item() < 1e-5
