"""LoRA on parameters (``LoraConfig(target_parameters=[...])``): fused MoE experts.

Per expert a rank-r update ``ΔW[e] = s · B[e] A[e]``, stored as PEFT stores it: ``lora_A``
(r·E, in) with expert e's rows at ``e·r … (e+1)·r``, ``lora_B`` (out, r·E) with expert e's
columns at ``e, E + e, 2E + e, …``. A 2-D parameter is the case E = 1: a plain LoRA on a
matrix. The forward runs the module's own code with the update folded into its products
(:mod:`adapt.core.param_forward`).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn

from adapt.core import ConfigError
from adapt.core.param_forward import Factors
from adapt.core.parameter_layer import ParameterLayer

from .config import LoraConfig
from .layer import LoraLayer, bare_linear


class LoraParameter(ParameterLayer, LoraLayer):
    """LoRA on one parameter of a module (the method's ``parameter_layer``)."""

    base_types: ClassVar[tuple[type | str, ...]] = ()

    def update_layer(
        self,
        adapter_name: str,
        config: LoraConfig,
        r: int | None = None,
        lora_alpha: float | None = None,
        **kwargs: Any,
    ) -> None:
        where = f"target_parameters ({self.parameter_name!r})"
        if config.lora_dropout:
            raise ConfigError(
                f"lora_dropout={config.lora_dropout} cannot apply to {where}: dropout acts on "
                "a layer's input, which an update of the parameter itself does not see. Set "
                "lora_dropout=0 (as PEFT requires), or target these weights as modules"
            )
        if config.use_dora or config.variant:
            raise ConfigError(
                f"LoRA variants (use_dora / variant) do not work with {where}; leave them "
                "unset for adapters that target parameters (as in PEFT)"
            )
        if config.fan_in_fan_out:
            raise ConfigError(
                f"fan_in_fan_out=True does not apply to {where}: adapt reads the parameter's "
                "layout from the module (is_transposed); leave it False"
            )
        super().update_layer(adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)

    def create_adapter(
        self, adapter_name: str, r: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        rows = r * self.num_experts
        self.lora_A[adapter_name] = bare_linear(self.in_features, rows, dtype=dtype, device=device)
        self.lora_B[adapter_name] = bare_linear(rows, self.out_features, dtype=dtype, device=device)

    def delta_factors(self, adapter_name: str) -> Factors:
        e = self.num_experts
        weight_a = cast(torch.Tensor, self.lora_A[adapter_name].weight)  # (r·E, in)
        weight_b = cast(torch.Tensor, self.lora_B[adapter_name].weight)  # (out, r·E)
        a = weight_a.view(e, -1, weight_a.shape[-1])
        b = weight_b.view(weight_b.shape[0], -1, e).permute(2, 0, 1)
        return Factors(a, b, self.scaling[adapter_name])

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        raise NotImplementedError("a parameter adapter changes the weight, not the output")

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return False  # never chosen for a module target
