"""``GatedLinear``: a linear map whose output channels are scaled by learned sigmoid gates.

It is deliberately *not* an ``nn.Linear`` subclass: adapt's dense weight backend and its LoRA
layers do not know it, which is what this plugin adds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GatedLinear(nn.Module):
    """``y = (x @ weight.T + bias) * sigmoid(gate)``.

    * ``weight``: ``(out_features, in_features)``, initialised like ``nn.Linear``'s;
    * ``bias``: ``(out_features,)`` or None (``bias=False``);
    * ``gate``: ``(out_features,)``, one gate logit per output channel, drawn from N(0, 1) so
      the channels start more or less open.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.gate = nn.Parameter(torch.empty(out_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.normal_(self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * torch.sigmoid(self.gate)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
