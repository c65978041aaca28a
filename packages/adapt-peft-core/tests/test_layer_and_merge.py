"""AdapterLayer forward and the merge protocol, with the toy method."""

from __future__ import annotations

import copy

import pytest
import torch
from core_testutils import MLP, mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adapt.core import AdaptedModel, AdapterLayer, AdapterStateError, adapt
from adapt.core.testing import ToyConfig, ToyLayer, assert_merge_roundtrip


def toy_layer(
    in_f: int = 6, out_f: int = 4, names: tuple[str, ...] = ("a",), **cfg: object
) -> ToyLayer:
    torch.manual_seed(0)
    layer = ToyLayer(nn.Linear(in_f, out_f))
    config = ToyConfig(init_identity=False, **cfg)  # type: ignore[arg-type]
    for name in names:
        layer.update_layer(name, config)
    layer.set_adapter(list(names))
    return layer


def test_layer_forward_is_base_plus_contribution() -> None:
    layer = toy_layer()
    x = torch.randn(3, 6)
    a, b = layer.toy_A["a"], layer.toy_B["a"]
    expected = layer.base_layer(x) + x @ a.T @ b.T
    torch.testing.assert_close(layer(x), expected)
    # ΔW is consistent with the contribution
    torch.testing.assert_close(layer.adapter_output(x, "a"), x @ layer.delta_weight("a").T)


def test_new_adapter_is_identity(mlp: MLP, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = mlp(x)
    model = adapt(mlp, ToyConfig(target_modules=["up", "down", "head"]))
    assert len(list(model.adapter_layers())) == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    layer = model.model.up
    assert isinstance(layer, ToyLayer)
    assert torch.count_nonzero(layer.toy_B["default"]) == 0
    assert torch.count_nonzero(layer.toy_A["default"]) > 0
    assert layer.r == {"default": 2}


def test_several_active_adapters_add_up() -> None:
    layer = toy_layer(names=("a", "b"))
    x = torch.randn(3, 6)
    base = layer.base_layer(x)
    expected = base + layer.adapter_output(x, "a") + layer.adapter_output(x, "b")
    torch.testing.assert_close(layer(x), expected)
    layer.set_adapter("b")
    torch.testing.assert_close(layer(x), base + layer.adapter_output(x, "b"))
    layer.set_adapter(["zzz"])  # unknown names are ignored at layer level
    assert layer.active_adapters == []
    torch.testing.assert_close(layer(x), base)


def test_layer_set_adapter_sets_trainability() -> None:
    layer = toy_layer(names=("a", "b"))
    layer.set_adapter("b")
    assert not layer.toy_A["a"].requires_grad and layer.toy_B["b"].requires_grad
    layer.set_adapter("b", trainable=False)
    assert not any(p.requires_grad for n in ("a", "b") for p in layer.adapter_tensors(n).values())


def test_adapter_tensors_drop_the_adapter_name() -> None:
    layer = toy_layer(names=("a", "b"))
    tensors = layer.adapter_tensors("b")
    assert sorted(tensors) == ["toy_A", "toy_B"]
    assert tensors["toy_A"] is layer.toy_A["b"]
    assert layer.adapter_tensors("nope") == {}
    assert "adapters=['a', 'b']" in repr(layer)


def test_layer_merge_unmerge() -> None:
    layer = toy_layer(names=("a", "b"))
    x = torch.randn(3, 6)
    w0 = layer.base_layer.weight.detach().clone()
    out = layer(x).detach()
    assert layer.merge(["a"]) is not None
    assert layer.merged_adapters == ["a"] and layer.merged
    torch.testing.assert_close(layer(x), out)  # a merged, b still added on the fly
    assert layer.merge(["a"]) is None  # already merged: nothing to do
    layer.merge()  # the remaining active one
    assert layer.merged_adapters == ["a", "b"]
    torch.testing.assert_close(layer.base_layer(x), out)
    torch.testing.assert_close(layer(x), out)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0)
    assert layer.unmerge() is None


def test_layer_merge_unknown_adapter_names_it() -> None:
    layer = toy_layer()
    with pytest.raises(AdapterStateError) as info:
        layer.merge(["b"])
    assert "no adapter 'b'" in str(info.value) and "['a']" in str(info.value)


def test_layer_delete_merged_adapter_is_refused() -> None:
    layer = toy_layer()
    layer.merge()
    with pytest.raises(
        AdapterStateError, match=r"'a' is merged into .*Linear; call unmerge_adapter"
    ):
        layer.delete_adapter("a")
    layer.unmerge()
    layer.delete_adapter("a")
    assert layer.adapter_names == [] and layer.r == {}


def test_disabled_layer_unmerges_and_runs_the_base() -> None:
    layer = toy_layer()
    x = torch.randn(2, 6)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), nn.functional.linear(x, w0, layer.base_layer.bias))
    assert not layer.merged


# -- merge through AdaptedModel ----------------------------------------------------------------


def two_adapter_model() -> AdaptedModel:
    model = adapt(mlp(), ToyConfig(target_modules=["up", "down"], init_identity=False))
    model.add_adapter("b", ToyConfig(target_modules=["down", "head"], init_identity=False, r=3))
    return model


def test_merge_roundtrip_default(x: torch.Tensor) -> None:
    model = two_adapter_model()
    assert_merge_roundtrip(model, lambda: x, atol=1e-5)


def test_merge_roundtrip_several_adapters(x: torch.Tensor) -> None:
    model = two_adapter_model()
    model.set_adapter(["default", "b"])
    assert_merge_roundtrip(model, lambda: x, atol=1e-5)
    # merging an inactive adapter explicitly: the merged output is default + b, while the
    # unmerged forward (only default active) is not; the helper would flag that
    model.set_adapter("default")
    with pytest.raises(AssertionError, match="merged output vs unmerged output"):
        assert_merge_roundtrip(model, lambda: x, atol=1e-5, adapter_names=["default", "b"])
    model.unmerge_adapter()


def test_merge_changes_the_base_weights_and_keeps_the_output(x: torch.Tensor) -> None:
    model = two_adapter_model()
    w_up = model.model.up.base_layer.weight.detach().clone()
    with torch.no_grad():
        out = model(x)
    report = model.merge_adapter()
    assert report.max_abs_error == 0.0 and not report.lossy
    assert not torch.equal(model.model.up.base_layer.weight, w_up)
    torch.testing.assert_close(
        model.model.up.base_layer.weight, w_up + model.model.up.delta_weight("default")
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), out)


def test_merge_unknown_adapter_is_refused() -> None:
    model = two_adapter_model()
    with pytest.raises(
        AdapterStateError, match=r"no adapter named 'c'; this model has \['b', 'default'\]"
    ):
        model.merge_adapter(["c"])


def test_safe_merge_with_nan_leaves_every_weight_untouched(x: torch.Tensor) -> None:
    model = two_adapter_model()
    model.set_adapter(["default", "b"])
    with torch.no_grad():
        model.model.head.toy_B["b"][0, 0] = float("nan")  # only the last layer is bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterStateError) as info:
        model.merge_adapter(safe_merge=True)
    msg = str(info.value)
    assert "NaN or Inf" in msg and "['b']" in msg and "nothing was merged" in msg
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, equal_nan=True)
    assert not any(layer.merged for _, layer in model.adapter_layers())

    # the layer-level check refuses in the same way
    head = model.model.head
    with pytest.raises(AdapterStateError, match="left unchanged"):
        head.merge(["b"], safe_merge=True)
    assert torch.equal(head.base_layer.weight, before["base_model.model.head.base_layer.weight"])
    # merge_and_unload(safe_merge=True) refuses before unloading anything
    with pytest.raises(AdapterStateError):
        model.merge_and_unload(safe_merge=True)
    assert isinstance(model.model.head, ToyLayer)


def test_safe_merge_of_a_finite_adapter_works(x: torch.Tensor) -> None:
    model = two_adapter_model()
    with torch.no_grad():
        out = model(x)
    model.merge_adapter(safe_merge=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), out)


def test_merge_and_unload_returns_plain_modules(x: torch.Tensor) -> None:
    model = two_adapter_model()
    model.set_adapter(["default", "b"])
    with torch.no_grad():
        out = model(x)
    plain = model.merge_and_unload()
    assert isinstance(plain, MLP)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert all(type(getattr(plain, n)) is nn.Linear for n in ("up", "down", "head"))
    assert sorted(plain.state_dict()) == sorted(MLP().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), out)
    assert model.peft_config == {} and model.active_adapters == []


def test_unload_restores_the_original(x: torch.Tensor) -> None:
    base = mlp()
    original = copy.deepcopy(base)
    model = adapt(base, ToyConfig(target_modules=["up", "down"], init_identity=False))
    model.merge_adapter()  # unload takes merged adapters back out
    plain = model.unload()
    assert plain is base
    assert [type(m) for m in plain.modules()] == [type(m) for m in original.modules()]
    for (k1, v1), (k2, v2) in zip(
        plain.state_dict().items(), original.state_dict().items(), strict=True
    ):
        assert k1 == k2
        torch.testing.assert_close(v1, v2)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), original(x))


def test_mixed_batch_forward_refused_while_merged(x: torch.Tensor) -> None:
    model = two_adapter_model()
    model.merge_adapter()
    with pytest.raises(AdapterStateError, match="needs unmerged adapters; call unmerge_adapter"):
        model(x, adapter_names=["default"] * 4)
    layer = model.model.up
    with pytest.raises(AdapterStateError, match="needs unmerged adapters"):
        layer(torch.randn(1, 8), adapter_names=["default"])


@settings(max_examples=40, deadline=None)
@given(
    in_f=st.integers(1, 12),
    out_f=st.integers(1, 12),
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_merge_unmerge_property(
    in_f: int, out_f: int, ranks: list[int], batch: int, seed: int
) -> None:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(in_f, out_f).double(), nn.Tanh(), nn.Linear(out_f, 3).double())
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    model = adapt(base, ToyConfig(target_modules=["0", "2"], init_identity=False, r=ranks[0]))
    for i, r in enumerate(ranks[1:]):
        model.add_adapter(f"extra{i}", ToyConfig(target_modules=["0"], init_identity=False, r=r))
    model.set_adapter(list(model.peft_config))
    assert model.model[0].toy_A["default"].dtype == torch.float64
    x = torch.randn(batch, in_f, dtype=torch.float64)
    assert_merge_roundtrip(model, lambda: x, atol=1e-10)
    for key, value in model.unload().state_dict().items():
        torch.testing.assert_close(value, w0[key], atol=1e-12, rtol=0)
