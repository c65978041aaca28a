"""The torchao weight backends on real torchao tensors: which modules they claim, reading,
writing (granularity, dtype, device and the tensor object kept), the error they report and
declare, and the facts about torchao they rely on (autograd through its quantised linear)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig
from torchao_testutils import BACKENDS, CONFIGS, MAIN, linear, quantise, quantised_llama, rel

from adapt.core import AdapterStateError, DenseBackend, TargetError
from adapt.core.backends import backend_hint, resolve_backend
from adapt.core.testing import tiny_llama
from adapt.torchao import Int8WeightOnlyBackend, IntxWeightOnlyBackend


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_the_backend_claims_every_quantised_linear_and_nothing_else(kind: str) -> None:
    model = quantised_llama(kind)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 15  # 7 per decoder layer and lm_head
    for module in linears:
        assert type(resolve_backend(module)) is BACKENDS[kind]
    other = next(
        b for b in (Int8WeightOnlyBackend, IntxWeightOnlyBackend) if b is not BACKENDS[kind]
    )
    assert not any(other().supports(m) for m in linears)
    # a plain Linear (and the embedding) in the same process stays with the dense backend
    for dense in tiny_llama().modules():
        if isinstance(dense, (nn.Linear, nn.Embedding)):
            assert type(resolve_backend(dense)) is DenseBackend
            assert not BACKENDS[kind]().supports(dense)


def test_a_plain_linear_is_refused_with_a_reason() -> None:
    reason = Int8WeightOnlyBackend().refusal(nn.Linear(4, 3))
    assert reason is not None and "torch.nn.parameter.Parameter" in reason


def test_torchaos_quantised_linear_passes_gradients_to_its_input() -> None:
    """What training adapters on a frozen quantised base needs: ∂y/∂x = W_deq."""
    for kind in MAIN:
        layer = linear(kind)
        weight = BACKENDS[kind]().get_weight(layer)
        x = torch.randn(5, 64, requires_grad=True)
        grad_out = torch.randn(5, 32)
        y = layer(x)
        assert torch.allclose(y, x @ weight.T + layer.bias, atol=1e-5)
        y.backward(grad_out)
        assert x.grad is not None
        assert torch.allclose(x.grad, grad_out @ weight, atol=1e-5)


def test_activation_quantising_weights_are_refused_because_they_block_gradients() -> None:
    layer = quantise(nn.Linear(64, 32), "int8")
    dynamic = nn.Linear(64, 32)
    dynamic.load_state_dict({"weight": torch.randn(32, 64), "bias": torch.zeros(32)})
    from torchao.quantization import quantize_

    quantize_(dynamic, Int8DynamicActivationInt8WeightConfig())
    assert type(dynamic.weight) is type(layer.weight)  # the same Int8Tensor type
    x = torch.randn(5, 64, requires_grad=True)
    dynamic(x).sum().backward()
    assert x.grad is None  # torchao's linear gives no gradient w.r.t. its input here
    backend = Int8WeightOnlyBackend()
    assert not backend.supports(dynamic)
    assert "no gradient" in (backend.refusal(dynamic) or "")
    assert resolve_backend(dynamic) is None


def test_intx_weights_below_4_bits_are_refused() -> None:
    layer = nn.Linear(64, 32)
    from torchao.quantization import quantize_

    quantize_(layer, IntxWeightOnlyConfig(weight_dtype=torch.int2))
    backend = IntxWeightOnlyBackend()
    assert not backend.supports(layer)
    assert "2-bit" in (backend.refusal(layer) or "")


def test_the_install_hint_names_this_distribution() -> None:
    """Declared as `adapt.install_hints` entry points, by the weight type's dotted name."""
    for kind in MAIN:
        hint = backend_hint(linear(kind))
        assert hint is not None and hint[1] == "adapt-torchao", hint
        assert hint[0] == BACKENDS[kind].tensor_type


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_writing_keeps_the_tensor_its_type_granularity_dtype_and_device(
    kind: str, dtype: torch.dtype
) -> None:
    layer = linear(kind, dtype=dtype)
    backend = BACKENDS[kind]()
    param: Any = layer.weight
    layout = (type(param), param.dtype, param.device, list(param.block_size), param.scale.shape)
    weight = backend.get_weight(layer)
    assert weight.dtype == torch.float32 and weight.shape == (32, 64)
    assert backend.compute_dtype(layer) == dtype
    backend.set_weight(layer, weight + 0.05 * torch.randn_like(weight))
    assert type(layer) is nn.Linear
    assert layer.weight is param  # written in place: ties and references stay valid
    now: Any = layer.weight
    assert (type(now), now.dtype, now.device, list(now.block_size), now.scale.shape) == layout
    assert not now.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_writing_back_the_weight_read_is_exact(kind: str, dtype: torch.dtype) -> None:
    """torchao's fresh symmetric scales would shrink or grow a requantised weight (by up to
    1/255 for int8, 1/15 for int4); kept scales do not."""
    layer = linear(kind, dtype=dtype)
    backend = BACKENDS[kind]()
    param: Any = layer.weight
    codes, scale = param.qdata.clone(), param.scale.clone()
    report = backend.set_weight(layer, backend.get_weight(layer))
    assert report.lossy and report.rel_error == 0.0 and report.max_abs_error == 0.0
    assert torch.equal(param.qdata, codes) and torch.equal(param.scale, scale)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_write_is_as_accurate_as_quantising_afresh_and_reported_truly(kind: str) -> None:
    layer = linear(kind)
    backend = BACKENDS[kind]()
    gen = torch.Generator().manual_seed(1)
    wanted = backend.get_weight(layer) + 0.02 * torch.randn(32, 64, generator=gen)
    fresh = nn.Linear(64, 32)
    fresh.weight = nn.Parameter(wanted.clone())
    fresh_error = rel(backend.get_weight(quantise(fresh, kind)), wanted)  # torchao's own
    report = backend.set_weight(layer, wanted)
    stored = backend.get_weight(layer)
    assert rel(stored, wanted) <= fresh_error + 1e-12
    assert report.rel_error == pytest.approx(rel(stored, wanted), rel=1e-6)
    assert report.max_abs_error == pytest.approx((stored - wanted).abs().max().item(), rel=1e-6)
    assert 0 < report.rel_error <= backend.max_rel_error


def test_a_wrong_shape_or_a_non_finite_weight_is_refused_and_leaves_the_layer() -> None:
    layer = linear("int8")
    backend = Int8WeightOnlyBackend()
    before = backend.get_weight(layer).clone()
    with pytest.raises(TargetError, match=r"\(out_features, in_features\)"):
        backend.set_weight(layer, torch.zeros(64, 32))
    bad = before.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AdapterStateError, match="NaN or Inf"):
        backend.set_weight(layer, bad)
    assert torch.equal(backend.get_weight(layer), before)


def _weights_under_test() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {
        f"normal{shape}": 0.02 * torch.randn(shape, generator=gen)
        for shape in [(32, 64), (128, 64), (256, 256), (1024, 1024)]
    }
    for path, module in tiny_llama().named_modules():
        if isinstance(module, nn.Linear):
            out[f"llama:{path}"] = module.weight.detach().clone()
    return out


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_the_declared_bound_is_twice_the_error_measured(kind: str) -> None:
    """Random-normal and tiny-Llama weights, quantised by torchao and then written with a
    rank-8 change (a LoRA merge): the declared max_rel_error is at least twice the worst."""
    backend = BACKENDS[kind]()
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    for weight in _weights_under_test().values():
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight = nn.Parameter(weight.clone())
        quantise(layer, kind)
        worst = max(worst, rel(backend.get_weight(layer), weight))
        low_rank = torch.randn(weight.shape[0], 8, generator=gen) @ torch.randn(
            8, weight.shape[1], generator=gen
        )
        wanted = backend.get_weight(layer) + 0.1 * weight.norm() * low_rank / low_rank.norm()
        worst = max(worst, backend.set_weight(layer, wanted).rel_error)
    print(f"{kind}: worst relative error {worst:.4f}, declared {backend.max_rel_error}")
    assert 0 < 2 * worst <= backend.max_rel_error


def test_adapting_an_activation_quantising_weight_says_why_it_is_refused() -> None:
    from torchao.quantization import quantize_

    from adapt.core import adapt
    from adapt.lora import LoraConfig

    net = nn.Sequential(nn.Linear(64, 32))
    quantize_(net, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(TargetError) as raised:
        adapt(net, LoraConfig(r=4, target_modules=["0"]))
    assert "pip install adapt-torchao" not in str(raised.value)
    assert "no gradient" in str(raised.value)
