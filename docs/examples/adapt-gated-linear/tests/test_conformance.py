"""GatedLoraLinear passes adapt's plugin conformance kit."""

from __future__ import annotations

import pytest
import torch
from adapt_gated_linear import GatedLinear, GatedLoraLinear

from adapt.core.testing import ConformanceReport, check_layer
from adapt.lora import LoraConfig

#: Checks every conforming layer must pass (check_layer runs a few more).
REQUIRED = [
    "the registry picks the layer class for the base module",
    "a new adapter starts as the identity",
    "only the adapter's tensors are trainable, and they get gradients",
    "state-dict names follow the checkpoint convention",
    "delta_weight has the base weight's shape",
    "merged output equals unmerged, merge→unmerge restores the weight",
    "forward with several adapters (and their merge)",
    "disable_adapter() gives the base output",
    "a mixed batch routes each sample to its adapter",
    "save_pretrained → from_pretrained gives the same output",
    "delete_adapter removes the adapter's tensors",
]


def make_base() -> GatedLinear:
    torch.manual_seed(0)  # the same weights on every call, as check_layer requires
    return GatedLinear(12, 9)


def test_conformance() -> None:
    report = check_layer(GatedLoraLinear, make_base, LoraConfig(r=4))
    print(report)  # shown with `pytest -s`
    assert isinstance(report, ConformanceReport)
    assert report.ok, str(report)
    assert report.layer == "adapt_gated_linear.layer.GatedLoraLinear"
    assert report.failed == []
    assert report.skipped == []
    missing = [name for name in REQUIRED if name not in report.passed]
    assert not missing, f"checks not run: {missing}\n{report}"


def test_conformance_rslora() -> None:
    check_layer(GatedLoraLinear, make_base, LoraConfig(r=2, lora_alpha=16, use_rslora=True))


def test_conformance_without_bias_in_float64() -> None:
    def make() -> GatedLinear:
        torch.manual_seed(0)
        return GatedLinear(7, 5, bias=False, dtype=torch.float64)

    x = torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_layer(GatedLoraLinear, make, LoraConfig(r=3), make_input=lambda: x, atol=1e-10)


def test_a_layer_that_forgets_the_gate_fails_the_merge_checks() -> None:
    """The kit catches an adapter whose output is not what merging ΔW into the weight gives."""

    class Ungated(GatedLoraLinear):
        def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
            a, b = self.lora_A[adapter_name], self.lora_B[adapter_name]
            return b(a(x)) * self.scaling[adapter_name]  # no sigmoid(gate)

    report = check_layer(Ungated, make_base, LoraConfig(r=4), raise_on_failure=False)
    assert not report.ok
    failed = [name for name, _ in report.failed]
    assert "merged output equals unmerged, merge→unmerge restores the weight" in failed
    assert "a new adapter starts as the identity" in report.passed
    with pytest.raises(AssertionError, match="FAIL  merged output equals unmerged"):
        check_layer(Ungated, make_base, LoraConfig(r=4))
