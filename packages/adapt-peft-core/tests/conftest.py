"""adapt-peft-core test configuration.

Every test runs against an isolated registry holding only the toy method of
:mod:`adapt.core.testing`: installed method packages (adapt-lora, adapt-vera, …) are
invisible, so core is tested on its own and independently of what else is installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from core_testutils import MLP

from adapt.core import Method
from adapt.core.registry import Registry
from adapt.core.testing import isolated_registry, registered_toy

# Tiny models: one intra-op thread is as fast and keeps results machine-independent.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def registry() -> Iterator[Registry]:
    """The (isolated) process-wide registry, with the toy method registered."""
    with isolated_registry() as reg, registered_toy(reg):
        yield reg


@pytest.fixture
def toy_method(registry: Registry) -> Method:
    return registry.get_method("toy")


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
