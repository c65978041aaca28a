"""No target_modules: adapt picks the modules PEFT picks for the architecture and method, and
the saved configs agree."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from adapt.adalora import AdaLoraConfig  # noqa: E402
from adapt.core import adapt  # noqa: E402
from adapt.core.testing import tiny_gpt2, tiny_llama  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402
from adapt.vera import VeraConfig  # noqa: E402

pytestmark = pytest.mark.interop


def llama() -> nn.Module:
    # unseeded: only the module names matter (transformers' default max_position_embeddings)
    return tiny_llama(
        None, training=True, hidden_size=32, intermediate_size=64, vocab_size=64,
        max_position_embeddings=2048,
    )  # fmt: skip


def gpt2() -> nn.Module:
    return tiny_gpt2(None, training=True, n_embd=32, vocab_size=64, n_positions=32)


def encoder(kind: str) -> Callable[[], nn.Module]:
    """A small BERT-style encoder of ``kind`` ("Bert", "Roberta")."""

    def build() -> nn.Module:
        cfg = getattr(transformers, f"{kind}Config")(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=64, max_position_embeddings=40,
        )  # fmt: skip
        return getattr(transformers, f"{kind}Model")(cfg)  # type: ignore[no-any-return]

    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": llama, "gpt2": gpt2, "bert": encoder("Bert"), "roberta": encoder("Roberta"),
}  # fmt: skip
ADALORA = {"init_r": 4, "target_r": 2, "total_step": 10, "tinit": 2, "tfinal": 2}
METHODS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "lora": (lambda: LoraConfig(r=4), lambda: peft.LoraConfig(r=4)),
    "vera": (lambda: VeraConfig(r=4), lambda: peft.VeraConfig(r=4)),
    "adalora": (lambda: AdaLoraConfig(**ADALORA), lambda: peft.AdaLoraConfig(**ADALORA)),
}


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_default_targets_match_peft(arch: str, method: str, tmp_path: Path) -> None:
    ours_cfg, theirs_cfg = METHODS[method]
    base = MODELS[arch]()
    theirs = peft.get_peft_model(copy.deepcopy(base), theirs_cfg())
    ours = adapt(copy.deepcopy(base), ours_cfg())
    adapted = {
        "theirs": sorted(
            name.removeprefix("base_model.model.")
            for name, module in theirs.named_modules()
            if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer)
        ),
        "ours": sorted(path for path, _ in ours.adapter_layers()),
    }
    assert adapted["ours"] and adapted["ours"] == adapted["theirs"]
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    saved = {
        lib: sorted(
            json.loads((tmp_path / lib / "adapter_config.json").read_text())["target_modules"]
        )
        for lib in ("theirs", "ours")
    }
    assert saved["ours"] == saved["theirs"]
