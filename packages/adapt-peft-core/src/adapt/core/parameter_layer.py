"""Adapters on parameters (``target_parameters``): fused MoE experts and other bare tensors.

A :class:`ParameterLayer` wraps the module that *owns* a targeted parameter (transformers v5's
``MixtralExperts`` holds ``gate_up_proj`` (E, 2·inter, hidden) and ``down_proj`` (E, hidden,
inter)); the module's forward — routing, top-k, routing weights — runs unchanged, with the
parameter read as ``W + ΔW`` (:mod:`adapt.core.param_forward`). Several targeted parameters of
one module nest, one layer per parameter, the first registered innermost: keys read
``...experts.base_layer.lora_A.weight`` (gate_up_proj) and ``...experts.lora_A.weight``
(down_proj), as PEFT writes them.

Merging, unmerging, disabling, deleting and saving are :class:`~adapt.core.layer.AdapterLayer`'s,
through a :class:`ParameterBackend` whose canonical layout is the parameter's own shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import nn

from .distributed import logical_shape
from .errors import AdapterStateError, TargetError
from .layer import AdapterLayer
from .merge import MergeReport
from .param_forward import Factors, LowRankMode, NeedsDense, swapped_parameter
from .routing import current_adapter_names
from .typenames import describe

logger = logging.getLogger("adapt")

__all__ = ["ParameterBackend", "ParameterLayer", "owner_of"]


def owner_of(module: nn.Module) -> nn.Module:
    """The module that really holds the parameters, under any adapter layers wrapping it."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


class ParameterBackend:
    """Reads and writes one named parameter of a module; canonical layout: its own shape."""

    base_types: ClassVar[tuple[type | str, ...]] = ()
    lossy: ClassVar[bool] = False
    max_rel_error: ClassVar[float] = 0.0

    def __init__(self, name: str) -> None:
        self.name = name

    def param(self, base: nn.Module) -> torch.Tensor:
        return cast(torch.Tensor, getattr(owner_of(base), self.name))

    def is_transposed(self, base: nn.Module) -> bool:
        """Whether a 3-D parameter stores its experts as (E, in, out) (gpt-oss)."""
        return len(logical_shape(self.param(base))) == 3 and bool(
            getattr(owner_of(base), "is_transposed", False)
        )

    def shape(self, base: nn.Module) -> tuple[int, int]:
        shape = logical_shape(self.param(base))
        if len(shape) == 2:
            return shape[1], shape[0]
        if self.is_transposed(base):
            return shape[1], shape[2]
        return shape[2], shape[1]

    def get_weight(self, base: nn.Module) -> torch.Tensor:
        return self.param(base)

    def set_weight(self, base: nn.Module, weight: torch.Tensor) -> MergeReport:
        target = self.param(base)
        if weight.shape != target.shape:
            raise TargetError(
                f"cannot write a tensor of shape {tuple(weight.shape)} into parameter "
                f"{self.name!r} of {describe(owner_of(base))}, which is {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(weight.to(target.dtype))
        return MergeReport()

    def compute_dtype(self, base: nn.Module) -> torch.dtype:
        dtype = self.param(base).dtype
        return dtype if dtype.is_floating_point else torch.float32


class ParameterLayer(AdapterLayer):
    """Base of a method's layer on one parameter of a module.

    A method implements :meth:`~AdapterLayer.update_layer` and :meth:`delta_factors` (the
    update as per-expert factors, ``ΔW[e] = s · B[e] A[e]``), or only
    :meth:`~AdapterLayer.delta_weight` (a dense update in the parameter's shape; the forward
    then always runs the dense way).
    """

    takes_all_inputs: ClassVar[bool] = True
    #: Run the forward the low-rank way when the module's use of the parameter allows it
    #: (set False on a layer to always run the dense way, PEFT's).
    low_rank_forward: bool = True

    def __init__(self, base_layer: nn.Module, parameter_name: str, **kwargs: Any) -> None:
        backend = ParameterBackend(parameter_name)
        super().__init__(base_layer, backend=backend, **kwargs)
        self.parameter_name = parameter_name
        shape = logical_shape(backend.param(base_layer))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        self.is_transposed = backend.is_transposed(base_layer)

    @property
    def parameter(self) -> torch.Tensor:
        """The adapted parameter itself (on the module that owns it)."""
        return cast(ParameterBackend, self.backend).param(self.base_layer)

    # -- what a method implements ----------------------------------------------------------------
    def delta_factors(self, adapter_name: str) -> Factors | None:
        """The adapter's update as ``Factors(a (E, r, in), b (E, out, r), scale)``, or None
        when it has no such form (the forward then runs the dense way)."""
        return None

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """ΔW in the parameter's shape, from :meth:`delta_factors`."""
        f = self.delta_factors(adapter_name)
        if f is None:
            raise NotImplementedError(
                f"{type(self).__name__} defines neither delta_weight nor delta_factors"
            )
        delta = torch.bmm(f.b, f.a) * f.scale  # (E, out, in)
        if self.is_transposed:
            delta = delta.transpose(-2, -1)
        return delta[0] if self.parameter.dim() == 2 else delta

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("adapter_names", None) is not None or current_adapter_names() is not None:
            raise AdapterStateError(
                f"mixed batches (adapter_names=...) cannot run through an adapter on parameter "
                f"{self.parameter_name!r} of {describe(owner_of(self))}: it changes that "
                "parameter for the whole batch. Run one batch per adapter (set_adapter), or "
                "leave target_parameters out of the adapters you mix"
            )
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not pending:
            return self.base_layer(*args, **kwargs)
        if self.low_rank_forward:
            factors = [self.delta_factors(n) for n in pending]
            if all(f is not None for f in factors):
                mode = LowRankMode(self.parameter, cast(list[Factors], factors), self.is_transposed)
                try:
                    with mode:
                        return self.base_layer(*args, **kwargs)
                except NeedsDense as exc:
                    if exc.mode is not mode:
                        raise
                    self.low_rank_forward = False
                    logger.info(
                        "%s: %s; running it with the dense update from now on",
                        describe(owner_of(self)),
                        exc,
                    )
        with swapped_parameter(
            owner_of(self), self.parameter_name, self.updated_parameter(pending)
        ):
            return self.base_layer(*args, **kwargs)

    def updated_parameter(self, names: Sequence[str]) -> torch.Tensor:
        """``W + Σ ΔW`` for ``names`` in the parameter's dtype, autograd intact (one batched
        multiply-add per adapter with factors)."""
        weight = self.parameter
        for name in names:
            f = self.delta_factors(name)
            if f is None:
                weight = weight + self.delta_weight(name).to(weight.dtype)
                continue
            a, b = f.a.to(weight.dtype), f.b.to(weight.dtype)
            if weight.dim() == 2:
                weight = torch.addmm(weight, b[0], a[0], alpha=f.scale)
            elif self.is_transposed:
                weight = torch.baddbmm(
                    weight, a.transpose(-2, -1), b.transpose(-2, -1), alpha=f.scale
                )
            else:
                weight = torch.baddbmm(weight, b, a, alpha=f.scale)
        return weight

    def extra_repr(self) -> str:
        return f"parameter={self.parameter_name!r}, " + super().extra_repr()
