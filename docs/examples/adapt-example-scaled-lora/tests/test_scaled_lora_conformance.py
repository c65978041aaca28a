"""adapt-lora's LoraLinear with the variant "scaled" passes adapt's conformance kit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapt.core.testing import check_layer
from adapt.lora import LoraConfig, LoraLinear

#: Checks every conforming layer must pass (check_layer runs a few more).
REQUIRED = [
    "the registry picks the layer class for the base module",
    "a new adapter starts as the identity",
    "only the adapter's tensors are trainable, and they get gradients",
    "state-dict names follow the checkpoint convention",
    "forward with one adapter changes the output",
    "merged output equals unmerged, merge→unmerge restores the weight",
    "forward with several adapters (and their merge)",
    "disable_adapter() gives the base output",
    "a mixed batch routes each sample to its adapter",
    "save_pretrained → from_pretrained gives the same output",
    "delete_adapter removes the adapter's tensors",
]


def make_linear() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every call, as check_layer requires
    return nn.Linear(12, 9)


@pytest.mark.parametrize("options", [{}, {"gate_init": 0.5}], ids=["default-gate", "gate-init-0.5"])
def test_conformance(options: dict[str, float]) -> None:
    config = LoraConfig(r=4, variant="scaled", variant_options=options)
    report = check_layer(LoraLinear, make_linear, config)
    print(report)  # shown with `pytest -s`
    assert report.ok, str(report)
    assert report.failed == [] and report.skipped == [], str(report)
    missing = [name for name in REQUIRED if name not in report.passed]
    assert not missing, f"checks not run: {missing}\n{report}"
