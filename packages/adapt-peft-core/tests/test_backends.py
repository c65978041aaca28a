"""The dense weight backend: canonical layout for reading and writing base weights."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapt.core import DenseBackend, MergeReport, TargetError, WeightBackend
from adapt.core.testing import ToyLayer

dense = DenseBackend()


def test_dense_backend_satisfies_the_protocol() -> None:
    assert isinstance(dense, WeightBackend)
    assert dense.lossy is False


def test_linear_layout() -> None:
    lin = nn.Linear(3, 5)
    assert dense.shape(lin) == (3, 5)
    w = dense.get_weight(lin)
    assert w.shape == (5, 3)
    assert w.data_ptr() == lin.weight.data_ptr()  # a view, no copy
    new = torch.randn(5, 3)
    assert dense.set_weight(lin, new) == MergeReport()
    assert torch.equal(lin.weight, new)


def test_transformers_conv1d_is_transposed() -> None:
    conv = Conv1D(5, 3)  # nf=out, nx=in: weight stored (in, out)
    torch.nn.init.normal_(conv.weight)
    assert tuple(conv.weight.shape) == (3, 5)
    assert dense.shape(conv) == (3, 5)
    w = dense.get_weight(conv)
    assert w.shape == (5, 3)  # canonical (out, in)
    x = torch.randn(2, 3)
    torch.testing.assert_close(F.linear(x, w, conv.bias), conv(x))

    new = torch.randn(5, 3)
    dense.set_weight(conv, new)
    assert torch.equal(conv.weight, new.T)
    torch.testing.assert_close(conv(x), F.linear(x, new, conv.bias))


def test_conv2d_layout() -> None:
    conv = nn.Conv2d(4, 6, (3, 2), groups=2)
    assert dense.shape(conv) == (4, 6)
    assert dense.get_weight(conv).shape == (6, 2, 3, 2)
    new = torch.randn(6, 2, 3, 2)
    dense.set_weight(conv, new)
    assert torch.equal(conv.weight, new)


def test_embedding_layout() -> None:
    emb = nn.Embedding(10, 4)
    assert dense.shape(emb) == (10, 4)
    assert dense.get_weight(emb).shape == (10, 4)
    new = torch.randn(10, 4)
    dense.set_weight(emb, new)
    assert torch.equal(emb.weight, new)


def test_set_weight_keeps_the_storage_dtype() -> None:
    lin = nn.Linear(2, 2).to(torch.float16)
    dense.set_weight(lin, torch.ones(2, 2, dtype=torch.float64))
    assert lin.weight.dtype == torch.float16
    assert torch.equal(lin.weight, torch.ones(2, 2, dtype=torch.float16))


@pytest.mark.parametrize(
    ("module", "bad", "stored"),
    [
        (nn.Linear(3, 5), (3, 5), (5, 3)),
        (Conv1D(5, 3), (3, 5), (3, 5)),  # given (in, out) → transposed to (5, 3) ≠ (3, 5)
        (nn.Embedding(10, 4), (4, 10), (10, 4)),
    ],
)
def test_set_weight_wrong_shape_says_both_shapes(
    module: nn.Module, bad: tuple[int, int], stored: tuple[int, int]
) -> None:
    before = module.weight.detach().clone()
    with pytest.raises(TargetError) as info:
        dense.set_weight(module, torch.zeros(bad))
    msg = str(info.value)
    assert type(module).__name__ in msg
    assert str(stored) in msg
    assert torch.equal(module.weight, before)


def test_compute_dtype() -> None:
    assert dense.compute_dtype(nn.Linear(2, 2).to(torch.bfloat16)) == torch.bfloat16
    assert dense.compute_dtype(nn.Linear(2, 2).double()) == torch.float64
    emb = nn.Embedding(3, 2)
    emb.weight = nn.Parameter(torch.zeros(3, 2, dtype=torch.int8), requires_grad=False)
    assert dense.compute_dtype(emb) == torch.float32


def test_layer_reads_sizes_through_the_backend() -> None:
    layer = ToyLayer(nn.Linear(3, 7))
    assert (layer.in_features, layer.out_features) == (3, 7)
    # the layer exposes the base weight and bias so code reading module.weight keeps working
    assert layer.weight is layer.base_layer.weight
    assert layer.bias is layer.base_layer.bias


# -- supports(), install hints as data ---------------------------------------------------------
class _Stamped(torch.Tensor):
    """A tensor subclass standing in for a quantisation library's weight type."""


def test_a_backend_claims_modules_case_by_case_with_supports() -> None:
    from typing import ClassVar

    from adapt.core import get_registry
    from adapt.core.backends import resolve_backend

    class StampedBackend(DenseBackend):
        base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
        priority = 1

        def supports(self, module: nn.Module) -> bool:
            return getattr(module, "stamped", False)

    registry = get_registry()
    registry.register_backend(StampedBackend(), name="stamped")
    try:
        plain, stamped = nn.Linear(3, 2), nn.Linear(3, 2)
        stamped.stamped = True  # type: ignore[assignment]
        assert isinstance(resolve_backend(stamped), StampedBackend)
        assert type(resolve_backend(plain)) is DenseBackend  # left to the dense backend
    finally:
        registry.unregister("adapt.backends", "stamped")


def test_installed_distributions_extend_the_install_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata
    import types

    from adapt.core import backends as backends_mod

    hint = importlib.metadata.EntryPoint(
        name=f"{__name__}._Stamped", value="adapt-stamped", group=backends_mod.GROUP_INSTALL_HINTS
    )

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return [hint] if group == backends_mod.GROUP_INSTALL_HINTS else []

    monkeypatch.setattr(backends_mod, "metadata", types.SimpleNamespace(entry_points=entry_points))
    backends_mod._declared_hints.cache_clear()
    try:
        module = nn.Linear(3, 2)
        module.weight = nn.Parameter(torch.randn(2, 3).as_subclass(_Stamped))
        assert backends_mod.install_hints()[f"{__name__}._Stamped"] == "adapt-stamped"
        assert backends_mod.install_hints()["bitsandbytes.nn.modules.Linear4bit"] == "adapt-bnb"
        with pytest.raises(TargetError, match="install it with `pip install adapt-stamped`"):
            backends_mod.require_backend(module)
    finally:
        backends_mod._declared_hints.cache_clear()


# -- the backend kit ---------------------------------------------------------------------------
def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return build()

    return make


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Linear(6, 4),
        lambda: Conv1D(4, 6),
        lambda: nn.Conv2d(3, 5, 3),
        lambda: nn.Embedding(10, 4),
        lambda: nn.Linear(6, 4).to(torch.bfloat16),
    ],
    ids=["linear", "conv1d", "conv2d", "embedding", "linear-bf16"],
)
def test_the_dense_backend_passes_the_backend_kit(build: Callable[[], nn.Module]) -> None:
    from adapt.core.testing import check_backend

    report = check_backend(DenseBackend(), _seeded(build))
    assert report.ok and len(report.passed) == 7, str(report)  # not lossy: no declaration check


def test_the_backend_kit_catches_a_backend_that_loses_precision_silently() -> None:
    from typing import ClassVar

    from adapt.core import get_registry
    from adapt.core.testing import check_backend

    class Rounding(DenseBackend):
        """Stores weights rounded to 1/8 but says it is exact."""

        base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
        priority = 5

        def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
            return super().set_weight(base, (weight * 8).round() / 8)

    get_registry().register_backend(Rounding(), name="rounding")
    try:
        report = check_backend(Rounding(), _seeded(lambda: nn.Linear(6, 4)), raise_on_failure=False)
    finally:
        get_registry().unregister("adapt.backends", "rounding")
    failed = dict(report.failed)
    assert "writing back the weight it read stays within max_rel_error" in failed
    assert "declares max_rel_error=0.0" in failed["a changed weight is stored within max_rel_error"]
