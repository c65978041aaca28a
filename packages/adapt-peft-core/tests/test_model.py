"""AdaptedModel with the toy method: adapters, routing, trainability, atomic add_adapter."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar

import pytest
import torch
from core_testutils import MLP, assert_unchanged, mlp, snapshot
from torch import nn

from adapt.core import (
    AdaptedModel,
    AdapterConfig,
    AdapterLayer,
    AdapterStateError,
    ConfigError,
    Method,
    ModulesToSave,
    TargetError,
    adapt,
)
from adapt.core.registry import Registry
from adapt.core.testing import (
    ToyConfig,
    ToyLayer,
    ToyMethod,
    assert_mixed_batch_matches,
    registered_toy,
)


def two_adapters() -> AdaptedModel:
    model = adapt(mlp(), ToyConfig(target_modules=["up", "down"], init_identity=False))
    model.add_adapter("b", ToyConfig(target_modules=["down", "head"], init_identity=False, r=3))
    return model


def out(model: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        result: torch.Tensor = model(x, **kwargs)
    return result


# -- basics ------------------------------------------------------------------------------------


def test_adapt_wraps_the_model_under_base_model(mlp: MLP) -> None:
    model = adapt(mlp, ToyConfig(target_modules=["up"]))
    assert model.model is mlp and model.get_base_model() is mlp
    assert model.base_model.model is mlp
    assert isinstance(mlp.up, ToyLayer)
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert set(model.peft_config) == {"default"}
    keys = list(model.state_dict())
    assert "base_model.model.up.toy_A.default" in keys
    assert "base_model.model.up.base_layer.weight" in keys
    # attribute pass-through to the wrapped model
    assert model.head is mlp.head
    with pytest.raises(AttributeError):
        _ = model.no_such_attribute


def test_forward_signature_is_the_wrapped_models(mlp: MLP) -> None:
    model = adapt(mlp, ToyConfig(target_modules=["up"]))
    params = inspect.signature(model.forward).parameters
    assert list(params) == ["x", "adapter_names"]
    assert params["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY


def test_adapting_an_adapted_model_is_refused(mlp: MLP) -> None:
    model = adapt(mlp, ToyConfig(target_modules=["up"]))
    with pytest.raises(AdapterStateError, match=r"already adapted; use model.add_adapter"):
        AdaptedModel(model, ToyConfig(target_modules=["down"]))


def test_forward_is_base_plus_active_contributions(x: torch.Tensor) -> None:
    base = mlp()
    model = two_adapters()
    up, down, head = model.model.up, model.model.down, model.model.head
    h = up.base_layer(x) + up.adapter_output(x, "default")
    h = torch.tanh(h)
    h = down.base_layer(h) + down.adapter_output(h, "default")
    expected = head.base_layer(h)
    torch.testing.assert_close(out(model, x), expected)
    assert not torch.allclose(out(model, x), out(base, x))


def test_set_adapter_switches_and_disable_adapter_bypasses(x: torch.Tensor) -> None:
    base_out = out(mlp(), x)
    model = two_adapters()
    out_default = out(model, x)
    model.set_adapter("b")
    assert model.active_adapters == ["b"]
    out_b = out(model, x)
    assert not torch.allclose(out_default, out_b)
    with model.disable_adapter():
        torch.testing.assert_close(out(model, x), base_out)
    torch.testing.assert_close(out(model, x), out_b)
    # restored even when the block raises
    with pytest.raises(RuntimeError, match="inside"), model.disable_adapter():
        raise RuntimeError("inside")
    torch.testing.assert_close(out(model, x), out_b)
    model.set_adapter(["default", "b"])
    both = out(model, x)
    assert not torch.allclose(both, out_b)


def test_unknown_adapter_in_set_adapter(x: torch.Tensor) -> None:
    model = two_adapters()
    with pytest.raises(AdapterStateError) as info:
        model.set_adapter(["b", "zzz"])
    assert "no adapter named 'zzz'; this model has ['b', 'default']" in str(info.value)
    assert model.active_adapters == ["default"]  # unchanged


# -- mixed batches -----------------------------------------------------------------------------


def test_mixed_batch_equals_per_sample_forwards(x: torch.Tensor) -> None:
    model = two_adapters()
    names = ["default", "b", "__base__", "b"]
    mixed = out(model, x, adapter_names=names)
    base = out(mlp(), x)
    model.set_adapter("default")
    torch.testing.assert_close(mixed[0], out(model, x[:1])[0])
    model.set_adapter("b")
    torch.testing.assert_close(mixed[1], out(model, x[1:2])[0])
    torch.testing.assert_close(mixed[3], out(model, x[3:4])[0])
    torch.testing.assert_close(mixed[2], base[2])
    # and with the kit's helper, which restores the active adapters
    model.set_adapter("default")
    assert_mixed_batch_matches(model, x, names, atol=1e-6)
    assert_mixed_batch_matches(model, x, ["__base__"] * 4, atol=1e-6)
    assert model.active_adapters == ["default"]


def test_mixed_batch_errors(x: torch.Tensor) -> None:
    model = two_adapters()
    with pytest.raises(AdapterStateError) as info:
        model(x, adapter_names=["default", "c", "zz", "b"])
    msg = str(info.value)
    assert "unknown adapters ['c', 'zz']" in msg and "known: ['b', 'default']" in msg
    assert "'__base__'" in msg
    with pytest.raises(ValueError, match="one adapter name per sample"):
        model(x, adapter_names="default")
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 4 samples"):
        model(x, adapter_names=["default", "b", "b"])


# -- deleting ----------------------------------------------------------------------------------


def test_delete_adapter(x: torch.Tensor) -> None:
    model = two_adapters()
    model.set_adapter("b")
    model.delete_adapter("b")
    assert set(model.peft_config) == {"default"}
    assert model.active_adapters == ["default"]  # falls back to the remaining adapter
    assert type(model.model.head) is nn.Linear  # left with no adapter: back to the base module
    assert isinstance(model.model.down, ToyLayer) and model.model.down.adapter_names == ["default"]
    assert not any("toy_A.b" in k for k in model.state_dict())
    with pytest.raises(
        AdapterStateError, match=r"no adapter named 'b'; this model has \['default'\]"
    ):
        model.delete_adapter("b")


def test_delete_merged_adapter_is_refused() -> None:
    model = two_adapters()
    model.merge_adapter(["b"])
    with pytest.raises(AdapterStateError, match="'b' is merged; call unmerge_adapter"):
        model.delete_adapter("b")
    model.unmerge_adapter()
    model.delete_adapter("b")


def test_delete_last_adapter_restores_the_base(x: torch.Tensor) -> None:
    base = mlp()
    expected = out(base, x)
    model = adapt(base, ToyConfig(target_modules=["up"], init_identity=False))
    model.delete_adapter("default")
    assert model.peft_config == {} and model.active_adapters == []
    assert type(base.up) is nn.Linear
    torch.testing.assert_close(out(model, x), expected)


# -- trainability ------------------------------------------------------------------------------


def toy_params(model: AdaptedModel, name: str) -> int:
    return sum(
        t.numel()
        for _, layer in model.adapter_layers()
        for t in layer.adapter_tensors(name).values()
    )


def test_only_the_active_adapter_trains() -> None:
    model = two_adapters()
    total = sum(p.numel() for p in model.parameters())
    assert model.trainable_parameters() == (toy_params(model, "default"), total)
    model.set_adapter("b")
    assert model.trainable_parameters() == (toy_params(model, "b"), total)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".toy_A.b" in n or ".toy_B.b" in n for n in trainable)
    model.set_adapter(["default", "b"])
    assert model.trainable_parameters()[0] == toy_params(model, "default") + toy_params(model, "b")
    # r=2 on up (12×8) and down (8×12); r=3 on down and head (5×8)
    assert toy_params(model, "default") == 2 * (8 + 12) * 2
    assert toy_params(model, "b") == 3 * (12 + 8) + 3 * (8 + 5)


def test_print_trainable_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    model = adapt(mlp(), ToyConfig(target_modules=["up"]))
    model.print_trainable_parameters()
    trainable, total = model.trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}\n"
    )


def test_inference_mode_trains_nothing() -> None:
    model = adapt(mlp(), ToyConfig(target_modules=["up"], inference_mode=True))
    assert model.trainable_parameters()[0] == 0


@pytest.mark.parametrize(
    ("bias", "expected"), [("all", {"up", "down", "head"}), ("adapter_only", {"up"})]
)
def test_bias_training(bias: str, expected: set[str]) -> None:
    model = adapt(mlp(), ToyConfig(target_modules=["up"], bias=bias))
    trainable_biases = {
        n.split(".")[2]
        for n, p in model.named_parameters()
        if p.requires_grad and n.endswith("bias")
    }
    assert trainable_biases == expected
    # the trained biases are saved with the adapter, under the base model's own paths
    saved = {k for k in model.adapter_state_dict("default") if k.endswith("bias")}
    paths = {"up": "up.base_layer", "down": "down", "head": "head"}
    assert saved == {f"base_model.model.{paths[name]}.bias" for name in expected}


# -- add_adapter is atomic ---------------------------------------------------------------------


def test_target_without_a_layer_leaves_the_model_unchanged() -> None:
    base = mlp()
    before = snapshot(base)
    with pytest.raises(TargetError) as info:
        adapt(base, ToyConfig(target_modules=["up", "act"]))
    msg = str(info.value)
    assert "act is a torch.nn.modules.activation.Tanh" in msg
    assert "no installed toy layer can adapt" in msg and "toy layers serve: Linear" in msg
    assert "Remove it from target_modules" in msg
    assert_unchanged(base, before)


def test_failed_second_adapter_leaves_the_adapted_model_unchanged() -> None:
    model = two_adapters()
    before = snapshot(model)
    config_before = dict(model.peft_config)
    with pytest.raises(TargetError, match="act is a"):
        model.add_adapter("c", ToyConfig(target_modules=["up", "down", "act"]))
    assert_unchanged(model, before)
    assert model.peft_config == config_before
    assert model.model.up.adapter_names == ["default"]


class FailOnPath(ToyMethod):
    """Passes an invalid rank to update_layer for one path, after others got the adapter."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.deleted: list[str] = []

    def layer_kwargs(
        self, model: AdaptedModel, config: AdapterConfig, adapter_name: str, path: str
    ) -> dict[str, Any]:
        return {"r": 0} if path == self.path else {}

    def on_delete(self, model: AdaptedModel, adapter_name: str) -> None:
        self.deleted.append(adapter_name)


def test_update_layer_failing_midway_rolls_back(registry: Registry) -> None:
    model = two_adapters()  # up: default; down: default, b; head: b
    method = FailOnPath("head")
    with registered_toy(registry, method=method):
        before = snapshot(model)
        with pytest.raises(ConfigError, match="toy rank must be a positive integer, got r=0"):
            model.add_adapter("c", ToyConfig(target_modules=["up", "down", "head"]))
        assert_unchanged(model, before)
        assert model.model.up.adapter_names == ["default"]
        assert model.model.down.adapter_names == ["default", "b"]
        assert set(model.model.up.r) == {"default"}
        assert set(model.peft_config) == {"default", "b"}
        assert method.deleted == ["c"]  # the method was told to drop its state

        # the same on a fresh model: nothing is injected
        base = mlp()
        before = snapshot(base)
        with pytest.raises(ConfigError):
            adapt(base, ToyConfig(target_modules=["up", "head"]))
        assert_unchanged(base, before)


class HalfBuiltLayer(ToyLayer):
    """update_layer creates toy_A, then fails for the adapter named 'bad'."""

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, config, **kwargs)
        if adapter_name == "bad" and self.out_features == 8:
            del self.toy_B[adapter_name]
            raise RuntimeError("half built")


def test_half_built_adapter_is_removed(registry: Registry) -> None:
    with registered_toy(registry, layer=HalfBuiltLayer):
        model = adapt(mlp(), ToyConfig(target_modules=["up", "down"]))
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="half built"):
            model.add_adapter("bad", ToyConfig(target_modules=["up", "down"]))
        assert_unchanged(model, before)


class DropoutFirstLayer(ToyLayer):
    """Creates per-adapter state in an ``other_param_names`` container (as LoRA does with its
    dropout) before its tensors, and fails for the adapter named 'bad' in between."""

    other_param_names: ClassVar[tuple[str, ...]] = ("toy_scale",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.toy_scale = nn.ParameterDict()

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        self.toy_scale[adapter_name] = nn.Parameter(torch.ones(1), requires_grad=False)
        if adapter_name == "bad":
            raise RuntimeError("failed after the scale")
        super().update_layer(adapter_name, config, **kwargs)


def test_failed_add_removes_state_outside_adapter_layer_names(registry: Registry) -> None:
    with registered_toy(registry, layer=DropoutFirstLayer):
        model = adapt(mlp(), ToyConfig(target_modules=["up", "down"]))
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="failed after the scale"):
            model.add_adapter("bad", ToyConfig(target_modules=["up", "down"]))
        assert_unchanged(model, before)
        assert list(model.model.up.toy_scale) == ["default"]


class RefusingMethod(ToyMethod):
    def prepare(
        self,
        model: AdaptedModel,
        config: AdapterConfig,
        adapter_name: str,
        targets: dict[str, nn.Module],
    ) -> None:
        raise TargetError(f"toy refuses {sorted(targets)}")


def test_prepare_failing_leaves_the_model_unchanged(registry: Registry) -> None:
    base = mlp()
    before = snapshot(base)
    with (
        registered_toy(registry, method=RefusingMethod()),
        pytest.raises(TargetError, match=r"toy refuses \['down', 'up'\]"),
    ):
        adapt(base, ToyConfig(target_modules=["up", "down"]))
    assert_unchanged(base, before)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a.b", "invalid adapter name 'a.b'"),
        ("../x", "invalid adapter name '../x'"),
        ("a/b", "no dots, slashes or spaces"),
        ("", "invalid adapter name ''"),
        ("a b", "invalid adapter name 'a b'"),
        ("-x", "invalid adapter name '-x'"),
        (3, "invalid adapter name 3"),
        ("__base__", "'__base__' is reserved for the base model"),
        ("default", "an adapter named 'default' exists already"),
    ],
)
def test_invalid_adapter_names(name: Any, message: str) -> None:
    model = adapt(mlp(), ToyConfig(target_modules=["up"]))
    before = snapshot(model)
    with pytest.raises(ConfigError) as info:
        model.add_adapter(name, ToyConfig(target_modules=["down"]))
    assert message in str(info.value)
    assert_unchanged(model, before)


def test_invalid_name_at_construction() -> None:
    base = mlp()
    with pytest.raises(ConfigError, match=r"invalid adapter name 'x\.y'"):
        adapt(base, ToyConfig(target_modules=["up"]), adapter_name="x.y")
    assert type(base.up) is nn.Linear


def test_valid_adapter_names() -> None:
    model = adapt(mlp(), ToyConfig(target_modules=["up"]), adapter_name="task_a-1")
    model.add_adapter("B2", ToyConfig(target_modules=["up"]))
    assert sorted(model.peft_config) == ["B2", "task_a-1"]


def test_non_config_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"expected an adapter config .* got dict"):
        adapt(mlp(), {"target_modules": ["up"]})  # type: ignore[arg-type]


@dataclasses.dataclass
class OtherConfig(ToyConfig):
    peft_type: ClassVar[str] = "OTHER"


class OtherMethod(ToyMethod):
    name: ClassVar[str] = "other"
    peft_type: ClassVar[str] = "OTHER"
    config_class: ClassVar[type[AdapterConfig]] = OtherConfig


class OtherLayer(ToyLayer):
    method: ClassVar[str] = "other"


def test_one_model_holds_one_method(registry: Registry) -> None:
    registry.register_method(OtherMethod())
    registry.register_layer(OtherLayer)
    model = adapt(mlp(), ToyConfig(target_modules=["up"]))
    with pytest.raises(ConfigError, match=r"'default' uses TOY and 'o' uses OTHER; one model"):
        model.add_adapter("o", OtherConfig(target_modules=["down"]))
    # a method layer never stacks on another method's layer
    other = adapt(mlp(), OtherConfig(target_modules=["up"]))
    assert isinstance(other.model.up, OtherLayer)


def test_unknown_method_is_a_missing_method_error() -> None:
    from adapt.core import MissingMethodError

    with pytest.raises(MissingMethodError, match="'OTHER'"):
        adapt(mlp(), OtherConfig(target_modules=["up"]))


# -- modules_to_save ---------------------------------------------------------------------------


def test_modules_to_save(x: torch.Tensor) -> None:
    base = mlp()
    original_head = base.head
    base_out = out(base, x)
    model = adapt(base, ToyConfig(target_modules=["up"], modules_to_save=["head"]))
    wrapper = model.model.head
    assert isinstance(wrapper, ModulesToSave) and wrapper.original_module is original_head
    copy_ = wrapper.modules_to_save["default"]
    assert copy_ is not original_head
    assert all(p.requires_grad for p in copy_.parameters())
    assert not any(p.requires_grad for p in original_head.parameters())
    with torch.no_grad():
        copy_.bias += 1.0
    torch.testing.assert_close(out(model, x), base_out + 1.0)
    with model.disable_adapter():
        torch.testing.assert_close(out(model, x), base_out)
    # mixed batch: per-sample copy of the head
    mixed = out(model, x, adapter_names=["default", "__base__", "default", "__base__"])
    torch.testing.assert_close(mixed[1::2], base_out[1::2])
    torch.testing.assert_close(mixed[0::2], base_out[0::2] + 1.0)
    saved = model.adapter_state_dict("default")
    assert "base_model.model.head.bias" in saved and "base_model.model.head.weight" in saved
    # unload puts the original back; merge_and_unload would keep the trained copy
    plain = model.unload()
    assert plain.head is original_head


def test_modules_to_save_errors() -> None:
    base = mlp()
    before = snapshot(base)
    with pytest.raises(
        TargetError, match=r"modules_to_save \['haed'\] matched no module; did you mean \['head'\]"
    ):
        adapt(base, ToyConfig(target_modules=["up"], modules_to_save=["haed"]))
    with pytest.raises(TargetError, match="up is both a target module and in modules_to_save"):
        adapt(base, ToyConfig(target_modules=["up"], modules_to_save=["up"]))
    assert_unchanged(base, before)


def test_merge_and_unload_keeps_the_trained_copy(x: torch.Tensor) -> None:
    model = adapt(mlp(), ToyConfig(target_modules=["up"], modules_to_save=["head"]))
    with torch.no_grad():
        model.model.head.modules_to_save["default"].bias += 1.0
    expected = out(model, x)
    plain = model.merge_and_unload()
    assert type(plain.head) is nn.Linear and type(plain.up) is nn.Linear
    torch.testing.assert_close(out(plain, x), expected)


def test_layers_are_adapter_layers() -> None:
    model = two_adapters()
    assert all(isinstance(layer, AdapterLayer) for _, layer in model.adapter_layers())
    assert isinstance(model.method_of("b"), Method)
