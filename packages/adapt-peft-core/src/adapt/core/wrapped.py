"""Guards installed on the model that an :class:`~adapt.core.AdaptedModel` wraps.

adapt injects its layers *into* the user's model, so the inner transformers model stays
reachable (``st[0].auto_model``, a variable the user kept). Its own ``save_pretrained`` would
then write adapter-layer keys (``...q_proj.base_layer.weight``, ``...lora_A.default.weight``)
that transformers cannot load back: the adapted layers would reload re-initialised, with only
a log line. That call is refused while adapter layers are inside; once they are gone
(``merge_and_unload``, ``unload``) it works as before.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from .errors import AdapterStateError
from .layer import AdapterLayer

_GUARD = "save_pretrained"


def _guarded_save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    layers = [p for p, m in self.named_modules() if isinstance(m, AdapterLayer)]
    if layers:
        raise AdapterStateError(
            f"this {type(self).__name__} has adapt adapter layers inside ({len(layers)}, e.g. "
            f"{layers[0]!r}); its own save_pretrained would write keys transformers cannot load "
            "back, and those layers would reload re-initialised. Save the adapter with the "
            "AdaptedModel that adapt() returned: adapted.save_pretrained(dir); for a "
            "SentenceTransformer use adapt.core.integrations.sentence_transformers."
            "adapt_sentence_transformer(st, config), after which st.save(dir) writes the "
            "adapter; or merge first: adapted.merge_and_unload().save_pretrained(dir)"
        )
    original = getattr(type(self), _GUARD)
    return original(self, *args, **kwargs)


def _guarded(module: nn.Module) -> bool:
    """Whether ``module``'s ``save_pretrained`` is adapt's guard (bound to this instance)."""
    return getattr(getattr(module, _GUARD, None), "__func__", None) is _guarded_save_pretrained


def guard_direct_save(model: nn.Module) -> None:
    """Refuse ``save_pretrained`` of ``model`` and of every module inside it that has one (a
    ``SentenceTransformer`` and its transformers model) while adapter layers are inside."""
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            continue
        if callable(getattr(type(module), _GUARD, None)) and not _guarded(module):
            # a bound method: deepcopy rebinds it to the copy
            bound = types.MethodType(_guarded_save_pretrained, module)
            object.__setattr__(module, _GUARD, bound)


def remove_guard(model: nn.Module) -> None:
    for module in model.modules():
        if _guarded(module):
            object.__delattr__(module, _GUARD)  # the instance's guard; the class's method stays
