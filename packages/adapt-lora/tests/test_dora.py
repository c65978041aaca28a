"""DoRA (``use_dora=True``) against its definition, computed here from scratch with the full
out×in matrix: every LoRA layer type, gradients, dropout, several adapters, merging, mixed
batches, zero-norm rows, the norm cache, autocast, half-precision bases, torch.compile."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lora_testutils import Wrap, ids, max_diff, tiny_gpt2, tiny_llama
from torch import nn

from adapt.core import AdapterStateError, PluginError, adapt
from adapt.core.testing import check_layer
from adapt.lora import LoraConfig
from adapt.lora.dora import NORM_EPS
from adapt.lora.layer import LoraEmbedding, LoraLayer, LoraLinear
from adapt.lora.layer_conv import LoraConv

TOL = 1e-5


def _layer(model: nn.Module, suffix: str = "layer") -> LoraLayer:
    return next(
        m for n, m in model.named_modules() if n.endswith(suffix) and isinstance(m, LoraLayer)
    )


def _randomise(layer: LoraLayer, name: str = "default", seed: int = 0) -> None:
    """B non-zero, magnitudes moved off the row norms (so both DoRA terms matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in layer.adapter_tensors(name).items():
            noise = torch.randn(t.shape, generator=g)
            if "magnitude" in key:
                t.mul_(1 + 0.2 * noise)
            elif key.endswith("B.weight") or key == "lora_embedding_B":
                t.copy_(0.3 * noise)


def _reference(layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    """The definition: base(x) + (c−1)·(x·W) + c·s·B(A x), c = m / ‖W + s·BA‖ (detached),
    with the dense ΔW built from the factors and the base module called plainly."""
    base = layer.get_base_layer()
    delta = layer.delta_weight(name)  # canonical layout, scaled
    weight = layer.backend.get_weight(base)
    full = weight + delta
    axis = layer.output_axis
    norm = full.movedim(axis, 0).flatten(1).norm(dim=1).detach()
    m = layer.lora_magnitude_vector[name].flatten()
    c = m / norm
    if isinstance(base, nn.Embedding):
        out = F.embedding(x, weight) + F.embedding(x, delta)
        base_out = F.embedding(x, weight)
        return base_out + (c - 1) * base_out + c * (out - base_out)
    if isinstance(base, nn.modules.conv._ConvNd):
        view = (1, -1, *([1] * len(base.kernel_size)))
        plain = base._conv_forward(x, weight, None)  # type: ignore[operator]
        lora = base._conv_forward(x, delta, None)  # type: ignore[operator]
        b = 0 if base.bias is None else base.bias.view(view)
        return plain + b + (c.view(view) - 1) * plain + c.view(view) * lora
    plain = x @ weight.t()
    b = 0 if base.bias is None else base.bias
    return plain + b + (c - 1) * plain + c * (x @ delta.t())


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "linear": (lambda: nn.Linear(12, 9), lambda: torch.randn(2, 5, 12)),
    "linear-nobias": (lambda: nn.Linear(12, 9, bias=False), lambda: torch.randn(7, 12)),
    "embedding": (lambda: nn.Embedding(16, 6), lambda: torch.randint(0, 16, (3, 4))),
    "conv1d": (lambda: nn.Conv1d(3, 5, 3, padding=1), lambda: torch.randn(2, 3, 10)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, stride=2), lambda: torch.randn(2, 3, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2), lambda: torch.randn(2, 2, 5, 5, 5)),
}


def _dora(case: str, **kwargs: Any) -> tuple[nn.Module, LoraLayer, torch.Tensor]:
    make, make_x = CASES[case]
    torch.manual_seed(0)
    model = adapt(Wrap(make()), LoraConfig(r=3, use_dora=True, target_modules=["layer"], **kwargs))
    layer = _layer(model)
    _randomise(layer)
    return model, layer, make_x()


# -- the definition ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_the_definition(case: str) -> None:
    model, layer, x = _dora(case)
    got = model(x)
    want = _reference(layer, "default", x)
    assert max_diff(got, want) <= TOL
    params = [t for t in layer.adapter_tensors("default").values() if t.requires_grad]
    assert any("magnitude" in k for k in layer.adapter_tensors("default"))
    grads = torch.autograd.grad(got.square().sum(), params)
    ref = torch.autograd.grad(want.square().sum(), params)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_magnitude_starts_at_the_row_norms_so_a_new_adapter_is_the_identity(case: str) -> None:
    make, make_x = CASES[case]
    torch.manual_seed(0)
    base = make()
    x = make_x()
    expected = base(x)
    model = adapt(Wrap(base), LoraConfig(r=3, use_dora=True, target_modules=["layer"]))
    layer = _layer(model)
    weight = layer.backend.get_weight(layer.get_base_layer())
    norms = weight.movedim(layer.output_axis, 0).flatten(1).norm(dim=1)
    m = layer.lora_magnitude_vector["default"]
    torch.testing.assert_close(m.flatten(), norms, rtol=1e-6, atol=1e-6)
    expected_shape = (1, 5, 1, 1) if case == "conv2d" else None  # PEFT's layout for convs
    if expected_shape:
        assert tuple(m.shape) == expected_shape
    assert max_diff(model(x), expected) <= TOL


def test_gpt2_conv1d_matches_the_definition() -> None:
    torch.manual_seed(0)
    model = adapt(tiny_gpt2(), LoraConfig(r=4, use_dora=True, target_modules=["c_attn"]))
    layer = _layer(model, "h.0.attn.c_attn")
    _randomise(layer)
    x = torch.randn(2, 3, 32)
    assert max_diff(layer(x), _reference(layer, "default", x)) <= TOL
    assert layer.lora_magnitude_vector["default"].shape == (96,)


def test_fused_linear_path_equals_the_general_path_with_gradients() -> None:
    model, layer, x = _dora("linear")
    x.requires_grad_(True)
    fused = model(x)
    layer.fuse_adapter_output = False  # the general path (base output + adapter_effect)
    general = model(x)
    assert max_diff(fused, general) <= TOL
    params = [x, *layer.adapter_tensors("default").values()]
    g1 = torch.autograd.grad(fused.sum(), params)
    g2 = torch.autograd.grad(general.sum(), params)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_recomputes_the_base_term_on_the_dropped_input() -> None:
    model, layer, x = _dora("linear", lora_dropout=0.5)
    model.train()
    torch.manual_seed(7)
    got = model(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)
    base = layer.get_base_layer()
    c = layer.lora_magnitude_vector["default"] / (base.weight + layer.delta_weight("default")).norm(
        dim=1
    )
    want = (
        base(x)
        + (c - 1) * (dropped @ base.weight.t())
        + c * (dropped @ layer.delta_weight("default").t())
    )
    assert max_diff(got, want) <= TOL
    model.eval()
    assert max_diff(model(x), _reference(layer, "default", x)) <= TOL


def test_magnitude_changes_take_effect_at_once() -> None:
    """The magnitude is its own tensor, not a view of the cached norm."""
    model, layer, x = _dora("linear")
    with torch.no_grad():
        before = model(x)
        layer.lora_magnitude_vector["default"].mul_(2)
        assert max_diff(model(x), _reference(layer, "default", x)) <= TOL
        assert max_diff(model(x), before) > 0.1


def test_embedding_dora_in_training_with_dropout_ignores_dropout_like_peft() -> None:
    model, layer, x = _dora("embedding", lora_dropout=0.3)
    model.train()
    assert max_diff(model(x), _reference(layer, "default", x)) <= TOL


def test_norm_cache_follows_optimizer_steps() -> None:
    model, layer, x = _dora("linear")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        with torch.no_grad():
            assert max_diff(model(x), _reference(layer, "default", x)) <= TOL


# -- several adapters, merging ----------------------------------------------------------------
def _three_adapters(case: str = "linear") -> tuple[nn.Module, LoraLayer, torch.Tensor]:
    model, layer, x = _dora(case)
    model.add_adapter("b", LoraConfig(r=2, use_dora=True, target_modules=["layer"]))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False))
    _randomise(layer, "b", seed=1)
    model.set_adapter(["default", "b", "plain"])
    return model, layer, x


@pytest.mark.parametrize("case", ["linear", "embedding", "conv2d"])
def test_several_adapters_each_scale_relative_to_the_base_and_add_up(case: str) -> None:
    model, layer, x = _three_adapters(case)
    with torch.no_grad():
        together = model(x)
        base = layer.get_base_layer()(x)
        parts = []
        for name in ("default", "b", "plain"):
            model.set_adapter(name)
            parts.append(model(x) - base)
        model.set_adapter(["default", "b", "plain"])
    assert max_diff(together, base + sum(parts)) <= TOL
    assert max_diff(_reference(layer, "default", x) - base, parts[0]) <= TOL


@pytest.mark.parametrize("case", ["linear", "embedding", "conv2d"])
def test_merging_several_dora_adapters_is_exact_at_once_and_one_by_one(case: str) -> None:
    model, layer, x = _three_adapters(case)
    base_weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        expected = model(x)
        model.merge_adapter()
        assert max_diff(model(x), expected) <= TOL
        model.unmerge_adapter()
        assert max_diff(layer.get_base_layer().weight, base_weight) <= TOL
        for name in ("b", "plain", "default"):  # one at a time, in another order
            model.merge_adapter([name])
            assert max_diff(model(x), expected) <= TOL  # merged ones + unmerged ones
        model.unmerge_adapter()
        assert max_diff(layer.get_base_layer().weight, base_weight) <= TOL
        assert max_diff(model(x), expected) <= TOL


def test_merge_and_unload_gives_a_plain_module_with_the_same_outputs() -> None:
    model, _, x = _dora("conv2d")
    with torch.no_grad():
        expected = model(x)
        plain = model.merge_and_unload(safe_merge=True)
        assert type(plain.layer) is nn.Conv2d
        assert max_diff(plain(x), expected) <= TOL


def test_a_magnitude_of_zero_merges_but_refuses_to_unmerge_and_keeps_the_layer() -> None:
    model, layer, x = _dora("linear")
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][2] = 0.0
        expected = model(x)
        model.merge_adapter()
        assert max_diff(model(x), expected) <= TOL
        merged = layer.get_base_layer().weight.clone()
        with pytest.raises(AdapterStateError, match=r"cannot be recovered|cannot be restored"):
            model.unmerge_adapter()
        assert torch.equal(layer.get_base_layer().weight, merged)
        assert layer.merged_adapters == ["default"]


def test_safe_merge_refuses_non_finite_results_and_leaves_the_weight() -> None:
    model, layer, _x = _dora("linear")
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"][0] = float("inf")
    with pytest.raises(Exception, match="NaN or Inf"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before)
    assert not layer.merged_adapters


# -- mixed batches ----------------------------------------------------------------------------
def test_mixed_batch_gives_each_sample_its_own_adapter() -> None:
    torch.manual_seed(0)
    model = adapt(
        tiny_llama(),
        LoraConfig(r=4, use_dora=True, target_modules="all-linear", init_lora_weights=False),
    )
    model.add_adapter("lora", LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    batch = ids(batch=4)
    names = ["default", "lora", "__base__", "default"]
    with torch.no_grad():
        mixed = model(input_ids=batch, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(input_ids=batch[i : i + 1]).logits
            else:
                model.set_adapter(name)
                single = model(input_ids=batch[i : i + 1]).logits
            assert max_diff(mixed[i : i + 1], single) <= TOL, (i, name)


# -- zero and tiny norms ----------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-7])
@pytest.mark.parametrize("case", ["linear", "embedding", "conv2d"])
def test_zero_or_tiny_weight_rows_give_finite_outputs_and_gradients(
    case: str, scale: float
) -> None:
    make, make_x = CASES[case]
    torch.manual_seed(0)
    base = make()
    with torch.no_grad():
        base.weight.movedim(1 if case == "embedding" else 0, 0)[1].mul_(scale)
    model = adapt(Wrap(base), LoraConfig(r=3, use_dora=True, target_modules=["layer"]))
    model.train()
    x = make_x()
    out = model(x)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    layer = _layer(model)
    with torch.no_grad():
        _randomise(layer)
        assert torch.isfinite(model(x)).all()
        model.merge_adapter()
        assert torch.isfinite(layer.get_base_layer().weight).all()


def test_an_adapter_cancelling_a_weight_row_stays_finite_and_exact() -> None:
    model, layer, x = _dora("linear-nobias")
    base = layer.get_base_layer()
    with torch.no_grad():  # row 0 of W + s·BA is exactly zero
        base.weight[0] = -layer.delta_weight("default")[0]
        out = model(x)
    assert torch.isfinite(out).all()
    norm = (base.weight + layer.delta_weight("default")).norm(dim=1)
    assert norm[0] <= 1e-6
    c = layer.lora_magnitude_vector["default"] / norm.clamp_min(NORM_EPS)
    want = c * (x @ (base.weight + layer.delta_weight("default")).t())
    assert max_diff(out[:, 1:], want[:, 1:]) <= TOL
    # the zero row has no direction: any finite value within the row's reach (m·‖x‖) is right
    m0 = layer.lora_magnitude_vector["default"][0].abs()
    assert out[:, 0].abs().max() <= m0 * x.norm(dim=-1).max()


# -- precision, compile -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_matches_float32_within_half_precision(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = adapt(
        tiny_llama(),
        LoraConfig(r=4, use_dora=True, target_modules="all-linear", init_lora_weights=False),
    )
    with torch.no_grad():
        want = model(input_ids=ids()).logits
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids()).logits
    rel = max_diff(out.float(), want) / want.abs().max().item()
    assert rel <= 0.03
    out.float().square().mean().backward()
    mags = [p for n, p in model.named_parameters() if "magnitude" in n]
    assert mags and all(p.grad is not None and torch.isfinite(p.grad).all() for p in mags)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_base_trains_with_float32_magnitudes(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref = adapt(
        tiny_llama(),
        LoraConfig(
            r=4, use_dora=True, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    half = copy.deepcopy(ref)
    for _name, p in half.named_parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    mags = [p for n, p in half.named_parameters() if "magnitude" in n]
    assert all(p.dtype == torch.float32 for p in mags)
    out = half(input_ids=ids()).logits
    want = ref(input_ids=ids()).logits
    assert max_diff(out.float(), want) / want.abs().max().item() <= 0.05
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mags)


@pytest.mark.compile
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_no_graph_break_under_torch_compile(grad: bool) -> None:
    import torch._dynamo as dynamo

    model = adapt(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
    dynamo.reset()
    with torch.set_grad_enabled(grad):
        explained = dynamo.explain(model)(input_ids=ids(), use_cache=False)
    assert explained.graph_break_count == 0, explained.break_reasons[:2]


def test_norm_cache_follows_dtype_and_device_moves() -> None:
    model, layer, x = _dora("linear")
    with torch.no_grad():
        model(x)
        model.double()
        got = model(x.double())
        assert got.dtype == torch.float64
        assert max_diff(got, _reference(layer, "default", x.double())) <= TOL


@pytest.mark.compile
def test_torch_compile_equals_eager_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = adapt(
        tiny_llama(),
        LoraConfig(r=4, use_dora=True, target_modules="all-linear", init_lora_weights=False),
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(input_ids=ids()).logits
    want = eager(input_ids=ids()).logits
    assert max_diff(out, want) <= 1e-4
    out.square().mean().backward()
    want.square().mean().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys() and any("magnitude" in n for n in got)
    for name in got:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-3, atol=1e-5)


# -- the kit, plumbing, errors ----------------------------------------------------------------
def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return make


@pytest.mark.parametrize(
    ("layer_cls", "case"),
    [(LoraLinear, "linear"), (LoraEmbedding, "embedding"), (LoraConv, "conv2d")],
)
def test_conformance_kit(layer_cls: type[LoraLayer], case: str) -> None:
    make, make_x = CASES[case]
    torch.manual_seed(0)
    x = make_x()
    check_layer(layer_cls, _seeded(make), LoraConfig(r=2, use_dora=True), make_input=lambda: x)


def test_only_active_magnitudes_train_and_delete_removes_them() -> None:
    model, layer, _ = _three_adapters()
    model.set_adapter("b")
    assert layer.lora_magnitude_vector["b"].requires_grad
    assert not layer.lora_magnitude_vector["default"].requires_grad
    model.delete_adapter("default")
    assert "default" not in layer.lora_magnitude_vector and "default" not in layer.lora_variant
    assert not any(k[0] == "default" for k in layer.variant_state)


def test_saved_keys_and_config_are_peft_s(tmp_path: Any) -> None:
    from safetensors.torch import load_file

    model, _, _ = _dora("linear")
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.layer.lora_magnitude_vector" in keys
    import json

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and "variant" not in config


def test_an_unknown_variant_is_a_clear_error_before_anything_changes() -> None:
    base = Wrap(nn.Linear(4, 4))
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(PluginError, match=r"adapt\.lora_variants"):
        adapt(base, LoraConfig(variant="nonexistent", target_modules=["layer"]))
    assert type(base.layer) is nn.Linear
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())


def test_the_norm_of_a_linear_avoids_the_full_product() -> None:
    """The row norm comes from ‖W‖², W·Aᵀ and A·Aᵀ: equal to the dense norm."""
    _model, layer, _ = _dora("linear")
    from adapt.lora.dora import DoraVariant

    variant = layer.lora_variant["default"]
    assert isinstance(variant, DoraVariant)
    base = layer.get_base_layer()
    dense = (base.weight + layer.delta_weight("default")).norm(dim=1)
    torch.testing.assert_close(variant.weight_norm(layer, "default"), dense, rtol=1e-6, atol=1e-6)
    assert math.isfinite(float(dense.sum()))


def test_adapt_inspect_shows_dora(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from adapt.core.cli import main

    adapt(tiny_llama(), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"])).save_pretrained(
        tmp_path
    )
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "use_dora:     True" in out
    assert "lora_magnitude_vector [32]" in out  # hidden size 32
