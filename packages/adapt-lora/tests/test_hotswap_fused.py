"""Layers prepared for compiled hot-swapping (scalings held as 0-d tensors) keep the fused
kernels: their outputs and gradients equal the unprepared model's (float scalings), merging
folds ``W + s·BA`` in with the tensor ``s``, a compiled prepared model swaps alphas without a
graph break or a recompile, and bf16 autocast stays within bf16 round-off."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from adapt.core import AdaptedModel, adapt
from adapt.core.testing import randomise_adapters, tiny_llama, token_ids
from adapt.lora import LoraConfig, LoraLayer, hotswap_adapter, prepare_model_for_compiled_hotswap
from adapt.lora import dora as dora_module
from adapt.lora import layer as layer_module
from adapt.lora.lora_kernels import LoraLinearFunction

TOL = 1e-6
RANK = 4
PADDED = 8


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama().eval()


def config(dora: bool = False, **kwargs: Any) -> LoraConfig:
    """LoRA on every linear layer, random (non-identity) factors; scaling 5/4 by default."""
    kwargs.setdefault("r", RANK)
    kwargs.setdefault("lora_alpha", 5)
    return LoraConfig(target_modules="all-linear", init_lora_weights=False, use_dora=dora, **kwargs)


def pair(base: nn.Module, dora: bool) -> tuple[AdaptedModel, AdaptedModel]:
    """The same adapted model twice: as adapted (float scalings), and prepared (padded to
    :data:`PADDED`, tensor scalings)."""
    torch.manual_seed(1)
    plain = adapt(copy.deepcopy(base), config(dora))
    prepared = copy.deepcopy(plain)
    prepare_model_for_compiled_hotswap(prepared, target_rank=PADDED)
    return plain, prepared


@pytest.fixture
def saved(base: nn.Module, tmp_path: Path) -> Callable[..., Path]:
    """``saved(name, seed, dora, **config)``: a randomised adapter for ``base``, saved; its folder."""

    def save(name: str, seed: int, dora: bool = False, **kwargs: Any) -> Path:
        adapted = adapt(copy.deepcopy(base), config(dora, **kwargs))
        randomise_adapters(adapted, seed=seed)
        adapted.save_pretrained(tmp_path / name)
        return tmp_path / name

    return save


def lora_layers(model: AdaptedModel) -> Iterator[tuple[str, LoraLayer]]:
    return ((p, m) for p, m in model.adapter_layers() if isinstance(m, LoraLayer))


def ids(length: int = 8) -> torch.Tensor:
    return token_ids(length=length, low=3, seed=123)


def logits(model: nn.Module, batch: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids() if batch is None else batch).logits.float()


def gradients(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """One training step's gradients (the causal LM loss of :func:`ids`): of every trainable
    parameter and of the input embeddings (``"inputs_embeds"``)."""
    model.train()
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids()).detach().requires_grad_()
    model(inputs_embeds=embeds, labels=ids()).loss.backward()
    model.eval()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert embeds.grad is not None
    return {**grads, "inputs_embeds": embeds.grad}


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of ``a`` and ``b`` over ``a``'s shape; ``b`` may be ``a`` zero-padded
    (a prepared factor), and what lies beyond ``a`` counts as a difference from zero."""
    within = tuple(slice(0, n) for n in a.shape)
    beyond = b.detach().clone()
    beyond[within] = 0
    return max((a - b[within]).abs().max().item(), beyond.abs().max().item())


def assert_same_gradients(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert want.keys() == got.keys()
    for name, grad in want.items():
        assert grad.any(), name
        assert diff(grad, got[name]) <= TOL, name


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the fused kernels ran: LoRA's in-place sum, its training node, DoRA's."""
    calls = {"add": 0, "node": 0, "dora": 0}

    def counted(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            calls[key] += 1
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(
        layer_module, "add_scaled_product", counted("add", layer_module.add_scaled_product)
    )
    monkeypatch.setattr(
        LoraLinearFunction, "forward", staticmethod(counted("node", LoraLinearFunction.forward))
    )
    monkeypatch.setattr(dora_module, "dora_linear", counted("dora", dora_module.dora_linear))
    return calls


# -- equal to the unprepared model, on the fused path ------------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_prepared_layers_fuse_and_equal_the_unprepared_model(base, dora, fused_calls) -> None:
    plain, prepared = pair(base, dora)
    for path, layer in lora_layers(prepared):
        assert layer.fuse_adapter_output, path
        assert isinstance(layer.scaling["default"], torch.Tensor), path
    long = ids(length=64)  # enough rows for the no-grad x (W + ΔW)ᵀ path (add_delta_weight)
    for batch in (ids(), long):
        assert diff(logits(plain, batch), logits(prepared, batch)) <= TOL
    want = gradients(plain)
    before = dict(fused_calls)
    got = gradients(prepared)
    assert_same_gradients(want, got)
    if dora:
        assert fused_calls["dora"] > before["dora"]
    else:
        assert fused_calls["node"] > before["node"]
        fused_calls["add"] = 0
        logits(prepared)
        assert fused_calls["add"] > 0  # the no-grad forward's in-place sum


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_swap_of_another_alpha_equals_a_fresh_load(base, saved, dora) -> None:
    first = saved("a", 1, dora)
    second = saved("b", 2, dora, r=6, lora_alpha=3)
    model = AdaptedModel.from_pretrained(copy.deepcopy(base), first, is_trainable=True).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=PADDED)
    logits(model)  # fill DoRA's norm cache before the swap
    hotswap_adapter(model, second)
    want = AdaptedModel.from_pretrained(copy.deepcopy(base), second, is_trainable=True).eval()
    assert diff(logits(want), logits(model)) <= TOL
    assert_same_gradients(gradients(want), gradients(model))


def test_dora_norm_cache_follows_an_in_place_refill_of_the_scaling(base) -> None:
    plain, prepared = pair(base, dora=True)
    logits(prepared)  # caches each layer's norm, keyed by its scaling
    for model in (plain, prepared):
        for _, layer in lora_layers(model):
            scaling = layer.scaling["default"]
            if isinstance(scaling, torch.Tensor):
                scaling.fill_(0.75)  # what a swap does: same tensor, new value
            else:
                layer.scaling["default"] = 0.75
    assert diff(logits(plain), logits(prepared)) <= TOL


# -- merging ------------------------------------------------------------------------------------
def test_merge_and_unmerge_with_tensor_scalings(base) -> None:
    _, model = pair(base, dora=False)
    layers = dict(lora_layers(model))
    original = {p: layer.base_layer.weight.detach().clone() for p, layer in layers.items()}
    model.merge_adapter()
    for path, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        assert isinstance(s, torch.Tensor)
        want = original[path] + s * (b @ a)
        assert diff(want, layer.base_layer.weight.detach()) <= TOL, path
    model.unmerge_adapter()
    for path, layer in layers.items():
        assert diff(original[path], layer.base_layer.weight.detach()) <= TOL, path


# -- torch.compile ------------------------------------------------------------------------------
#: What only the fused kernels call (the unfused path is two linears and a multiply)
FUSED_OPS = {"addmm", "addmm_", "baddbmm_"}


class GraphCounter(CompileCounter):
    """:class:`CompileCounter` that also keeps the names of the ops its graphs call (their
    subgraphs included: a custom autograd Function is traced into one)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        for module in gm.modules():
            if isinstance(module, torch.fx.GraphModule):
                for node in module.graph.nodes:
                    if node.op in ("call_function", "call_method"):
                        self.ops.add(getattr(node.target, "__name__", str(node.target)))
        return super().__call__(gm, example_inputs)


def step(run: Callable[..., Any], model: nn.Module, train: bool) -> tuple[Any, ...]:
    """``run``'s logits for :func:`ids` and, with ``train``, the gradients of ``model``'s
    trainable parameters after a backward of the causal LM loss."""
    if not train:
        with torch.no_grad():
            return run(input_ids=ids()).logits.float(), {}
    model.zero_grad(set_to_none=True)
    out = run(input_ids=ids(), labels=ids())
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), grads


@pytest.mark.compile
@pytest.mark.parametrize("train", [False, True], ids=["no_grad", "train"])
def test_swaps_of_other_alphas_compile_once_on_the_fused_path(base, saved, train) -> None:
    torch._dynamo.reset()
    paths = [saved(f"s{i}", 20 + i, lora_alpha=alpha) for i, alpha in enumerate([3, 11, 0.5])]

    def load(path: Path) -> AdaptedModel:
        return AdaptedModel.from_pretrained(copy.deepcopy(base), path, is_trainable=train).eval()

    model = load(saved("first", 1))
    prepare_model_for_compiled_hotswap(model, target_rank=PADDED)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter)
    step(compiled, model, train)
    assert counter.frame_count == 1  # one graph: no graph break on a tensor scale
    assert counter.ops & FUSED_OPS, sorted(counter.ops)
    for path in paths:
        hotswap_adapter(compiled, path)
        fresh = load(path)
        (want, want_grads), (got, got_grads) = (
            step(fresh, fresh, train),
            step(compiled, model, train),
        )
        assert diff(want, got) <= TOL
        assert_same_gradients(want_grads, got_grads)
    assert counter.frame_count == 1, f"{counter.frame_count - 1} recompiles after the first"


@pytest.mark.compile
def test_long_prompts_build_the_merged_weight_in_the_same_graph(base, saved) -> None:
    # a no-grad batch of many rows runs as x (W + ΔW)ᵀ (LoraLinear.add_delta_weight): with the
    # scale multiplied into a factor (not addmm's alpha) that path needs no graph break either
    torch._dynamo.reset()
    long = ids(length=64)
    model = AdaptedModel.from_pretrained(copy.deepcopy(base), saved("first", 1)).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=PADDED)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter)
    logits(compiled, long)
    assert counter.frame_count == 1
    path = saved("b", 2, lora_alpha=3)
    hotswap_adapter(compiled, path)
    fresh = AdaptedModel.from_pretrained(copy.deepcopy(base), path).eval()
    assert diff(logits(fresh, long), logits(compiled, long)) <= TOL
    assert counter.frame_count == 1


# -- autocast -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_bf16_autocast_matches_the_unprepared_model(base, dora, grad) -> None:
    plain, prepared = pair(base, dora)
    outs = []
    for model in (plain, prepared):
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(model(input_ids=ids()).logits.detach().float())
    want, got = outs
    assert diff(want, got) <= 2e-2 * want.abs().max().item()
