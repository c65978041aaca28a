"""The adapter-layer base class every method's layers derive from.

An :class:`AdapterLayer` wraps one ``base_layer`` and holds any number of named adapters. A
method implements three things:

* :meth:`AdapterLayer.update_layer` creates and initialises an adapter's tensors;
* :meth:`AdapterLayer.adapter_output` returns that adapter's contribution to the output;
* :meth:`AdapterLayer.delta_weight` returns the dense ΔW in the weight backend's canonical layout.

Everything else lives here, once: the forward (base output plus the active contributions),
disabling, mixed-batch routing (``adapter_names``), and merging through the weight backend
(``W ← W + ΔW``), unmerging, and deleting adapters.

Per-adapter tensors live in containers named by :attr:`AdapterLayer.adapter_layer_names`
(``nn.ModuleDict`` or ``nn.ParameterDict`` keyed by adapter name). That one declaration says
both which parameters train and what goes into the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import fastpath
from . import merge as merge_math
from .backends import WeightBackend, require_backend
from .deprecation import moved_names
from .errors import AdapterStateError, warn_user
from .kernels import add_scaled_product, factor_grad, matmul_factor, transposed_factor_is_faster
from .merge import MergeReport, add_deltas, unsafe_merge_error
from .routing import current_adapter_names, sample_groups
from .typenames import describe

__all__ = [
    "AdapterLayer",
    "adapter_dtype_device",
    "add_scaled_product",
    "factor_grad",
    "matmul_factor",
    "transposed_factor_is_faster",
]


class AdapterLayer(nn.Module):
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

    def __init__(self, base_layer: nn.Module, backend: WeightBackend | None = None) -> None:
        super().__init__()
        if backend is None:
            backend = require_backend(base_layer)
        self.base_layer = base_layer
        self.backend: WeightBackend = backend
        self.in_features, self.out_features = backend.shape(base_layer)
        #: Whether :meth:`add_adapter_output` may fuse (round differently from the definition's
        #: order). Off on quantised bases: their kernels round activations coarsely (bf16 on the
        #: CPU), so a float32 round-off difference there could change an output visibly, and
        #: outputs stay bit-identical to PEFT's.
        self.fuse_adapter_output = not backend.lossy
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._references: dict[str, Any] = {}

    def use_shared(self, name: str, obj: Any) -> None:
        """Keep a plain reference to ``obj`` under ``name``: state the model owns once and
        many layers read (VeRA's basis, registered on the model), not a submodule of this
        layer, so it is neither saved nor moved through it."""
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

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """The contribution of ``adapter_name`` to the output for input ``x``."""
        raise NotImplementedError

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

    def _contribution(self, x: torch.Tensor, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.adapter_output(x, name).to(like.dtype)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` plus adapter ``name``'s contribution for input ``x`` (out of place).

        The default adds :meth:`adapter_output`. Methods override it to fuse the last product,
        the scale and the addition into one kernel (:func:`add_scaled_product`); the result must
        equal ``result + adapter_output(x, name)`` up to float round-off.
        """
        return result + self._contribution(x, name, result)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch_names = kwargs.pop("adapter_names", None)
        if batch_names is None:
            batch_names = current_adapter_names()
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)  # type: ignore[no-any-return]
        if batch_names is not None:
            return self._mixed_batch_forward(x, batch_names, *args, **kwargs)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if pending and not args and not kwargs:
            if self._merged_forward_pays(x):
                return self._merged_weight_forward(x, pending)
            if len(pending) == 1 and self.plain_linear_base(x):
                fused = self.fused_forward(x, pending[0])
                if fused is not None:
                    return fused
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        for name in pending:
            result = self.add_adapter_output(result, x, name)
        return result

    def plain_linear_base(self, x: torch.Tensor) -> bool:
        """Whether the base is a plain ``nn.Linear`` (no hooks, dense weight in ``x``'s dtype,
        frozen): its forward is exactly ``F.linear(x, weight, bias)``, so a method may compute
        base and adapter together (:meth:`fused_forward`)."""
        return self.fuse_adapter_output and fastpath.plain_linear(self.base_layer, x)

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

    def _mixed_batch_forward(
        self, x: torch.Tensor, batch_names: Sequence[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if self.merged:
            raise AdapterStateError(
                "a mixed-batch forward (adapter_names=...) needs unmerged adapters; call "
                "unmerge_adapter() first"
            )
        if len(batch_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(batch_names)} entries but the batch has {x.shape[0]} "
                "samples; give one adapter name (or '__base__') per sample"
            )
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        for name, index in sample_groups(batch_names, self.adapter_names, x.device):
            contribution = self._contribution(x.index_select(0, index), name, result)
            result = result.index_add(0, index, contribution)
        return result

    # -- merging ----------------------------------------------------------------------------------
    def _check_names(self, names: Iterable[str]) -> list[str]:
        out = []
        for name in names:
            if name not in self.adapter_names:
                raise AdapterStateError(
                    f"{describe(self)} has no adapter {name!r}; it has {self.adapter_names}"
                )
            out.append(name)
        return out

    def merged_weight(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """W + Σ ΔW for ``adapter_names``, without writing it (used by safe merges)."""
        weight = self.backend.get_weight(self.base_layer)
        # summed in (at least) float32: a float16/bfloat16 weight is rounded once, at the end
        return add_deltas(weight, (self.delta_weight(name) for name in adapter_names))

    def merge(
        self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False
    ) -> MergeReport | None:
        """Fold adapters into the base weight: ``W ← W + ΔW``.

        ``safe_merge`` computes the result first and refuses it (layer unchanged) when it holds
        NaN or Inf.
        """
        names = self._check_names(
            adapter_names if adapter_names is not None else self.active_adapters
        )
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return None
        new = self.merged_weight(names)
        if safe_merge and not merge_math.fits_dtype(
            new, self.backend.get_weight(self.base_layer).dtype
        ):
            raise unsafe_merge_error(
                names, describe(self.get_base_layer()), "the layer was left unchanged"
            )
        report = self.backend.set_weight(self.base_layer, new)
        self.merged_adapters.extend(names)
        return report

    def unmerge(self) -> MergeReport | None:
        """Take every merged adapter back out of the base weight: ``W ← W − ΔW``."""
        if not self.merged_adapters:
            return None
        if self.backend.lossy:
            warn_user(
                f"unmerging from {describe(self.get_base_layer())} is lossy: its weight is "
                "quantised, so the restored weight differs from the original by the "
                "requantisation error"
            )
        current = self.backend.get_weight(self.base_layer)
        deltas = (self.delta_weight(name) for name in reversed(self.merged_adapters))
        weight = add_deltas(current, deltas, sign=-1.0)
        report = self.backend.set_weight(self.base_layer, weight)
        self.merged_adapters = []
        return report

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
