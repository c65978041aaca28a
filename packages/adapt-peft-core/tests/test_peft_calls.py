"""PEFT's spellings of AdaptedModel calls work as a PEFT user writes them."""

from __future__ import annotations

import pytest
import torch
from core_testutils import mlp
from torch import nn

from adapt.core import AdaptedModel, adapt
from adapt.core.testing import ToyConfig


def _model() -> AdaptedModel:
    return adapt(
        mlp(),
        ToyConfig(target_modules=["up", "down"], init_identity=False, modules_to_save=["head"]),
    )


def test_disable_and_enable_adapter_layers(x: torch.Tensor) -> None:
    base_out = mlp()(x)
    model = _model()
    adapted = model(x)
    assert not torch.allclose(adapted, base_out)
    model.disable_adapter_layers()
    torch.testing.assert_close(model(x), base_out)
    with model.disable_adapter():  # the scoped form restores "disabled", not "enabled"
        pass
    torch.testing.assert_close(model(x), base_out)
    model.enable_adapter_layers()
    torch.testing.assert_close(model(x), adapted)


def test_disable_adapter_layers_after_merge_runs_the_base(x: torch.Tensor) -> None:
    base_out = mlp()(x)
    model = _model()
    model.merge_adapter()
    model.disable_adapter_layers()
    torch.testing.assert_close(model(x), base_out, rtol=1e-5, atol=1e-6)


def test_peft_type_and_trainable_counts() -> None:
    model = _model()
    assert model.peft_type == "TOY"
    assert model.get_nb_trainable_parameters() == model.trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert total == sum(p.numel() for p in model.parameters())


def test_merge_and_unload_takes_peft_positional_arguments(x: torch.Tensor) -> None:
    model = _model()
    expected = model(x)
    merged = model.merge_and_unload(False, True)  # progressbar, safe_merge as in PEFT
    assert not any(isinstance(m, nn.Module) and hasattr(m, "base_layer") for m in merged.modules())
    torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_with_adapter_names_positionally_says_what_to_do() -> None:
    model = _model()
    with pytest.raises(TypeError, match=r"first argument is progressbar.*adapter_names=\[") as err:
        model.merge_and_unload(["default"])  # type: ignore[arg-type]
    assert "default" in str(err.value)
    # nothing was merged or unloaded
    assert model.peft_config and not any(layer.merged for _, layer in model.adapter_layers())


def test_merge_and_unload_refuses_conflicting_progress_flags() -> None:
    model = _model()
    with pytest.raises(TypeError, match="both progressbar and progress_bar"):
        model.merge_and_unload(progressbar=True, progress_bar=False)
    assert model.peft_config
    # the same value twice is fine
    model.merge_and_unload(progressbar=False, progress_bar=False)
