"""What method hooks may see of the model: typing-only Protocols.

Tier 0: nothing of adapt is imported, so a method (tier 2) can name what it is handed without
depending on the model that hands it. At run time the object is the
:class:`~adapt.core.AdaptedModel` itself; these Protocols are the part of it a hook may use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

from torch import nn

T = TypeVar("T")


class AdapterSetView(Protocol):
    """A method's own state on one model, kept by the model's adapter set (not in ``__dict__``
    or ``_modules``)."""

    def state(self, key: str, factory: Callable[[], T]) -> T:
        """The per-model state stored under ``key`` (a method's own name, e.g.
        ``"adalora.allocators"``), created by ``factory()`` on first use."""
        ...

    def shared(self, name: str) -> nn.Module | None:
        """The shared module registered under ``name`` (saved under ``base_model.<name>``)."""
        ...

    def set_shared(self, name: str, module: nn.Module) -> None:
        """Register ``module`` once for the whole model (e.g. VeRA's basis): it moves with
        ``.to()`` and appears in the model's state dict as ``base_model.<name>.*``."""
        ...

    def drop_shared(self, name: str) -> None:
        """Remove the shared module ``name`` (no error when there is none)."""
        ...


class ModelView(Protocol):
    """What a method hook may see of the model it serves."""

    @property
    def peft_config(self) -> dict[str, Any]:
        """Adapter configs by adapter name."""
        ...

    @property
    def active_adapters(self) -> list[str]: ...

    @property
    def adapter_set(self) -> AdapterSetView: ...

    @property
    def model(self) -> nn.Module:
        """The wrapped model (adapter layers inside)."""
        ...

    @property
    def training(self) -> bool: ...

    def adapter_layers(self) -> Iterator[tuple[str, Any]]:
        """``(path, layer)`` for every adapter layer (paths relative to :attr:`model`)."""
        ...
