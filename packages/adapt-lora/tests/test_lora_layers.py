"""LoRA layers checked against the definition out = base(x) + (α/r) · ΔW x, ΔW = B A.

Expected values are computed by hand from ``lora_A`` / ``lora_B`` and the *original* base
module, never through the layer's own ``delta_weight``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from lora_testutils import Wrap, max_diff  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from adapt.core import AdaptedModel, AdapterStateError, TargetError, adapt  # noqa: E402
from adapt.lora import LoraConfig, LoraConv, LoraEmbedding, LoraLayer, LoraLinear  # noqa: E402

TOL = 1e-5


# -- hand-computed ΔW and reference forwards ------------------------------------------------------
def hand_delta(layer: LoraLayer, name: str = "default") -> torch.Tensor:
    """ΔW = scaling · B A, in the base weight's canonical (out, in, *kernel) layout."""
    s = layer.scaling[name]
    if name in layer.lora_embedding_A:
        a = layer.lora_embedding_A[name].detach()  # (r, vocab)
        b = layer.lora_embedding_B[name].detach()  # (dim, r)
        return s * (b @ a).T  # (vocab, dim), like nn.Embedding.weight
    a = layer.lora_A[name].weight.detach()
    b = layer.lora_B[name].weight.detach()
    if a.dim() == 2:
        return s * (b @ a)  # (out, in)
    b2 = b.reshape(b.shape[0], b.shape[1])  # (out, r, 1, ...) -> (out, r)
    return s * torch.einsum("or,ri...->oi...", b2, a)


def conv_ref(base: nn.modules.conv._ConvNd, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(base.kernel_size)]
    return fn(x, weight, base.bias, base.stride, base.padding, base.dilation, base.groups)


@dataclass
class Case:
    make: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], torch.Tensor]
    # base module, input, canonical weight -> output
    ref: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    canonical: Callable[[nn.Module], torch.Tensor]
    layer_cls: type


def _randn(*shape: int) -> Callable[[torch.Generator], torch.Tensor]:
    return lambda g: torch.randn(*shape, generator=g)


CASES: dict[str, Case] = {
    "linear": Case(
        lambda: nn.Linear(6, 5),
        _randn(3, 4, 6),
        lambda m, x, w: x @ w.T + m.bias,
        lambda m: m.weight,
        LoraLinear,
    ),
    "linear-nobias": Case(
        lambda: nn.Linear(7, 3, bias=False),
        _randn(4, 7),
        lambda m, x, w: x @ w.T,
        lambda m: m.weight,
        LoraLinear,
    ),
    "embedding": Case(
        lambda: nn.Embedding(11, 6),
        lambda g: torch.randint(0, 11, (3, 5), generator=g),
        lambda m, x, w: w[x],
        lambda m: m.weight,
        LoraEmbedding,
    ),
    "embedding-padding": Case(
        lambda: nn.Embedding(11, 6, padding_idx=0),
        lambda g: torch.cat(
            [torch.zeros(3, 1, dtype=torch.long), torch.randint(0, 11, (3, 4), generator=g)], 1
        ),
        lambda m, x, w: w[x],
        lambda m: m.weight,
        LoraEmbedding,
    ),
    "conv1d": Case(
        lambda: nn.Conv1d(4, 5, 3),
        _randn(2, 4, 9),
        lambda m, x, w: conv_ref(m, x, w),
        lambda m: m.weight,
        LoraConv,
    ),
    "conv2d": Case(
        lambda: nn.Conv2d(3, 4, 3),
        _randn(2, 3, 8, 8),
        lambda m, x, w: conv_ref(m, x, w),
        lambda m: m.weight,
        LoraConv,
    ),
    "conv2d-stride-pad-dilation": Case(
        lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
        _randn(2, 3, 9, 7),
        lambda m, x, w: conv_ref(m, x, w),
        lambda m: m.weight,
        LoraConv,
    ),
    "conv2d-circular": Case(
        lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        _randn(2, 3, 6, 6),
        lambda m, x, w: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w, m.bias),
        lambda m: m.weight,
        LoraConv,
    ),
    "conv2d-same": Case(
        lambda: nn.Conv2d(3, 4, (3, 5), padding="same"),
        _randn(2, 3, 6, 7),
        lambda m, x, w: conv_ref(m, x, w),
        lambda m: m.weight,
        LoraConv,
    ),
    "conv2d-1x1-nobias": Case(
        lambda: nn.Conv2d(6, 2, 1, bias=False),
        _randn(2, 6, 5, 5),
        lambda m, x, w: conv_ref(m, x, w),
        lambda m: m.weight,
        LoraConv,
    ),
    "conv3d": Case(
        lambda: nn.Conv3d(2, 3, 2, padding=1),
        _randn(2, 2, 4, 4, 4),
        lambda m, x, w: conv_ref(m, x, w),
        lambda m: m.weight,
        LoraConv,
    ),
    # GPT-2's Conv1D stores its weight as (in, out): y = x @ W + b; canonical layout is W.T
    "transformers-conv1d": Case(
        lambda: Conv1D(5, 6),
        _randn(3, 4, 6),
        lambda m, x, w: x @ w.T + m.bias,
        lambda m: m.weight.T,
        LoraLinear,
    ),
}


def _build(
    case: Case, seed: int = 0, **cfg: object
) -> tuple[nn.Module, AdaptedModel, torch.Tensor]:
    torch.manual_seed(seed)
    base = case.make()
    with torch.no_grad():  # non-zero bias so layout mistakes show
        if getattr(base, "bias", None) is not None:
            base.bias.normal_()
    original = copy.deepcopy(base)
    cfg.setdefault("r", 3)
    cfg.setdefault("lora_alpha", 5)
    model = adapt(Wrap(base), LoraConfig(target_modules=["layer"], **cfg))
    x = case.make_input(torch.Generator().manual_seed(seed + 1))
    return original, model, x


def _layer(model: AdaptedModel) -> LoraLayer:
    layer = model.model.layer
    assert isinstance(layer, LoraLayer)
    return layer


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


# -- per layer type ---------------------------------------------------------------------------
def test_target_gets_the_right_layer_class(case: Case) -> None:
    _, model, _ = _build(case)
    layer = _layer(model)
    assert type(layer) is case.layer_cls
    assert layer.r == {"default": 3}
    assert layer.scaling == {"default": pytest.approx(5 / 3)}


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_starts_as_identity(case: Case, init: bool | str) -> None:
    original, model, x = _build(case, init_lora_weights=init)
    layer = _layer(model)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
        assert torch.count_nonzero(hand_delta(layer)) == 0
    # one factor is zero, the other random, so gradients can flow
    tensors = list(layer.adapter_tensors("default").values())
    assert any(torch.count_nonzero(t) == 0 for t in tensors)
    assert any(torch.count_nonzero(t) == t.numel() for t in tensors)


def test_gaussian_init_draws_a_with_std_one_over_r() -> None:
    torch.manual_seed(0)
    model = adapt(
        Wrap(nn.Linear(400, 8)),
        LoraConfig(r=4, target_modules=["layer"], init_lora_weights="gaussian"),
    )
    a = _layer(model).lora_A["default"].weight
    assert a.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert abs(a.mean().item()) < 0.02


def test_output_is_base_plus_scaled_hand_delta(case: Case) -> None:
    original, model, x = _build(case, init_lora_weights=False)
    layer = _layer(model)
    delta = hand_delta(layer)
    assert delta.abs().max() > 1e-3, "init_lora_weights=False must give a non-zero update"
    with torch.no_grad():
        w = case.canonical(original)
        expected = case.ref(original, x, w + delta)
        got = model(x)
    assert got.shape == expected.shape
    assert max_diff(got, expected) < TOL


def test_linear_output_is_x_times_ba_transposed() -> None:
    original, model, x = _build(CASES["linear"], init_lora_weights=False, lora_alpha=7, r=2)
    layer = _layer(model)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        expected = original(x) + x @ (b @ a).T * (7 / 2)
        assert max_diff(model(x), expected) < TOL


def test_delta_weight_matches_hand_delta_in_canonical_shape(case: Case) -> None:
    original, model, _ = _build(case, init_lora_weights=False)
    layer = _layer(model)
    delta = layer.delta_weight("default")
    assert delta.shape == case.canonical(original).shape
    assert max_diff(delta.detach(), hand_delta(layer)) < TOL


def test_merged_output_equals_unmerged(case: Case) -> None:
    _, model, x = _build(case, init_lora_weights=False)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        assert _layer(model).merged
        merged = model(x)
    assert max_diff(merged, unmerged) < TOL


def test_merged_weight_is_base_plus_delta_in_storage_layout(case: Case) -> None:
    original, model, _ = _build(case, init_lora_weights=False)
    layer = _layer(model)
    delta = hand_delta(layer)
    model.merge_adapter()
    stored = layer.get_base_layer().weight.detach()
    expected = case.canonical(original).detach() + delta
    if isinstance(original, Conv1D):
        expected = expected.T
    assert stored.shape == original.weight.shape
    assert max_diff(stored, expected) < TOL


def test_merge_then_unmerge_restores_the_weight(case: Case) -> None:
    original, model, x = _build(case, init_lora_weights=False)
    layer = _layer(model)
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    w0 = original.weight.detach()
    w1 = layer.get_base_layer().weight.detach()
    eps = torch.finfo(w0.dtype).eps
    assert max_diff(w1, w0) <= 2 * eps * (w0.abs().max() + hand_delta(layer).abs().max())
    with torch.no_grad():
        w = case.canonical(original)
        assert max_diff(model(x), case.ref(original, x, w + hand_delta(layer))) < TOL


def test_safe_merge_refuses_nan_and_leaves_the_layer_unchanged(case: Case) -> None:
    _, model, _ = _build(case, init_lora_weights=False)
    layer = _layer(model)
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        first = next(iter(layer.adapter_tensors("default").values()))
        first.view(-1)[0] = float("nan")
    with pytest.raises(AdapterStateError, match="NaN"):
        layer.merge(safe_merge=True)
    with pytest.raises(AdapterStateError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.get_base_layer().weight, before)


def test_disabled_layer_gives_the_base_output(case: Case) -> None:
    original, model, x = _build(case, init_lora_weights=False)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(x), original(x))


def test_dropout_is_applied_to_the_adapter_input() -> None:
    p = 0.5
    original, model, x = _build(CASES["linear"], init_lora_weights=False, lora_dropout=p)
    layer = _layer(model)
    model.train()
    torch.manual_seed(7)
    with torch.no_grad():
        got = model(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, p, training=True)
    with torch.no_grad():
        expected = original(x) + dropped @ hand_delta(layer).T
        assert max_diff(got, expected) < TOL
        model.eval()
        assert max_diff(model(x), original(x) + x @ hand_delta(layer).T) < TOL


def test_rslora_scales_by_alpha_over_sqrt_r() -> None:
    original, model, x = _build(
        CASES["linear"], init_lora_weights=False, r=4, lora_alpha=6, use_rslora=True
    )
    layer = _layer(model)
    assert layer.scaling["default"] == pytest.approx(6 / math.sqrt(4))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        assert max_diff(model(x), original(x) + x @ (b @ a).T * 3.0) < TOL


def test_float64_base_gets_float64_adapters_and_exact_math() -> None:
    torch.manual_seed(0)
    base = nn.Linear(5, 4).double()
    original = copy.deepcopy(base)
    model = adapt(Wrap(base), LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False))
    layer = _layer(model)
    assert layer.lora_A["default"].weight.dtype == torch.float64
    x = torch.randn(3, 5, dtype=torch.float64)
    with torch.no_grad():
        assert max_diff(model(x), original(x) + x @ hand_delta(layer).T) < 1e-12


# -- refusals ---------------------------------------------------------------------------------
class _Holder(nn.Module):
    def __init__(self, **mods: nn.Module) -> None:
        super().__init__()
        for k, v in mods.items():
            setattr(self, k, v)


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(4, 4, 3, groups=2), nn.Conv1d(4, 8, 3, groups=4), nn.Conv2d(4, 4, 3, groups=4)],
)
def test_grouped_conv_is_refused_naming_the_module(conv: nn.Module) -> None:
    model = _Holder(block=_Holder(dw=conv))
    with pytest.raises(TargetError) as info:
        adapt(model, LoraConfig(target_modules=["dw"]))
    msg = str(info.value)
    assert "block.dw" in msg
    assert "groups" in msg
    assert type(model.block.dw) is type(conv)  # the model was left as it was


def test_grouped_conv_is_refused_when_wrapped_directly() -> None:
    layer = LoraConv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TargetError, match="groups=2"):
        layer.update_layer("default", LoraConfig())
    assert layer.adapter_names == []


def test_layernorm_target_is_refused_naming_module_and_type() -> None:
    model = _Holder(proj=nn.Linear(4, 4), norm=nn.LayerNorm(4))
    with pytest.raises(TargetError) as info:
        adapt(model, LoraConfig(target_modules=["proj", "norm"]))
    msg = str(info.value)
    assert "norm" in msg and "LayerNorm" in msg
    assert "Linear" in msg  # says what can be adapted
    assert isinstance(model.proj, nn.Linear) and isinstance(model.norm, nn.LayerNorm)


# -- property tests -------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    in_f=st.integers(1, 24),
    out_f=st.integers(1, 24),
    r=st.integers(1, 12),
    alpha=st.floats(0.5, 64.0),
    seed=st.integers(0, 2**16),
)
def test_property_linear_merge_unmerge_round_trip(
    in_f: int, out_f: int, r: int, alpha: float, seed: int
) -> None:
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f)
    original = copy.deepcopy(base)
    model = adapt(
        Wrap(base),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["layer"], init_lora_weights=False),
    )
    layer = _layer(model)
    delta = hand_delta(layer)
    x = torch.randn(3, in_f)
    with torch.no_grad():
        expected = original(x) + x @ delta.T
        assert max_diff(model(x), expected) <= 1e-5 * (1 + expected.abs().max())
        model.merge_adapter()
        assert max_diff(model(x), expected) <= 1e-5 * (1 + expected.abs().max())
        model.unmerge_adapter()
    eps = torch.finfo(torch.float32).eps
    bound = 2 * eps * (original.weight.abs().max() + delta.abs().max())
    assert max_diff(base.weight, original.weight) <= bound
    assert torch.equal(base.bias, original.bias)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(
    in_c=st.integers(1, 6),
    out_c=st.integers(1, 6),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    r=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_property_conv2d_merge_unmerge_round_trip(
    in_c: int, out_c: int, k: int, stride: int, padding: int, dilation: int, r: int, seed: int
) -> None:
    torch.manual_seed(seed)
    base = nn.Conv2d(in_c, out_c, k, stride=stride, padding=padding, dilation=dilation)
    original = copy.deepcopy(base)
    model = adapt(
        Wrap(base),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["layer"], init_lora_weights=False),
    )
    layer = _layer(model)
    delta = hand_delta(layer)
    assert delta.shape == original.weight.shape
    x = torch.randn(2, in_c, 7, 7)
    with torch.no_grad():
        expected = conv_ref(original, x, original.weight + delta)
        scale = 1 + expected.abs().max()
        assert max_diff(model(x), expected) <= 1e-5 * scale
        model.merge_adapter()
        assert max_diff(model(x), expected) <= 1e-5 * scale
        model.unmerge_adapter()
    eps = torch.finfo(torch.float32).eps
    bound = 2 * eps * (original.weight.abs().max() + delta.abs().max())
    assert max_diff(base.weight, original.weight) <= bound
