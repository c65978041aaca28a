"""``AdapterSet``: the owner of a model's adapter state.

One object per :class:`~adapt.core.AdaptedModel` holds what the model knows about its
adapters: their configs (``peft_config``), the active list, the method object of each
(resolved once), per-method state (AdaLoRA's allocators), shared modules (VeRA's basis,
registered on the model so they move and save with it), and the tensor shapes each adapter was
built with (what saves are checked against). Methods reach it through
:attr:`ModelView.adapter_set <adapt.core.protocols.ModelView>`; no one keeps adapter state in
a module's ``__dict__`` or ``_modules``.

The walks over the wrapped model live here too: every job above this tier finds layers,
``modules_to_save`` wrappers and replaces modules through the same three functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from torch import nn

from .config import AdapterConfig
from .errors import AdapterStateError
from .layer import AdapterLayer
from .method import Method
from .modules_to_save import ModulesToSave
from .registry import get_registry

T = TypeVar("T")


def adapter_layers(root: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(path, layer)`` for every adapter layer under ``root``, in ``named_modules`` order.

    Inside an adapter layer only its ``base_layer`` is searched: the rest are the adapters' own
    modules (two or more per adapter), which hold no adapter layer. With many adapters that is
    most of the model's modules, and a mixed-batch forward walks the layers once per call."""
    seen: set[int] = {id(root)}
    stack: list[tuple[str, nn.Module]] = [("", root)]
    while stack:
        prefix, module = stack.pop()
        if isinstance(module, AdapterLayer):
            yield prefix, module
            children: list[tuple[str, nn.Module]] = [("base_layer", module.base_layer)]
        else:
            children = list(module.named_children())
        found = []
        for name, child in children:
            if id(child) not in seen:
                seen.add(id(child))
                found.append((f"{prefix}.{name}" if prefix else name, child))
        stack.extend(reversed(found))


def save_wrappers(root: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """``(path, wrapper)`` for every ``modules_to_save`` wrapper under ``root``."""
    for path, module in root.named_modules():
        if isinstance(module, ModulesToSave):
            yield path, module


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where the module at ``path`` (relative to ``root``) is."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


class ModelHost(nn.Module):
    """The ``base_model`` of PEFT's key layout: holds the wrapped model as ``.model`` and the
    modules shared across layers (VeRA's ``vera_A``/``vera_B``) beside it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class AdapterSet:
    """Configs, active list, method objects, per-method state and shared modules of one model."""

    def __init__(self, host: ModelHost, *, is_trainable: bool = True) -> None:
        self.host = host
        self.configs: dict[str, AdapterConfig] = {}
        self.active: list[str] = []
        self.is_trainable = is_trainable
        #: per adapter: the logical shape of each tensor, by on-disk key (saves check it)
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self._methods: dict[str, tuple[str, Method[Any]]] = {}
        self._state: dict[str, Any] = {}
        #: the model as method hooks see it (the AdaptedModel, set by it)
        self.view: Any = None
        #: the model's own flags: TRL's fused-head handler (set by adapt's TRL integration),
        #: whether the plain-Trainer save warning was given, whether input grads are on
        self.fused_head_handler: Callable[[Any, Any], None] | None = None
        self.warned_plain_save = False
        self.input_grads_on = False

    @property
    def model(self) -> nn.Module:
        """The wrapped model."""
        model: nn.Module = self.host.model
        return model

    # -- the one check of an adapter name ---------------------------------------------------
    def require(self, name: str, fix: str = "") -> AdapterConfig:
        """``name``'s config; :class:`AdapterStateError` listing the known names otherwise."""
        if name not in self.configs:
            raise AdapterStateError(
                f"no adapter named {name!r}; this model has {sorted(self.configs)}" + fix
            )
        return self.configs[name]

    def method_of(self, name: str) -> Method[Any]:
        """The method object of adapter ``name`` (resolved once, then cached per adapter)."""
        peft_type = self.configs[name].peft_type
        hit = self._methods.get(name)
        if hit is not None and hit[0] == peft_type:
            return hit[1]
        method = get_registry().get_method(peft_type)
        self._methods[name] = (peft_type, method)
        return method

    def forget(self, name: str) -> None:
        """Drop everything kept for adapter ``name`` (after its method's ``on_delete``)."""
        self.configs.pop(name, None)
        self._methods.pop(name, None)
        self.shapes.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def postprocess(self, output: Any) -> Any:
        """``output`` after the ``postprocess_output`` of each active adapter's method that
        has one (AdaLoRA's regulariser)."""
        for name in list(self.active):
            if name not in self.configs:
                continue
            method = self.method_of(name)
            if type(method).postprocess_output is not Method.postprocess_output:
                output = method.postprocess_output(self.view, name, output)
        return output

    # -- walks ------------------------------------------------------------------------------
    def layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        return adapter_layers(self.model)

    def wrappers(self) -> Iterator[tuple[str, ModulesToSave]]:
        return save_wrappers(self.model)

    def replace(self, path: str, new: nn.Module) -> None:
        replace_module(self.model, path, new)

    # -- what methods keep (AdapterSetView) --------------------------------------------------
    def state(self, key: str, factory: Callable[[], T]) -> T:
        if key not in self._state:
            self._state[key] = factory()
        return cast(T, self._state[key])

    def shared(self, name: str) -> nn.Module | None:
        if name == "model":
            return None
        return dict(self.host.named_children()).get(name)

    def set_shared(self, name: str, module: nn.Module) -> None:
        if name == "model":
            raise ValueError(
                "'model' is the wrapped model's slot; name the shared module otherwise"
            )
        self.host.add_module(name, module)

    def drop_shared(self, name: str) -> None:
        if self.shared(name) is not None:
            delattr(self.host, name)
