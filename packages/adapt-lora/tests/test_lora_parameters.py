"""LoRA on parameters (``target_parameters``): fused MoE experts of transformers ≥ 5 and plain
matrices, against the definition — the module's forward with ``W + ΔW``,
``ΔW[e] = s · B[e] A[e]`` read from PEFT's stacked layout — on every expert kernel transformers
has (eager loop, grouped_mm, batched_mm), both computation paths (low-rank, dense), training,
merging, several adapters, autocast, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

from adapt.core import AdapterStateError, ConfigError, TargetError, adapt
from adapt.core.parameter_layer import ParameterLayer
from adapt.core.testing import tiny_mixtral, tiny_qwen3_moe, token_ids
from adapt.lora import LoraConfig

PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
IMPLS = ["eager", "grouped_mm", "batched_mm"]


def _fused(model: nn.Module) -> bool:
    return any(n.endswith("experts.gate_up_proj") for n, _ in model.named_parameters())


@pytest.fixture(autouse=True)
def _needs_fused_experts() -> None:
    if not _fused(tiny_mixtral()):
        pytest.skip("this transformers stores experts as Linear modules (fused in ≥ 5)")


def ids() -> torch.Tensor:
    return token_ids(2, 10, vocab_size=128, seed=3)


def config(**kw: object) -> LoraConfig:
    kw.setdefault("target_parameters", list(PARAMS))
    kw.setdefault("init_lora_weights", False)
    return LoraConfig(r=4, lora_alpha=8, **kw)  # type: ignore[arg-type]


def param_layers(model: nn.Module) -> list[ParameterLayer]:
    return [m for m in model.modules() if isinstance(m, ParameterLayer)]


def set_path(model: nn.Module, low_rank: bool) -> None:
    for layer in param_layers(model):
        layer.low_rank_forward = low_rank


def by_hand(base: nn.Module, adapted: nn.Module, name: str = "default") -> nn.Module:
    """A copy of ``base`` with every adapted parameter replaced by W + ΔW, ΔW computed here
    from the saved factors (PEFT's layout) — the definition, independent of the layer code."""
    ref = copy.deepcopy(base)
    for layer in param_layers(adapted):
        owner_path = next(
            p for p, m in adapted.base_model.model.named_modules() if m is layer.get_base_layer()
        )
        owner = ref.get_submodule(owner_path.replace(".base_layer", ""))
        w = getattr(owner, layer.parameter_name)
        a = layer.lora_A[name].weight.detach()  # (r·E, in)
        b = layer.lora_B[name].weight.detach()  # (out, r·E)
        e = layer.num_experts
        r = a.shape[0] // e
        delta = (
            torch.stack(
                [b[:, [k * e + i for k in range(r)]] @ a[i * r : (i + 1) * r] for i in range(e)]
            )
            * layer.scaling[name]
        )
        with torch.no_grad():
            w += delta if w.dim() == 3 else delta[0]
    return ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("build", [tiny_mixtral, tiny_qwen3_moe], ids=["mixtral", "qwen3moe"])
@pytest.mark.parametrize("low_rank", [True, False], ids=["low-rank", "dense"])
def test_output_is_the_definition(impl: str, build: object, low_rank: bool) -> None:
    base = build(experts_implementation=impl)  # type: ignore[operator]
    model = adapt(copy.deepcopy(base), config())
    set_path(model, low_rank)
    with torch.no_grad():
        out = model(ids()).logits
        want = by_hand(base, model)(ids()).logits
        plain = base(ids()).logits
    assert (out - plain).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    assert all(layer.low_rank_forward is low_rank for layer in param_layers(model))


@pytest.mark.parametrize("impl", IMPLS)
def test_low_rank_and_dense_gradients_agree(impl: str) -> None:
    grads = []
    for low_rank in (True, False):
        model = adapt(tiny_mixtral(experts_implementation=impl), config()).train()
        set_path(model, low_rank)
        model(ids(), labels=ids()).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * 2
    for name, g in grads[0].items():
        assert g is not None and g.abs().sum() > 0
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-4)


def test_layout_nesting_and_counts() -> None:
    model = adapt(tiny_mixtral(), config(target_modules=["q_proj"]))
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert isinstance(experts, ParameterLayer) and experts.parameter_name == "down_proj"
    assert experts.base_layer.parameter_name == "gate_up_proj"  # registered first: inside
    keys = {k: tuple(v.shape) for k, v in model.adapter_state_dict("default").items()}
    head = "base_model.model.model.layers.0.mlp.experts."
    assert keys[head + "base_layer.lora_A.weight"] == (16, 64)  # r·E, hidden
    assert keys[head + "base_layer.lora_B.weight"] == (192, 16)  # 2·inter, r·E
    assert keys[head + "lora_A.weight"] == (16, 96)
    assert keys[head + "lora_B.weight"] == (64, 16)
    trainable, _ = model.get_nb_trainable_parameters()  # PEFT's name
    per_layer = 16 * (64 + 192) + 16 * (96 + 64) + 4 * (64 + 64)  # experts + q_proj
    assert trainable == 2 * per_layer
    assert model.peft_config["default"].target_modules == ["q_proj"]


def test_parameters_only_saves_empty_target_modules() -> None:
    cfg = config()
    adapt(tiny_mixtral(), cfg)
    assert cfg.target_modules == [] and cfg.to_dict()["target_parameters"] == PARAMS


def test_training_moves_only_adapter_tensors() -> None:
    model = adapt(tiny_mixtral(experts_implementation="grouped_mm"), config()).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(ids(), labels=ids()).loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == ("lora_" in name), name


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_merge_unmerge_unload(impl: str) -> None:
    base = tiny_mixtral(experts_implementation=impl)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = adapt(copy.deepcopy(base), config())
    with torch.no_grad():
        out = model(ids()).logits
        model.merge_adapter()
        torch.testing.assert_close(model(ids()).logits, out, atol=2e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids()).logits, out, atol=2e-5, rtol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids()).logits, base(ids()).logits)
        merged = model.merge_and_unload()
        assert not param_layers(merged)
        torch.testing.assert_close(merged(ids()).logits, out, atol=2e-5, rtol=1e-5)
    again = adapt(copy.deepcopy(base), config())
    plain = again.unload()
    for name, p in plain.named_parameters():
        assert torch.equal(p, original[name]), name
    assert type(plain.model.layers[0].mlp.experts).__name__ == "MixtralExperts"


def test_several_adapters_delete_and_switch() -> None:
    base = tiny_mixtral()
    model = adapt(copy.deepcopy(base), config(target_modules=["q_proj"]))
    model.add_adapter("other", config(target_modules=["q_proj"]))
    with torch.no_grad():
        first = model(ids()).logits
        model.set_adapter("other")
        second = model(ids()).logits
    assert (first - second).abs().max() > 1e-3
    model.delete_adapter("default")
    assert all(layer.adapter_names == ["other"] for layer in param_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, second)
    model.delete_adapter("other")
    assert not param_layers(model)
    experts = model.base_model.model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "MixtralExperts"


def test_two_active_adapters_sum() -> None:
    base = tiny_mixtral()
    model = adapt(copy.deepcopy(base), config())
    model.add_adapter("b", config())
    model.set_adapter(["default", "b"])
    with torch.no_grad():
        out = model(ids()).logits
        ref = by_hand(by_hand(base, model, "default"), model, "b")(ids()).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_mixed_batch_is_refused() -> None:
    model = adapt(tiny_mixtral(), config())
    with pytest.raises(AdapterStateError, match="mixed batches"):
        model(input_ids=ids(), adapter_names=["default", "__base__"])


def test_bf16_base_and_autocast() -> None:
    base = tiny_mixtral(experts_implementation="grouped_mm")
    model = adapt(copy.deepcopy(base), config())
    with torch.no_grad():
        ref = by_hand(base, model)(ids()).logits
    for low_rank in (True, False):
        set_path(model, low_rank)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids()).logits.float()
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    half = adapt(copy.deepcopy(base).to(torch.bfloat16), config())
    assert half.base_model.model.model.layers[0].mlp.experts.lora_A["default"].weight.dtype == (
        torch.float32
    )
    half.train()
    loss = half(ids(), labels=ids()).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in half.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


class Matrix(nn.Module):
    """A bare 2-D parameter used by F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Odd(nn.Module):
    """Uses its parameter in a way the low-rank path does not follow (a scaled copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,eoi->beo", x, self.w * 2)


class Transposed(nn.Module):
    """Experts stored (E, in, out), applied as x @ W[e] (gpt-oss style)."""

    is_transposed = True

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x @ self.w[e] for e in range(3)], 1)


class Net(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.inner(x)
        return out


@pytest.mark.parametrize("module", [Matrix, Odd, Transposed])
def test_other_modules_match_the_definition(module: type[nn.Module]) -> None:
    torch.manual_seed(0)
    net = Net(module())
    name = "inner.weight" if module is Matrix else "inner.w"
    model = adapt(copy.deepcopy(net), config(target_parameters=[name]))
    x = torch.randn(4, 5)
    layer = param_layers(model)[0]
    out = model(x)
    with torch.no_grad():
        ref = copy.deepcopy(net)
        getattr(ref.inner, name.split(".")[1]).add_(layer.delta_weight("default"))
        want = ref(x)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert layer.low_rank_forward is (module is not Odd)  # Odd fell back to the dense way
    out.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_errors_name_the_problem() -> None:
    with pytest.raises(TargetError, match=r"Did you mean: 'experts\.gate_up_proj'"):
        adapt(tiny_mixtral(), config(target_parameters=["experts.gate_up_prj"]))
    with pytest.raises(ConfigError, match="list of parameter names"):
        LoraConfig(target_parameters="experts.gate_up_proj")  # type: ignore[arg-type]
    with pytest.raises(TargetError, match="1 dimensions"):
        adapt(tiny_mixtral(), config(target_parameters=["input_layernorm.weight"]))
    with pytest.raises(ConfigError, match="lora_dropout"):
        adapt(tiny_mixtral(), config(lora_dropout=0.1))
    with pytest.raises(ConfigError, match="variants"):
        adapt(tiny_mixtral(), config(use_dora=True))
    with pytest.raises(TargetError, match="both target_modules and target_parameters"):
        adapt(
            Net(nn.Linear(5, 6)),
            config(target_modules=["inner"], target_parameters=["inner.weight"]),
        )
    model = adapt(tiny_mixtral(), config())
    with pytest.raises(ConfigError, match="same parameters"):
        model.add_adapter("x", config(target_parameters=["experts.down_proj"]))
    with pytest.raises(TargetError, match="target_parameters, not target_modules"):
        model.add_adapter("y", LoraConfig(target_modules=["experts"]))


def test_quantised_and_integer_parameters_are_refused() -> None:
    net = Net(Matrix())
    net.inner.weight = nn.Parameter(torch.zeros(6, 5, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TargetError, match="int8 values"):
        adapt(net, config(target_parameters=["inner.weight"]))


def test_failed_add_leaves_the_model_as_it_was() -> None:
    model = adapt(tiny_mixtral(), config(target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ConfigError):
        model.add_adapter("bad", config(target_modules=["q_proj"], lora_dropout=0.2))
    assert [type(m).__name__ for m in model.modules()] == layout
    assert model.state_dict().keys() == before.keys()
    assert all(layer.adapter_names == ["default"] for layer in param_layers(model))
    model2 = tiny_mixtral()
    layout2 = [type(m).__name__ for m in model2.modules()]
    with pytest.raises(ConfigError):
        adapt(model2, config(use_dora=True))
    assert [type(m).__name__ for m in model2.modules()] == layout2
