"""``modules_to_save``: modules trained in full, one copy per adapter beside the original."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .routing import current_route


class ModulesToSave(nn.Module):
    """A module trained in full: one copy per adapter, the original kept for the base model."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, adapter_name: str) -> None:
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def get_base_layer(self) -> nn.Module:
        return self.original_module

    def _current(self) -> nn.Module:
        if (
            self.disabled
            or self.active_adapter is None
            or self.active_adapter not in self.modules_to_save
        ):
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def current(self) -> nn.Module:
        """The module a forward runs now: the active adapter's copy, or the original."""
        return self._current()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = current_route()
        if route is None or self.disabled:
            return self._current()(*args, **kwargs)
        x = args[0]
        result = self.original_module(*args, **kwargs)
        for name, index in route.groups(self.modules_to_save.keys(), x.device):
            sub = self.modules_to_save[name](x.index_select(0, index), *args[1:], **kwargs)
            result = result.index_copy(0, index, sub.to(result.dtype))
        return result

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._current(), name)
