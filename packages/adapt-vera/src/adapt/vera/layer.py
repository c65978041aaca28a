"""VeRA layers: ``out = base(x) + λ_b ⊙ (B_s (λ_d ⊙ (A_s · dropout(x))))``.

``A_s = A[:r, :in]`` and ``B_s = B[:out, :r]`` are zero-copy slices of the model's one
:class:`~adapt.core.SharedBasis`; a layer holds only λ_d (r) and λ_b (out) per adapter. The
base weight is reached only through the weight backend, so the same class serves
``nn.Linear``, transformers ``Conv1D`` and quantised linears.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapt.core import AdapterLayer, SharedBasis, adapter_dtype_device, add_scaled_product
from adapt.core.amp import autocast_dtype
from adapt.core.routing import Gathered
from adapt.core.typenames import CONV1D_TRANSFORMERS

from .config import VeraConfig
from .training import (
    VeraLinearFunction,
    VeraMergedFunction,
    VeraScaledBasisFunction,
    merged_training_pays,
)


class VeraLayer(AdapterLayer):
    """Base of VeRA layers: per-adapter λ vectors, rank and dropout; the basis is shared."""

    method: ClassVar[str] = "vera"
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("vera_lambda_b", "vera_lambda_d")
    other_param_names: ClassVar[tuple[str, ...]] = ("vera_dropout",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}

    @property
    def basis(self) -> SharedBasis:
        basis: SharedBasis | None = self.shared("basis")
        if basis is None:
            raise RuntimeError("this VeRA layer has no shared basis; it was not created by adapt()")
        return basis

    def update_layer(
        self, adapter_name: str, config: VeraConfig, basis: SharedBasis | None = None, **kwargs: Any
    ) -> None:
        if basis is None:
            raise TypeError("VeRA layers need the model's shared basis (basis=...)")
        basis.require(
            config.r, self.in_features, self.out_features, what=f"VeRA adapter {adapter_name!r}"
        )
        # a plain reference, not a submodule: the basis is registered once, on the model
        self.use_shared("basis", basis)
        dtype, device = adapter_dtype_device(self)
        self.r[adapter_name] = config.r
        dropout = config.vera_dropout
        self.vera_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        if config.init_weights:
            lambda_b = torch.zeros(self.out_features, dtype=dtype, device=device)
            lambda_d = torch.full((config.r,), float(config.d_initial), dtype=dtype, device=device)
        else:
            lambda_b = torch.ones(self.out_features, dtype=dtype, device=device)
            lambda_d = torch.randn(config.r, dtype=dtype, device=device)
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b)
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.r.pop(adapter_name, None)

    def sliced_basis(
        self, adapter_name: str, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.basis.slices(self.in_features, self.out_features, self.r[adapter_name])
        return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


class VeraLinear(VeraLayer):
    """VeRA on ``nn.Linear`` and transformers ``Conv1D`` (and subclasses, e.g. quantised)."""

    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear, CONV1D_TRANSFORMERS)
    delta_weight_forward: ClassVar[bool] = True

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        lambda_b = self.vera_lambda_b[adapter_name]
        lambda_d = self.vera_lambda_d[adapter_name]
        a, b = self.sliced_basis(adapter_name, lambda_d.dtype, lambda_d.device)
        x = self.vera_dropout[adapter_name](x.to(lambda_d.dtype))
        out: torch.Tensor = lambda_b * F.linear(lambda_d * F.linear(x, a), b)
        return out

    def fused_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor | None:
        """Training on a plain float32 ``nn.Linear`` base: the step through ``W + ΔW`` where it
        is cheaper, else the definition's products with the base's in one node
        (:mod:`adapt.vera.training`); None otherwise (inference, frozen λ, active dropout,
        autocast or half precision)."""
        lambda_b = self.vera_lambda_b[adapter_name]
        lambda_d = self.vera_lambda_d[adapter_name]
        dropout = self.vera_dropout[adapter_name]
        if (
            not torch.is_grad_enabled()
            or not (lambda_b.requires_grad or lambda_d.requires_grad)
            or (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0)
            or autocast_dtype(x.device.type) is not None
            or x.dtype not in (torch.float32, torch.float64)
            or lambda_d.dtype != x.dtype
        ):
            return None
        base = self.base_layer
        assert isinstance(base, nn.Linear)
        r = self.r[adapter_name]
        a, b = self.sliced_basis(adapter_name, x.dtype, x.device)
        if merged_training_pays(x.numel() // x.shape[-1], self.in_features, self.out_features):
            h = self.basis.project_input(x, self.in_features, r, x.dtype)
            out: torch.Tensor = VeraMergedFunction.apply(  # type: ignore[no-untyped-call]
                x, base.weight, base.bias, lambda_b, lambda_d, a, b, h
            )
            return out
        h, readers = self.basis.counted_projection(x, self.in_features, r, x.dtype)
        fused: torch.Tensor = VeraLinearFunction.apply(  # type: ignore[no-untyped-call]
            x, base.weight, base.bias, lambda_b, lambda_d, a, b, h, readers
        )
        return fused

    def add_adapter_output(
        self,
        result: torch.Tensor,
        x: torch.Tensor,
        name: str,
        *,
        base_output: torch.Tensor | None = None,  # not needed: the adapter does not read it
    ) -> torch.Tensor:
        # Without dropout, A_s x is shared with the other layers reading the same x (q/k/v).
        # Inference: λ_b ⊙ (B_s (λ_d ⊙ A_s x)) = (λ_b ⊙ B_s)(λ_d ⊙ A_s x), the λ_b scale on the
        # (out × r) slice instead of the activations, and B's product and the sum one addmm.
        lambda_b = self.vera_lambda_b[name]
        lambda_d = self.vera_lambda_d[name]
        dtype = lambda_d.dtype
        dropout = self.vera_dropout[name]
        if isinstance(dropout, nn.Identity) or not dropout.training:
            h = self.basis.project_input(x, self.in_features, self.r[name], dtype)
        else:
            a, _ = self.sliced_basis(name, dtype, lambda_d.device)
            h = F.linear(dropout(x.to(dtype)), a)
        b = self.basis.B[: self.out_features, : self.r[name]]
        b = b.to(device=lambda_b.device, dtype=dtype)
        if self.folds_lambdas(x, result, h, dtype):
            fused: torch.Tensor = VeraScaledBasisFunction.apply(  # type: ignore[no-untyped-call]
                result, h, lambda_b, lambda_d, b, self.may_add_in_place(result)
            )
            return fused
        if result.dtype != dtype or not self.fuse_adapter_output:
            # the definition's order: a half-precision output is rounded once, and quantised
            # bases (whose kernels round activations coarsely) see PEFT's exact values
            out: torch.Tensor = lambda_b * F.linear(lambda_d * h, b)
            return result + out.to(result.dtype)
        if torch.is_grad_enabled() and lambda_b.requires_grad:
            # training: λ_b's gradient is Σ g ⊙ (B_s(λ_d ⊙ h)), an element-wise product; scaling
            # the slice instead would need a (out × r) weight gradient, a GEMM per layer
            y = F.linear(lambda_d * h, b)
            if self.may_add_in_place(result):
                return result.addcmul_(lambda_b, y)
            summed: torch.Tensor = torch.addcmul(result, lambda_b, y)
            return summed
        return add_scaled_product(
            result, lambda_d * h, lambda_b[:, None] * b, in_place=self.may_add_in_place(result)
        )

    def folds_lambdas(
        self, x: torch.Tensor, result: torch.Tensor, h: torch.Tensor, dtype: torch.dtype
    ) -> bool:
        """Whether the adapter runs as :class:`~adapt.vera.training.VeraScaledBasisFunction`:
        under bf16 autocast (``result`` and ``h`` in bfloat16, float32 λ) on a base whose output
        may be fused (not a lossy quantised one). fp16 keeps the definition's order: a float16
        ``P = gᵀ h`` could overflow under a loss scaler."""
        return (
            result.dtype == h.dtype == torch.bfloat16 != dtype
            and self.fuse_adapter_output
            and autocast_dtype(x.device.type) == torch.bfloat16
        )

    def gathered_adapter_effect(
        self, x: Any, gathered: Gathered, base_output: torch.Tensor
    ) -> torch.Tensor | None:
        """Mixed batches at single-adapter cost: the adapters share the basis, so ``A_s x`` and
        the product with ``B_s`` are one GEMM each for the whole batch; only the λ differ per
        row (λ_d zero-padded to the largest r: the basis rows beyond an adapter's r get 0)."""
        names = gathered.adapters
        for name in names:
            dropout = self.vera_dropout[name]
            if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
                return None
        r = max(self.r[n] for n in names)
        lambda_d = torch.stack([F.pad(self.vera_lambda_d[n], (0, r - self.r[n])) for n in names])
        lambda_b = torch.stack([self.vera_lambda_b[n] for n in names])
        rows = x.shape[0]
        h = self.basis.project_input(x, self.in_features, r, lambda_d.dtype)
        h = h.reshape(rows, -1, r) * lambda_d.index_select(0, gathered.slots).unsqueeze(1)
        b = self.basis.B[: self.out_features, :r].to(device=h.device, dtype=h.dtype)
        y = F.linear(h, b) * lambda_b.index_select(0, gathered.slots).unsqueeze(1)
        return y.reshape(*x.shape[:-1], self.out_features)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        lambda_b = self.vera_lambda_b[adapter_name]
        lambda_d = self.vera_lambda_d[adapter_name]
        a, b = self.sliced_basis(adapter_name, lambda_d.dtype, lambda_d.device)
        delta: torch.Tensor = (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
        return delta

    def add_delta_weight(self, weight: torch.Tensor, adapter_name: str) -> torch.Tensor:
        lambda_b = self.vera_lambda_b[adapter_name]
        lambda_d = self.vera_lambda_d[adapter_name]
        if weight.dtype != lambda_d.dtype:
            return super().add_delta_weight(weight, adapter_name)
        a, b = self.sliced_basis(adapter_name, lambda_d.dtype, lambda_d.device)
        return torch.addmm(weight, lambda_b[:, None] * b, lambda_d[:, None] * a)
