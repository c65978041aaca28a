"""Giving an object's ``forward`` another function's signature (tier 0: no adapt imports).

transformers' ``Trainer`` keeps only the batch columns the model's ``forward`` names; a bare
``(*args, **kwargs)`` would make it drop ``input_ids``. So the adapted model's ``forward`` is
rebuilt per instance on a function carrying the wrapped model's ``__signature__`` (plus
``adapter_names``); copies rebind to the copy.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any


def expose_forward_signature(obj: Any, wrapped_forward: Callable[..., Any], impl: Any) -> None:
    """Bind a copy of ``impl`` as ``obj.forward``, with ``wrapped_forward``'s parameters and a
    keyword-only ``adapter_names=None`` (before any ``**kwargs``)."""
    try:
        sig = inspect.signature(wrapped_forward)
    except (TypeError, ValueError):
        return
    kind = inspect.Parameter
    params = [kind("self", kind.POSITIONAL_OR_KEYWORD)]
    var_kw = None
    for p in sig.parameters.values():
        if p.kind is kind.VAR_KEYWORD:
            var_kw = p
        elif p.name not in ("self", "adapter_names"):
            params.append(p)
    params.append(kind("adapter_names", kind.KEYWORD_ONLY, default=None))
    if var_kw is not None:
        params.append(var_kw)
    try:
        new_sig = sig.replace(parameters=params)
    except ValueError:
        return
    func = types.FunctionType(
        impl.__code__, impl.__globals__, "forward", impl.__defaults__, impl.__closure__
    )
    func.__kwdefaults__ = impl.__kwdefaults__
    func.__qualname__ = impl.__qualname__
    func.__doc__ = impl.__doc__
    func.__signature__ = new_sig  # type: ignore[attr-defined]
    object.__setattr__(obj, "forward", types.MethodType(func, obj))


def required_inputs(module: Any) -> list[str]:
    """The positional inputs ``module``'s forward requires (``nn.Bilinear``: ``input1``,
    ``input2``); empty when its signature cannot be read."""
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return []
    kind = inspect.Parameter
    names = [
        p.name
        for p in sig.parameters.values()
        if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return names[1:]  # drop self
