"""torch.compile over every method on dense and bitsandbytes bases: no graph break beyond the
base's own, compiled outputs equal eager, and a two-adapter switch recompiles at most once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo as dynamo
from bnb_testutils import (
    dense_net,
    ids,
    llama_folder,
    load_llama,
    quantised_net,
)
from torch._dynamo.testing import CompileCounter

from adapt.adalora import AdaLoraConfig
from adapt.core import adapt
from adapt.core.testing import randomise_adapters
from adapt.lora import LoraConfig
from adapt.vera import VeraConfig

pytestmark = pytest.mark.compile

METHODS: dict[str, Callable[[], Any]] = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]),
    "dora": lambda: LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["up", "down"]),
    "vera": lambda: VeraConfig(r=16, target_modules=["up", "down"]),
    "adalora": lambda: AdaLoraConfig(
        init_r=6, target_r=3, total_step=20, lora_alpha=12, target_modules=["up", "down"]
    ),
}
BASES = ["float32", "8bit", "nf4"]


def _net(base: str) -> torch.nn.Module:
    return dense_net() if base == "float32" else quantised_net(base)


def _breaks(model: torch.nn.Module, x: torch.Tensor, grad: bool) -> int:
    dynamo.reset()
    with torch.set_grad_enabled(grad):
        return int(dynamo.explain(model)(x).graph_break_count)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_graph_break_and_same_output(method: str, base: str, grad: bool) -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    base_breaks = _breaks(_net(base), x, grad)
    model = adapt(_net(base), METHODS[method]())
    randomise_adapters(model)
    assert _breaks(model, x, grad) == base_breaks == 0
    dynamo.reset()
    with torch.set_grad_enabled(grad):
        want = model(x)
        got = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_switching_between_two_adapters_recompiles_once(method: str) -> None:
    dynamo.reset()
    config = METHODS[method]
    model = adapt(dense_net(), config())
    second = config()
    if method == "adalora":  # AdaLoRA trains one adapter at a time; the second one is loaded
        second.inference_mode = True
    model.add_adapter("b", second)
    randomise_adapters(model)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(4, 64)
    with torch.no_grad():
        compiled(x)
        for switch in (lambda: model.set_adapter("b"), model.disable_adapter_layers):
            before = counter.frame_count
            switch()
            got = compiled(x)
            assert counter.frame_count - before <= 1
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


LLAMA_METHODS: dict[str, Callable[[], Any]] = {
    "lora": lambda: LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
    "dora": lambda: LoraConfig(
        r=4, use_dora=True, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]
    ),
    "vera": lambda: VeraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
    "adalora": lambda: AdaLoraConfig(
        init_r=4, target_r=2, total_step=20, target_modules=["q_proj", "v_proj", "down_proj"]
    ),
}


@pytest.mark.parametrize(
    ("method", "base"),
    [("lora", "float32"), ("vera", "float32"), ("adalora", "float32"), ("vera", "nf4")],
)
def test_llama_no_graph_break_beyond_the_base(method: str, base: str, tmp_path: Path) -> None:
    """A transformers Llama (q/k/v read one input: VeRA's shared projection is exercised)."""
    folder = llama_folder(tmp_path / "llama")

    def load() -> torch.nn.Module:
        if base == "float32":
            import transformers

            return transformers.LlamaForCausalLM.from_pretrained(folder).eval()
        return load_llama(folder, base).eval()

    x = ids()

    def count(model: torch.nn.Module, grad: bool) -> int:
        dynamo.reset()
        with torch.set_grad_enabled(grad):
            return int(dynamo.explain(model)(input_ids=x, use_cache=False).graph_break_count)

    for grad in (False, True):
        base_breaks = count(load(), grad)
        adapted = count(adapt(load(), LLAMA_METHODS[method]()), grad)
        assert adapted == base_breaks, f"grad={grad}: {adapted} breaks, base {base_breaks}"
