"""adapt's conformance kits on torchao-quantised layers: ``check_layer`` (LoRA's Linear layer,
whose merges are held to the backend's declared ``max_rel_error``) and ``check_backend`` (the
weight-backend protocol)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch import nn
from torchao_testutils import BACKENDS, CONFIGS, MAIN, linear

from adapt.core.testing import check_backend, check_layer
from adapt.lora import LoraConfig, LoraLinear

pytestmark = pytest.mark.filterwarnings("ignore:unmerging from .* is lossy:UserWarning")


def maker(kind: str, dtype: torch.dtype = torch.float32) -> Callable[[], nn.Linear]:
    """A fresh seeded 64 → 32 Linear, quantised (the same weights every call)."""
    return partial(linear, kind, dtype=dtype)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("kind", MAIN)
def test_lora_linear_passes_check_layer_on_a_quantised_linear(kind: str, dora: bool) -> None:
    report = check_layer(LoraLinear, maker(kind), LoraConfig(r=4, use_dora=dora))
    assert not report.failed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_the_backends_pass_check_backend(kind: str, dtype: torch.dtype) -> None:
    report = check_backend(BACKENDS[kind](), maker(kind, dtype))
    assert not report.failed
