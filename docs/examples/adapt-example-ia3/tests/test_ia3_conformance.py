"""IA3Linear passes adapt's plugin conformance kit: output side and feed-forward, on
``nn.Linear`` and on transformers ``Conv1D``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from adapt_example_ia3 import IA3Config, IA3Linear
from torch import nn

from adapt.core.testing import ConformanceReport, check_layer

#: Checks every conforming layer must pass (check_layer runs a few more).
REQUIRED = [
    "the registry picks the layer class for the base module",
    "a new adapter starts as the identity",
    "only the adapter's tensors are trainable, and they get gradients",
    "state-dict names follow the checkpoint convention",
    "the merged weight has the base weight's shape",
    "forward with one adapter changes the output",
    "merged output equals unmerged, merge→unmerge restores the weight",
    "forward with several adapters (and their merge)",
    "disable_adapter() gives the base output",
    "a mixed batch routes each sample to its adapter",
    "save_pretrained → from_pretrained gives the same output",
    "delete_adapter removes the adapter's tensors",
]

OUTPUT_SIDE = IA3Config()
FEED_FORWARD = IA3Config(feedforward_modules=["target"])  # the kit's module is "target"


def linear() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every call, as check_layer requires
    return nn.Linear(12, 9)


def conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf=9, nx=12)  # weight stored (in, out)
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)  # Conv1D starts with a zero bias
    module: nn.Module = layer
    return module


def assert_conforms(report: ConformanceReport) -> None:
    assert report.ok, str(report)
    assert report.layer == "adapt_example_ia3.layer.IA3Linear"
    assert report.failed == [] and report.skipped == [], str(report)
    missing = [name for name in REQUIRED if name not in report.passed]
    assert not missing, f"checks not run: {missing}\n{report}"


@pytest.mark.parametrize("config", [OUTPUT_SIDE, FEED_FORWARD], ids=["output", "feedforward"])
@pytest.mark.parametrize("make_base", [linear, conv1d], ids=["linear", "conv1d"])
def test_conformance(make_base: Callable[[], nn.Module], config: IA3Config) -> None:
    if make_base is conv1d:
        pytest.importorskip("transformers")
    report = check_layer(IA3Linear, make_base, config)
    print(report)  # shown with `pytest -s`
    assert_conforms(report)


def test_conformance_without_bias_in_float64() -> None:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(7, 5, bias=False, dtype=torch.float64)

    x = torch.randn(6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for config in (OUTPUT_SIDE, FEED_FORWARD):
        report = check_layer(IA3Linear, make, config, make_input=lambda: x, atol=1e-10)
        assert_conforms(report)


def test_a_layer_that_scales_the_wrong_side_fails_the_merge_checks() -> None:
    """The kit catches a layer whose forward is not what its merge gives."""

    class WrongSide(IA3Linear):
        def merge_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
            weight *= self.ia3_l[adapter_name].detach().to(weight.dtype).flatten()[0]
            return weight

    report = check_layer(WrongSide, linear, OUTPUT_SIDE, raise_on_failure=False)
    failed = [name for name, _ in report.failed]
    assert "merged output equals unmerged, merge→unmerge restores the weight" in failed
