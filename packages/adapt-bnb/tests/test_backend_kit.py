"""adapt's bitsandbytes backends pass the backend kit (``check_backend``), their declared
``max_rel_error`` holds on measured weights, and every method's layer passes the layer kit
(``check_layer``) on 8-bit and 4-bit bases, with the kit's bounded error for lossy backends."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from bnb_testutils import KINDS, MAIN_KINDS, quantise
from torch import nn

from adapt.adalora import AdaLoraConfig, SVDLinear
from adapt.core.backends import declared_error, resolve_backend
from adapt.core.testing import check_backend, check_layer, tiny_llama
from adapt.lora import LoraConfig, LoraLinear
from adapt.vera import VeraConfig, VeraLinear


def _maker(kind: str, n_in: int = 64, n_out: int = 32) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return quantise(nn.Linear(n_in, n_out), kind)

    return make


@pytest.mark.parametrize("kind", list(KINDS))
def test_bitsandbytes_backends_pass_the_backend_kit(kind: str) -> None:
    make = _maker(kind)
    backend = resolve_backend(make())
    assert backend is not None
    report = check_backend(backend, make)
    assert report.ok and len(report.passed) == 8, str(report)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_declared_error_holds_on_real_weights(kind: str) -> None:
    """Every linear weight of a tiny Llama, written back through the backend: the worst
    relative error stays below the declared bound (and is not zero: the storage is lossy)."""
    worst = 0.0
    for module in tiny_llama().modules():
        if isinstance(module, nn.Linear) and module.in_features % 64 == 0:
            layer = quantise(module, kind)
            backend = resolve_backend(layer)
            assert backend is not None
            wanted = backend.get_weight(layer).float() * 1.01  # a merge-like change
            report = backend.set_weight(layer, wanted)
            stored = backend.get_weight(layer).float()
            error = float((stored - wanted).norm() / wanted.norm())
            assert report.rel_error >= error * 0.999
            worst = max(worst, error)
            bound = declared_error(backend)
    assert bound is not None and 0 < worst <= bound, (worst, bound)


CONFIGS = {
    "lora": (LoraLinear, lambda: LoraConfig(r=4)),
    "dora": (LoraLinear, lambda: LoraConfig(r=4, use_dora=True)),
    "vera": (VeraLinear, lambda: VeraConfig(r=8)),
    "adalora": (SVDLinear, lambda: AdaLoraConfig(init_r=4, target_r=2, total_step=10)),
}


@pytest.mark.parametrize("kind", MAIN_KINDS)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_passes_the_layer_kit_on_quantised_bases(kind: str, method: str) -> None:
    layer_cls, config = CONFIGS[method]

    def make_input() -> torch.Tensor:
        return torch.randn(4, 64, generator=torch.Generator().manual_seed(0))

    report = check_layer(layer_cls, _maker(kind), config(), make_input=make_input)
    assert report.ok and not report.skipped, str(report)
