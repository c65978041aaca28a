"""LoRA on convolutions (``nn.Conv1d/2d/3d``): A is a convolution with the base's kernel into
r channels, B a 1×…×1 convolution back to the output channels."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from adapt.core import TargetError
from adapt.core.typenames import describe

from .layer import LoraLayer, _weight

__all__ = ["LoraConv", "grouped_conv_message"]


def grouped_conv_message(name: str, conv: nn.modules.conv._ConvNd) -> str:
    """Why LoRA refuses a grouped convolution, naming it (by path when known)."""
    return (
        f"{name} is a {type(conv).__name__} with groups={conv.groups}; LoRA on grouped "
        "convolutions is not implemented in adapt-lora. Remove it from target_modules "
        "(or list it in exclude_modules)"
    )


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a convolution with the base's kernel, stride, padding
    and dilation into r channels; B a 1×…×1 convolution back to the output channels."""

    base_types: ClassVar[tuple[type | str, ...]] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        # Grouped convolutions are claimed (not refused here) so that LoraMethod.prepare can
        # refuse them with a message naming the module and its groups; refusing here would
        # give core's generic "no lora layer can adapt Conv2d" message instead.
        return isinstance(module, nn.modules.conv._ConvNd)

    def create_adapter(
        self, adapter_name: str, r: int, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        base = self.get_base_layer()
        assert isinstance(base, nn.modules.conv._ConvNd)
        if base.groups != 1:
            raise TargetError(grouped_conv_message(describe(base), base))
        conv_cls: Any = (
            type(base)
            if type(base) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
            else {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(base.kernel_size)]
        )
        ones = (1,) * len(base.kernel_size)
        self.lora_A[adapter_name] = conv_cls(
            self.in_features,
            r,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            padding_mode=base.padding_mode,
            bias=False,
            dtype=dtype,
            device=device,
        )
        self.lora_B[adapter_name] = conv_cls(
            r,
            self.out_features,
            ones,
            stride=ones,
            bias=False,
            dtype=dtype,
            device=device,
        )

    def lora_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return self._ab(x, adapter_name)

    def per_output(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view(1, -1, *([1] * (like.dim() - 2)))  # channels are dim 1

    def base_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        assert isinstance(base, nn.modules.conv._ConvNd)
        weight = self.original_weight().to(x.dtype)
        out: torch.Tensor = base._conv_forward(x, weight, None)
        return out

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight_a = _weight(self.lora_A[adapter_name])  # (r, in, *k)
        weight_b = _weight(self.lora_B[adapter_name])  # (out, r, 1, ...)
        delta = weight_b.flatten(1) @ weight_a.flatten(1)
        out: torch.Tensor = delta.view(self.out_features, *weight_a.shape[1:])
        return out * self.scaling[adapter_name]
