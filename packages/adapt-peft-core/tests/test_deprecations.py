"""Plugin-facing names that moved in the core redesign keep working, with a DeprecationWarning
that names the new spelling."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

MOVED = [
    ("adapt.core.registry", "backend_hint", "adapt.core.backends", "backend_hint"),
    (
        "adapt.core.registry",
        "KNOWN_BACKEND_PACKAGES",
        "adapt.core.backends",
        "KNOWN_BACKEND_PACKAGES",
    ),
    ("adapt.core.layer", "fits_dtype", "adapt.core.merge", "fits_dtype"),
    ("adapt.core.layer", "no_backend_message", "adapt.core.backends", "no_backend_message"),
    ("adapt.core.model", "find_targets_hint", "adapt.core.targeting", "names_hint"),
]


@pytest.mark.parametrize(("old_module", "old", "new_module", "new"), MOVED)
def test_moved_name_warns_and_is_the_new_object(
    old_module: str, old: str, new_module: str, new: str
) -> None:
    module = importlib.import_module(old_module)
    with pytest.warns(
        DeprecationWarning, match=rf"{old_module}\.{old} is deprecated; use {new_module}\.{new}"
    ):
        value = getattr(module, old)
    assert value is getattr(importlib.import_module(new_module), new)


def test_moved_names_still_work() -> None:
    with pytest.warns(DeprecationWarning):
        from adapt.core.layer import fits_dtype
    assert fits_dtype(torch.ones(2), torch.float16)
    assert not fits_dtype(torch.full((2,), 1e6), torch.float16)
    with pytest.warns(DeprecationWarning):
        from adapt.core.model import find_targets_hint
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(2, 2))
    assert "q_proj" in find_targets_hint(model, ["q_prj"])
    with pytest.warns(DeprecationWarning):
        from adapt.core.registry import backend_hint
    assert backend_hint(nn.Linear(2, 2)) is None


def test_unknown_names_still_raise_attribute_error() -> None:
    import adapt.core.layer as layer

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = layer.nope  # type: ignore[attr-defined]
