"""The layer protocol for every kind of method: adapters that multiply (``composition``), that
change the input (``adapter_input``), that read the base output (``base_output``), whose merge
depends on W (the merge hooks), multi-input base modules (``takes_all_inputs``), and configs
that save only their method's keys (``omitted_fields``)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from adapt.core import AdaptedModel, AdapterStateError, MergeReport, PluginError, TargetError
from adapt.core.config import AdapterConfig
from adapt.core.errors import ConfigError
from adapt.core.layer import AdapterLayer, adapter_dtype_device
from adapt.core.testing import ToyConfig, ToyLayer, ToyMethod, check_layer, registered_toy


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class ScaleLayer(AdapterLayer):
    """IA³-like on outputs: ``base(x) · Π s``; merging scales W's rows and the bias."""

    method: ClassVar[str] = "toy"
    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("toy_s",)
    composition: ClassVar[str] = "product"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.toy_s = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        dtype, device = adapter_dtype_device(self)
        self.toy_s[adapter_name] = nn.Parameter(
            torch.ones(self.out_features, dtype=dtype, device=device)
        )

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self.toy_s[adapter_name]

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight * self.toy_s[adapter_name].detach()[:, None]

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        s = self.toy_s[adapter_name].detach()
        if bool((s.abs() < 1e-6).any()):
            raise AdapterStateError(f"adapter {adapter_name!r} has a zero scale: cannot unmerge")
        return weight / s[:, None]

    def merge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return bias * self.toy_s[adapter_name].detach()

    def unmerge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return bias / self.toy_s[adapter_name].detach()


class InputScaleLayer(ScaleLayer):
    """IA³-like on inputs: ``base(x · Π s)``; merging scales W's columns, not the bias."""

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        dtype, device = adapter_dtype_device(self)
        self.toy_s[adapter_name] = nn.Parameter(
            torch.ones(self.in_features, dtype=dtype, device=device)
        )

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> None:
        return None

    def adapter_input(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return x * self.toy_s[adapter_name]

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight * self.toy_s[adapter_name].detach()[None, :]

    def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return weight / self.toy_s[adapter_name].detach()[None, :]

    def merge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return bias

    def unmerge_bias(self, bias: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return bias


def _set_scales(model: AdaptedModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.adapter_layers():
            s = layer.toy_s[name]
            s.copy_(1 + 0.3 * torch.randn(s.shape, generator=gen))


def _scaled_model(layer: type[AdapterLayer]) -> AdaptedModel:
    model = AdaptedModel(Net(), ToyConfig(target_modules=["a", "b"]), "one").eval()
    model.add_adapter("two", ToyConfig(target_modules=["a", "b"]))
    _set_scales(model, "one", 1)
    _set_scales(model, "two", 2)
    return model


X = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))


def _reference(model: AdaptedModel, names: list[str], inputs: bool) -> torch.Tensor:
    """The definition, by hand, from the base model's own modules."""
    base = model.model
    a, b = base.a.base_layer, base.b.base_layer
    sa = torch.stack([base.a.toy_s[n] for n in names]).prod(0)
    sb = torch.stack([base.b.toy_s[n] for n in names]).prod(0)
    if inputs:
        return b(torch.tanh(a(X * sa)) * sb)
    return b(torch.tanh(a(X) * sa)) * sb


@pytest.mark.parametrize("layer", [ScaleLayer, InputScaleLayer], ids=["output", "input"])
def test_several_product_adapters_multiply(layer: type[AdapterLayer]) -> None:
    with registered_toy(layer=layer), torch.no_grad():
        model = _scaled_model(layer)
        model.set_adapter(["one", "two"])
        want = _reference(model, ["one", "two"], inputs=layer is InputScaleLayer)
        torch.testing.assert_close(model(X), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", [ScaleLayer, InputScaleLayer], ids=["output", "input"])
def test_product_adapters_merge_with_bias_and_unmerge(layer: type[AdapterLayer]) -> None:
    with registered_toy(layer=layer), torch.no_grad():
        model = _scaled_model(layer)
        model.set_adapter(["one", "two"])
        before = {k: v.clone() for k, v in model.model.state_dict().items()}
        unmerged = model(X)
        model.merge_adapter()
        torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-6)
        bias = model.model.a.base_layer.bias
        changed = not torch.equal(bias, before["a.base_layer.bias"])
        assert changed is (layer is ScaleLayer)  # output-side scales the bias, input-side not
        model.unmerge_adapter()
        for key, value in model.model.state_dict().items():
            torch.testing.assert_close(value, before[key], rtol=1e-6, atol=1e-6)


def test_unmerge_that_cannot_be_right_is_refused_and_nothing_changes() -> None:
    with registered_toy(layer=ScaleLayer), torch.no_grad():
        model = _scaled_model(ScaleLayer)
        model.model.b.toy_s["one"][0] = 0.0
        model.merge_adapter(["one"])
        merged = model.model.b.base_layer.weight.clone()
        with pytest.raises(AdapterStateError, match="zero scale"):
            model.unmerge_adapter()
        assert model.model.b.merged_adapters == ["one"]
        assert torch.equal(model.model.b.base_layer.weight, merged)


def test_unmerge_giving_inf_is_refused_by_core() -> None:
    class Careless(ScaleLayer):  # divides without checking: core refuses the Inf result
        def unmerge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
            return weight / self.toy_s[adapter_name].detach()[:, None]

    with registered_toy(layer=Careless), torch.no_grad():
        model = _scaled_model(Careless)
        model.model.b.toy_s["one"][0] = 0.0
        model.merge_adapter(["one"])
        with pytest.raises(AdapterStateError, match="cannot be restored"):
            model.unmerge_adapter()
        assert model.model.b.merged


def test_safe_merge_checks_the_hooks_result_and_merges_nothing() -> None:
    with registered_toy(layer=ScaleLayer), torch.no_grad():
        model = _scaled_model(ScaleLayer)
        model.model.b.toy_s["one"][1] = float("inf")
        state = {k: v.clone() for k, v in model.model.state_dict().items()}
        with pytest.raises(AdapterStateError, match="safe_merge"):
            model.merge_adapter(["one"], safe_merge=True)
        assert not any(layer.merged for _, layer in model.adapter_layers())
        for key, value in model.model.state_dict().items():
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("layer", [ScaleLayer, InputScaleLayer], ids=["output", "input"])
def test_product_adapters_in_a_mixed_batch(layer: type[AdapterLayer]) -> None:
    with registered_toy(layer=layer), torch.no_grad():
        model = _scaled_model(layer)
        routing = ["one", "two", "__base__", "two", "one"]
        mixed = model(X, adapter_names=routing)
        for i, name in enumerate(routing):
            if name == "__base__":
                with model.disable_adapter():
                    want = model(X[i : i + 1])
            else:
                model.set_adapter(name)
                want = model(X[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", [ScaleLayer, InputScaleLayer], ids=["output", "input"])
def test_product_layers_pass_the_kit(layer: type[AdapterLayer]) -> None:
    def make_base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(6, 5)

    with registered_toy(layer=layer):
        report = check_layer(layer, make_base, ToyConfig())
    assert report.ok and len(report.passed) == 12, str(report)


class GatedByOutput(AdapterLayer):
    """A contribution computed from the base output: ``base(x) · g`` added (so the output is
    ``base · (1 + Σ g)``); it has no exact merge of its own and says so."""

    method: ClassVar[str] = "toy"
    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("toy_g",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.toy_g = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        self.toy_g[adapter_name] = nn.Parameter(torch.full((self.out_features,), 0.5))

    def adapter_output(
        self, x: torch.Tensor, adapter_name: str, *, base_output: torch.Tensor
    ) -> torch.Tensor:
        return base_output * self.toy_g[adapter_name]

    def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise AdapterStateError("GatedByOutput has no exact merge")


def test_an_adapter_sees_the_base_output_computed_once() -> None:
    with registered_toy(layer=GatedByOutput), torch.no_grad():
        model = AdaptedModel(Net(), ToyConfig(target_modules=["b"]), "one").eval()
        model.add_adapter("two", ToyConfig(target_modules=["b"]))
        model.set_adapter(["one", "two"])
        calls = []
        base = model.model.b.base_layer
        handle = base.register_forward_hook(lambda *_: calls.append(1))
        out = model(X)
        handle.remove()
        assert len(calls) == 1
        hidden = torch.tanh(model.model.a(X))
        torch.testing.assert_close(out, base(hidden) * 2.0)  # 1 + 0.5 + 0.5
        mixed = model(X, adapter_names=["one", "__base__", "two", "one", "__base__"])
        torch.testing.assert_close(mixed[1], base(hidden[1]))
        torch.testing.assert_close(mixed[0], base(hidden[0]) * 1.5)
        weight = base.weight.clone()
        with pytest.raises(AdapterStateError, match="no exact merge"):
            model.merge_adapter()
        assert torch.equal(base.weight, weight) and not model.model.b.merged


# -- multi-input base modules ------------------------------------------------------------------
class BilinearBackend:
    """``nn.Bilinear``'s weight ``(out, in1, in2)`` as it is stored."""

    base_types: ClassVar[tuple[type | str, ...]] = (nn.Bilinear,)
    lossy: ClassVar[bool] = False

    def shape(self, base: nn.Module) -> tuple[int, int]:
        assert isinstance(base, nn.Bilinear)
        return base.in1_features, base.out_features

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        assert isinstance(base, nn.Bilinear)
        return base.weight

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        assert isinstance(base, nn.Bilinear)
        with torch.no_grad():
            base.weight.copy_(weight)
        return MergeReport()

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        assert isinstance(base, nn.Bilinear)
        return base.weight.dtype


class BilinearLora(AdapterLayer):
    """Rank-r CP update of a bilinear map: ``ΔW[o,i,j] = Σ_r B[o,r] A[r,i] C[r,j]``; it reads
    both inputs."""

    method: ClassVar[str] = "toy"
    base_types: ClassVar[tuple[type | str, ...]] = (nn.Bilinear,)
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("toy_A", "toy_B", "toy_C")
    takes_all_inputs: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.toy_A, self.toy_B, self.toy_C = (
            nn.ParameterDict(),
            nn.ParameterDict(),
            nn.ParameterDict(),
        )

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        base = self.get_base_layer()
        assert isinstance(base, nn.Bilinear)
        r = config.r
        self.toy_A[adapter_name] = nn.Parameter(torch.randn(r, base.in1_features))
        self.toy_C[adapter_name] = nn.Parameter(torch.randn(r, base.in2_features))
        self.toy_B[adapter_name] = nn.Parameter(torch.zeros(base.out_features, r))

    def adapter_output(
        self, x: tuple[torch.Tensor, torch.Tensor], adapter_name: str
    ) -> torch.Tensor:
        x1, x2 = x
        h = (x1 @ self.toy_A[adapter_name].T) * (x2 @ self.toy_C[adapter_name].T)
        out: torch.Tensor = h @ self.toy_B[adapter_name].T
        return out

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b, c = (self.toy_A[adapter_name], self.toy_B[adapter_name], self.toy_C[adapter_name])
        return torch.einsum("or,ri,rj->oij", b, a, c)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bil = nn.Bilinear(4, 3, 5)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.bil(x1, x2)


@pytest.fixture
def bilinear_backend() -> Any:
    from adapt.core import get_registry

    registry = get_registry()
    registry.register_backend(BilinearBackend, name="test-bilinear")
    yield
    registry.unregister("adapt.backends", "test-bilinear")


class OneInputBilinear(BilinearLora):
    takes_all_inputs = False  # as every layer written before the flag existed


@pytest.mark.usefixtures("bilinear_backend")
def test_a_multi_input_module_is_refused_by_a_one_input_layer() -> None:
    with registered_toy(layer=OneInputBilinear):
        model = TwoInputs()
        with pytest.raises(TargetError) as info:
            AdaptedModel(model, ToyConfig(target_modules=["bil"]))
    message = str(info.value)
    assert "bil is a" in message and "takes 2 inputs (input1, input2)" in message
    assert "OneInputBilinear" in message and "takes_all_inputs = True" in message
    assert type(model.bil) is nn.Bilinear  # nothing was applied


@pytest.mark.usefixtures("bilinear_backend")
def test_a_layer_that_takes_all_inputs_passes_the_kit_with_mixed_batches() -> None:
    def make_base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Bilinear(4, 3, 5)

    def make_input() -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(6, 4, generator=gen), torch.randn(6, 3, generator=gen)

    with registered_toy(layer=BilinearLora):
        report = check_layer(BilinearLora, make_base, ToyConfig(r=2), make_input=make_input)
    assert report.ok and len(report.passed) == 12, str(report)


def test_composition_must_be_sum_or_product() -> None:
    with pytest.raises(PluginError, match="must be 'sum'"):

        class Wrong(ToyLayer):
            composition = "max"


def test_todays_layers_keep_working_a_merge_override_is_still_called() -> None:
    """A third-party layer written before the hooks: it overrides ``merge``/``unmerge``."""
    calls: list[str] = []

    class OldStyle(ToyLayer):
        def merge(self, adapter_names: Any = None, safe_merge: bool = False) -> Any:
            calls.append("merge")
            return super().merge(adapter_names, safe_merge)

        def unmerge(self) -> Any:
            calls.append("unmerge")
            return super().unmerge()

    def make_base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(6, 5)

    with registered_toy(layer=OldStyle):
        report = check_layer(OldStyle, make_base, ToyConfig())
    assert report.ok, str(report)
    assert "merge" in calls and "unmerge" in calls


# -- configs save only their method's keys ------------------------------------------------------
@dataclasses.dataclass
class NoLayersConfig(ToyConfig):
    omitted_fields: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")


def test_omitted_fields_are_not_saved_read_or_settable() -> None:
    cfg = NoLayersConfig(target_modules=["a"])
    data = cfg.to_dict()
    assert "layers_to_transform" not in data and "layers_pattern" not in data
    assert "target_modules" in data and data["peft_type"] == "TOY"
    assert "layers_to_transform" in ToyConfig().to_dict()  # others keep theirs
    with pytest.raises(ConfigError, match="has no layers_to_transform"):
        NoLayersConfig(layers_to_transform=[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = NoLayersConfig.from_dict({**data, "layers_pattern": "layers"})
    assert back == cfg
    assert any("layers_pattern" in str(w.message) for w in caught)
    assert json.loads(cfg.to_json()) == data
    assert isinstance(cfg, AdapterConfig)


# -- defaults a method fills in are written back ------------------------------------------------
class DefaultRank(ToyMethod):
    def resolve_config(self, model: Any, config: ToyConfig) -> ToyConfig:
        return dataclasses.replace(config, r=3) if config.r == 2 else config


def test_resolved_defaults_are_written_back_only_when_the_adapter_is_in() -> None:
    with registered_toy(method=DefaultRank()):
        config = ToyConfig(target_modules=["a", "b"])
        model = AdaptedModel(Net(), config)
        assert config.r == 3 and model.peft_config["default"] is config
        assert model.model.a.toy_A["default"].shape[0] == 3
        failing = ToyConfig(target_modules=["nothing_like_this"])
        with pytest.raises(TargetError):
            model.add_adapter("other", failing)
        assert failing.r == 2  # nothing half-applied


def test_a_refused_unmerge_leaves_the_whole_model_merged() -> None:
    with registered_toy(layer=ScaleLayer), torch.no_grad():
        model = _scaled_model(ScaleLayer)
        model.model.b.toy_s["one"][0] = 0.0  # "b" comes after "a": "a" would unmerge first
        model.merge_adapter(["one"])
        weights = {p: layer.base_layer.weight.clone() for p, layer in model.adapter_layers()}
        with pytest.raises(AdapterStateError, match=r"b: .*nothing was unmerged"):
            model.unmerge_adapter()
        for path, layer in model.adapter_layers():
            assert layer.merged_adapters == ["one"], path
            assert torch.equal(layer.base_layer.weight, weights[path]), path


def test_a_refused_merge_merges_no_layer() -> None:
    class RefusesOnB(ScaleLayer):
        def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
            if self.out_features == 4:  # layer "b"
                raise AdapterStateError("b cannot merge")
            return super().merge_weight(weight, adapter_name)

    with registered_toy(layer=RefusesOnB), torch.no_grad():
        model = _scaled_model(RefusesOnB)
        state = {k: v.clone() for k, v in model.model.state_dict().items()}
        with pytest.raises(AdapterStateError, match=r"b: b cannot merge; nothing was merged"):
            model.merge_adapter(["one"])
        assert not any(layer.merged for _, layer in model.adapter_layers())
        for key, value in model.model.state_dict().items():
            assert torch.equal(value, state[key]), key
