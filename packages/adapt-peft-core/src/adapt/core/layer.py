"""The adapter-layer base class every method's layers derive from.

An :class:`AdapterLayer` wraps one ``base_layer`` and holds any number of named adapters. A
method implements:

* :meth:`AdapterLayer.update_layer`: create and initialise an adapter's tensors;
* :meth:`AdapterLayer.adapter_output`: that adapter's effect on the output. With
  ``composition = "sum"`` (the default) a contribution added to the base output; with
  ``"product"`` a factor the base output is multiplied by (IA³). Declaring a ``base_output``
  parameter gives it the base layer's output, computed once for all adapters; returning None
  means no output-side effect;
* optionally :meth:`AdapterLayer.adapter_input`: a change to the input before the base layer
  runs (IA³ on feed-forward layers scales the input);
* :meth:`AdapterLayer.delta_weight` (dense ΔW in the backend's canonical layout), or, when the
  merged weight depends on ``W``, the merge hooks of :class:`~adapt.core.layer_merging.LayerMerging`.

Everything else lives here, once: the forward, disabling, mixed-batch routing
(``adapter_names``), merging through the weight backend, unmerging, and deleting adapters.

Per-adapter tensors live in containers named by :attr:`AdapterLayer.adapter_layer_names`
(``nn.ModuleDict`` or ``nn.ParameterDict`` keyed by adapter name). That one declaration says
both which parameters train and what goes into the checkpoint.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath
from .amp import autocast_dtype
from .backends import WeightBackend, require_backend
from .deprecation import moved_names
from .errors import AdapterStateError, PluginError
from .fixed_mixing import ATTRIBUTE as FIXED_MIXING
from .fixed_mixing import fixed_mixed_forward
from .kernels import add_scaled_product, factor_grad, matmul_factor, transposed_factor_is_faster
from .layer_merging import LayerMerging
from .layer_mixed import mixed_batch_forward
from .routing import BatchRoute, Gathered, current_route
from .typenames import describe

__all__ = [
    "AdapterLayer",
    "adapter_dtype_device",
    "add_scaled_product",
    "factor_grad",
    "matmul_factor",
    "transposed_factor_is_faster",
]


class AdapterLayer(LayerMerging, nn.Module):
    """Base of every adapter layer: a ``base_layer`` plus named adapters."""

    #: The method this layer belongs to (``"lora"``).
    method: ClassVar[str] = ""
    #: Module types this layer wraps: classes or dotted names (``"transformers.pytorch_utils.Conv1D"``).
    base_types: ClassVar[tuple[type | str, ...]] = ()
    #: Tie-breaker against other layers serving the same type at the same MRO distance.
    priority: ClassVar[int] = 0
    #: Per-adapter containers of trainable tensors (saved in checkpoints).
    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    #: Per-adapter containers of other state (dropout modules, frozen buffers).
    other_param_names: ClassVar[tuple[str, ...]] = ()
    #: Set (on the class itself; subclasses do not inherit it) when ``base(x) + Σ adapter
    #: outputs`` equals ``x (W + Σ ΔW)ᵀ + bias`` for a plain ``nn.Linear`` base: no-grad
    #: forwards over many rows then run as one GEMM with the weight merged on the fly.
    delta_weight_forward: ClassVar[bool] = False
    #: How several active adapters combine: ``"sum"`` (``base + Σ adapter_output``) or
    #: ``"product"`` (``base · Π adapter_output``).
    composition: ClassVar[str] = "sum"
    #: Whether this layer serves base modules whose forward takes several inputs
    #: (``nn.Bilinear``): the hooks then get ``x`` as the tuple of every positional input, and
    #: mixed batches slice each of them. Without it such modules are refused at injection.
    takes_all_inputs: ClassVar[bool] = False
    # set per class by __init_subclass__: what the hooks a class defines need from the forward
    _output_sees_base: ClassVar[bool] = False
    _add_sees_base: ClassVar[bool] = False
    _transforms_input: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.composition not in ("sum", "product"):
            raise PluginError(
                f"{cls.__module__}.{cls.__qualname__}.composition is {cls.composition!r}; "
                "it must be 'sum' (adapter outputs are added) or 'product' (they multiply)"
            )
        cls._output_sees_base = "base_output" in inspect.signature(cls.adapter_output).parameters
        cls._add_sees_base = "base_output" in inspect.signature(cls.add_adapter_output).parameters
        cls._transforms_input = cls.adapter_input is not AdapterLayer.adapter_input

    def __init__(self, base_layer: nn.Module, backend: WeightBackend | None = None) -> None:
        super().__init__()
        if backend is None:
            backend = require_backend(base_layer)
        self.base_layer = base_layer
        self.backend: WeightBackend = backend
        self.in_features, self.out_features = backend.shape(base_layer)
        #: Whether :meth:`add_adapter_output` may fuse (round unlike the definition's order).
        #: Off on quantised bases: their kernels round activations coarsely (bf16 on the CPU),
        #: so float32 round-off could change outputs visibly; they stay bit-identical to PEFT's.
        self.fuse_adapter_output = not backend.lossy
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._references: dict[str, Any] = {}

    def use_shared(self, name: str, obj: Any) -> None:
        """Keep a plain reference to ``obj`` (state the model owns once and many layers read,
        e.g. VeRA's basis): not a submodule, so neither saved nor moved through this layer."""
        self._references[name] = obj

    def shared(self, name: str) -> Any:
        """What :meth:`use_shared` stored under ``name``, or None."""
        return self._references.get(name)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this class can wrap ``module`` (beyond its type); override to refuse cases."""
        return True

    # -- what a method implements ---------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Create adapter ``adapter_name``'s tensors from ``config`` and initialise them."""
        raise NotImplementedError

    def adapter_output(self, x: Any, adapter_name: str) -> torch.Tensor | None:
        """``adapter_name``'s effect on the output for input ``x``: a contribution to add
        (``composition = "sum"``) or a factor to multiply by (``"product"``); None for none.
        Declare a keyword parameter ``base_output`` to receive the base layer's output."""
        raise NotImplementedError

    def adapter_input(self, x: Any, adapter_name: str) -> Any:
        """The input the base layer sees with ``adapter_name`` active (default: ``x``
        unchanged, and core skips the call). Several active adapters apply in order."""
        return x

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ΔW of ``adapter_name`` in the backend's canonical layout."""
        raise NotImplementedError

    # -- bookkeeping --------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for key in getattr(self, attr):
                if key not in names:
                    names.append(key)
        return names

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that reads ``module.weight`` keeps working)."""
        weight = cast(torch.Tensor, self.get_base_layer().weight)
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias: torch.Tensor | None = getattr(self.get_base_layer(), "bias", None)
        return bias

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's trainable tensors by checkpoint suffix (adapter name removed).

        ``lora_A.default.weight`` is returned as ``lora_A.weight``; a ParameterDict entry
        ``lora_embedding_A.default`` as ``lora_embedding_A``.
        """
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Module):
                for pname, tensor in item.state_dict(keep_vars=True).items():
                    out[f"{attr}.{pname}"] = tensor
            else:
                out[attr] = item
        return out

    def set_adapter(self, adapter_names: str | Sequence[str], *, trainable: bool = True) -> None:
        """Make ``adapter_names`` the active adapters; only theirs are trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapters = [n for n in names if n in self.adapter_names]
        for name in self.adapter_names:
            train = trainable and name in self.active_adapters
            for tensor in self.adapter_tensors(name).values():
                if tensor.is_floating_point() and isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(train)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise AdapterStateError(
                f"adapter {adapter_name!r} is merged into {describe(self.get_base_layer())}; "
                "call unmerge_adapter() before deleting it"
            )
        for attr in (*self.adapter_layer_names, *self.other_param_names):
            container = getattr(self, attr, None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    # -- forward ----------------------------------------------------------------------------------
    def may_add_in_place(self, result: torch.Tensor) -> bool:
        """Whether an adapter may add its contribution into ``result`` in place: ``result`` is
        the fresh output of a plain ``nn.Linear`` base (whose backward does not need its
        output), not a view, and no forward hook could have kept a reference to it."""
        return self.fuse_adapter_output and fastpath.may_add_in_place(self.base_layer, result)

    def adapter_effect(
        self, x: Any, adapter_name: str, base_output: torch.Tensor
    ) -> torch.Tensor | None:
        """What core adds to the output (``composition = "sum"``) or multiplies it by
        (``"product"``) for ``adapter_name``, given the base layer's output for the same rows
        (``base_output``, never changed in place). Default: :meth:`adapter_output`, passed
        ``base_output`` when the class declares it. A method whose adapters on one layer
        compute in different ways (LoRA variants such as DoRA) overrides this to choose per
        adapter; mixed batches call it once per adapter with that adapter's rows."""
        if self._output_sees_base:
            out: torch.Tensor | None = self.adapter_output(x, adapter_name, base_output=base_output)  # type: ignore[call-arg]
            return out
        return self.adapter_output(x, adapter_name)

    def add_adapter_output(
        self, result: torch.Tensor, x: Any, name: str, *, base_output: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``result`` plus adapter ``name``'s contribution for input ``x`` (out of place).

        ``base_output`` is the base layer's output (``result`` before any adapter was added;
        core passes it when the override declares the parameter). The default adds
        :meth:`adapter_effect`. Methods override this to fuse the last product, the scale and
        the addition into one kernel (:func:`add_scaled_product`); the result must equal
        ``result + adapter_effect(x, name, base_output)`` up to float round-off.
        """
        effect = self.adapter_effect(x, name, result if base_output is None else base_output)
        return result if effect is None else result + effect.to(result.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch_names = kwargs.pop("adapter_names", None)
        route = current_route() if batch_names is None else BatchRoute(batch_names)
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)  # type: ignore[no-any-return]
        mixing = getattr(self, FIXED_MIXING, None)
        if mixing is not None and mixing.on:
            return fixed_mixed_forward(self, x, mixing, args, kwargs)
        if route is not None:
            return self._mixed_batch_forward(x, route, *args, **kwargs)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if pending and not args and not kwargs:
            if self._merged_forward_pays(x):
                return self._merged_weight_forward(x, pending)
            if len(pending) == 1 and self.plain_linear_base(x):
                fused = self.fused_forward(x, pending[0])
                if fused is not None:
                    return fused
        inputs = (x, *args) if self.takes_all_inputs else x
        seen = inputs
        if self._transforms_input:
            for name in pending:
                seen = self.adapter_input(seen, name)
        result: torch.Tensor = self._base_forward(seen, args, kwargs)
        if self.composition == "product":
            factor = None
            for name in pending:
                f = self.adapter_effect(inputs, name, result)
                if f is not None:
                    factor = f if factor is None else factor * f
            return result if factor is None else (result * factor).to(result.dtype)
        if len(pending) > 1 and self._add_sees_base:
            base_out = result  # each adapter sees the base output, not the sum so far
            for name in pending:
                result = self.add_adapter_output(result, inputs, name, base_output=base_out)
            return result
        for name in pending:
            result = self.add_adapter_output(result, inputs, name)
        return result

    def _base_forward(self, seen: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The base layer on the (possibly adapted) inputs: ``seen`` is every positional input
        for a :attr:`takes_all_inputs` class, else the first one (``args`` are the rest)."""
        if self.takes_all_inputs:
            return self.base_layer(*seen, **kwargs)
        return self.base_layer(seen, *args, **kwargs)

    def plain_linear_base(self, x: torch.Tensor) -> bool:
        """Whether the base is a plain, frozen ``nn.Linear`` without hooks, its weight in ``x``'s
        dtype or autocast on (casting both): ``base(x)`` is ``F.linear(x, weight, bias)``, so a
        method may compute base and adapter together (:meth:`fused_forward`)."""
        amp = autocast_dtype(x.device.type) is not None
        return self.fuse_adapter_output and fastpath.plain_linear(self.base_layer, x, amp)

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """``base(x)`` plus the adapter's output computed together, for a plain-``nn.Linear``
        base (:meth:`plain_linear_base`), or None to take the general path. Must equal the
        general path up to float round-off, gradients included."""
        return None

    def _merged_forward_pays(self, x: torch.Tensor) -> bool:
        """Whether this no-grad forward should run as ``x (W + ΔW)ᵀ`` (see
        :attr:`delta_weight_forward` and :func:`adapt.core.fastpath.merged_forward_pays`)."""
        if torch.is_grad_enabled() or not vars(type(self)).get("delta_weight_forward", False):
            return False
        return fastpath.merged_forward_pays(
            self, self.base_layer, x, self.in_features, self.out_features
        )

    def _merged_weight_forward(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        base = self.base_layer
        assert isinstance(base, nn.Linear)
        weight = base.weight
        for name in names:
            weight = self.add_delta_weight(weight, name)
        return F.linear(x, weight, base.bias)

    def add_delta_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """``weight + ΔW`` (canonical layout, ``weight``'s dtype), out of place. Methods with a
        factored ΔW override it with one ``addmm``."""
        return weight + self.delta_weight(adapter_name).to(weight.dtype)

    def gathered_adapter_effect(
        self, x: Any, gathered: Gathered, base_output: torch.Tensor
    ) -> torch.Tensor | None:
        """A mixed batch's adapter contributions in one go (``composition = "sum"``): for the
        selected rows ``x`` (``gathered.select`` of the layer's input), what to add to each —
        row ``i`` gets adapter ``gathered.adapters[gathered.slots[i]]``'s effect — or None to
        take the per-adapter path (one :meth:`adapter_effect` per adapter). ``base_output`` is
        the base layer's output for the whole batch (``gathered.select`` gives the rows'; never
        change it). For many adapters at single-adapter cost (stacked factors, one gathered
        product); equal to the per-adapter path up to float round-off. Default: None."""
        return None

    def add_gathered_adapter_effect(
        self, result: torch.Tensor, x: Any, gathered: Gathered
    ) -> torch.Tensor | None:
        """That sum added into ``result`` in place (no effect-sized buffer) and returned, or
        None for :meth:`gathered_adapter_effect`; called for whole batches (``gathered.rows``
        None) where :meth:`may_add_in_place` allows. Default: None."""
        return None

    def refresh_gathered(self, adapters: tuple[str, ...]) -> None:
        """Called outside a compiled graph before each mixed forward of a model prepared with
        ``prepare_mixed_batches_for_compile``: bring whatever :meth:`gathered_adapter_effect`
        caches for ``adapters`` up to date (it may then read it without checks when compiling).
        Default: nothing."""

    def _mixed_batch_forward(
        self, x: torch.Tensor, route: BatchRoute, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        return mixed_batch_forward(self, x, route, args, kwargs)

    def iter_adapter_parameters(self, adapter_name: str) -> Iterator[torch.Tensor]:
        yield from self.adapter_tensors(adapter_name).values()

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, adapters={self.adapter_names}, active={self.active_adapters}"
        )


def adapter_dtype_device(layer: AdapterLayer) -> tuple[torch.dtype, torch.device]:
    """Where and in what dtype a new adapter's tensors live: on the base layer's device, in
    float32 unless the base computes in float64 (half-precision bases get float32 adapters,
    as PEFT's ``autocast_adapter_dtype`` does)."""
    base = layer.get_base_layer()
    device = torch.device("cpu")
    for tensor in (*base.parameters(recurse=False), *base.buffers(recurse=False)):
        device = tensor.device
        break
    dtype = layer.backend.compute_dtype(base)
    if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point:
        dtype = torch.float32
    return dtype, device


__getattr__ = moved_names(
    __name__,
    {
        "fits_dtype": "adapt.core.merge:fits_dtype",
        "no_backend_message": "adapt.core.backends:no_backend_message",
    },
)
