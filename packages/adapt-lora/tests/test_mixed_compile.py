"""Mixed batches under ``torch.compile`` without recompiles when the mix changes
(``prepare_mixed_batches_for_compile``): LoRA, DoRA and LoRA-bias adapters (VeRA's and AdaLoRA's
in their packages' tests); graphs counted
with a counting backend; outputs equal the eager mixed batch; ``__base__`` rows equal the base
model; the errors that tell what to do."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adapt.core import AdaptedModel, AdapterStateError, adapt  # noqa: E402
from adapt.core.testing import tiny_llama  # noqa: E402
from adapt.lora import LoraConfig  # noqa: E402

pytestmark = pytest.mark.compile

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXES = [
    ["a0", "a2", "__base__", "a1", "a2", "a0"],
    ["a1"] * 6,
    ["__base__", "a2", "a2", "a0", "a1", "a1"],
    ["a2", "a0", "a0", "__base__", "__base__", "a1"],
]


def lora(extra: dict[str, Any]) -> AdaptedModel:
    kw: dict[str, Any] = {"target_modules": LINEAR, "init_lora_weights": False, **extra}
    model = adapt(tiny_llama(), LoraConfig(r=4, **kw), "a0")
    model.add_adapter("a1", LoraConfig(r=2, lora_alpha=5, **kw))
    model.add_adapter("a2", LoraConfig(r=6, lora_alpha=2, target_modules=LINEAR[:3],
                                       init_lora_weights=False, **extra))  # fmt: skip
    return model


CASES: dict[str, tuple[Callable[[dict[str, Any]], AdaptedModel], dict[str, Any]]] = {
    "lora": (lora, {}),
    "dora": (lora, {"use_dora": True}),
    "lora_bias": (lora, {"lora_bias": True}),
}


def built(case: str) -> AdaptedModel:
    torch.manual_seed(0)
    factory, extra = CASES[case]
    model = factory(extra)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("lora_", "vera_lambda")):
                param.normal_(std=0.2)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 64, (6, 7), generator=torch.Generator().manual_seed(1))


def counting() -> tuple[list[int], Callable[..., Any]]:
    graphs = [0]

    def backend(gm: torch.fx.GraphModule, inputs: Any) -> Any:
        graphs[0] += 1
        return gm.forward

    return graphs, backend


@pytest.mark.parametrize("case", list(CASES))
def test_a_new_mix_runs_the_compiled_graph_again(case: str) -> None:
    torch._dynamo.reset()
    model = built(case)
    with torch.no_grad():
        eager = {tuple(m): model(input_ids=ids(), adapter_names=m).logits for m in MIXES}
        with model.disable_adapter():
            base = model(input_ids=ids()).logits
    model.prepare_mixed_batches_for_compile()
    graphs, backend = counting()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for round_ in range(2):
            for mix in MIXES:
                out = compiled(input_ids=ids(), adapter_names=mix).logits
                assert (out - eager[tuple(mix)]).abs().max().item() < 1e-5, (case, mix)
                for i, name in enumerate(mix):
                    if name == "__base__":
                        assert (out[i] - base[i]).abs().max().item() < 1e-6
            if round_ == 0:
                first = graphs[0]
        assert graphs[0] == first  # the second round over the mixes compiled nothing
        compiled(input_ids=ids())  # no mix: the plain graph
        compiled(input_ids=ids(), adapter_names=MIXES[0])
    assert first == 1, f"{case}: {first} graphs for the mixed forward"


def test_eager_prepared_model_and_errors() -> None:
    model = built("lora")
    model.prepare_mixed_batches_for_compile()
    with torch.no_grad():
        out = model(input_ids=ids(), adapter_names=MIXES[0]).logits
        model.set_adapter("a1")
        assert (out[3] - model(input_ids=ids()[3:4]).logits[0]).abs().max().item() < 1e-5
    model.add_adapter("a3", LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AdapterStateError, match=r"\['a3'\].*call it again"):
        model(input_ids=ids(), adapter_names=["a3"] * 6)
    model.prepare_mixed_batches_for_compile()
    with torch.no_grad():
        model(input_ids=ids(), adapter_names=["a3"] * 6)
    model.train()
    with pytest.raises(AdapterStateError, match=r"dropout|eval mode"):
        built_dropout = built("lora")
        built_dropout.add_adapter("d", LoraConfig(r=2, target_modules=LINEAR, lora_dropout=0.5))
        built_dropout.prepare_mixed_batches_for_compile()
        built_dropout.train()
        built_dropout(input_ids=ids(), adapter_names=["d"] * 6)
