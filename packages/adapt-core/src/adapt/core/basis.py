"""Slicing utils: one frozen random basis shared by every layer, each layer taking a slice.

VeRA trains only scaling vectors; the projections A (r × in) and B (out × r) are random,
frozen and shared by all adapted layers. Layers of different shapes share one pair sized to
the largest (in, out) among the targets and take zero-copy slices ``A[:r, :in]`` and
``B[:out, :r]``. The pair is drawn from a seeded ``torch.Generator`` — A first, then B, each
Kaiming-uniform with gain √2 over its second dimension — so the same key and shape give the
same tensors bit for bit (and the same as HF PEFT's VeRA).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import AdapterStateError


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform in ±√3·√2/√fan_in with fan_in = ``shape[1]``, drawn from ``generator``."""
    fan_in = shape[1]
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in) if fan_in else 0.0
    tensor = torch.empty(shape)
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)
    return tensor


class SharedBasis(nn.Module):
    """A frozen pair ``A`` (r × max_in) and ``B`` (max_out × r) generated from ``seed``."""

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self, r: int, max_in: int, max_out: int, seed: int) -> None:
        super().__init__()
        if min(r, max_in, max_out) <= 0:
            raise ValueError(
                f"a shared basis needs positive sizes, got r={r}, in={max_in}, out={max_out}"
            )
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("A", kaiming_uniform((r, max_in), generator))
        self.register_buffer("B", kaiming_uniform((max_out, r), generator))
        self.seed = seed

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(r, max_in, max_out)``."""
        return int(self.A.shape[0]), int(self.A.shape[1]), int(self.B.shape[0])

    def fits(self, r: int, in_features: int, out_features: int) -> bool:
        basis_r, max_in, max_out = self.shape
        return r <= basis_r and in_features <= max_in and out_features <= max_out

    def require(self, r: int, in_features: int, out_features: int, *, what: str) -> None:
        """Raise a clear error if ``what`` needs more than this basis holds."""
        if self.fits(r, in_features, out_features):
            return
        basis_r, max_in, max_out = self.shape
        raise AdapterStateError(
            f"{what} needs a shared basis of at least r={r}, in={in_features}, out={out_features}, "
            f"but this model's basis is r={basis_r}, in={max_in}, out={max_out} (fixed when the "
            "first adapter was added). Add the adapter with the largest rank and layers first, "
            "or size the basis up front for every adapter you plan to add (VeRA: "
            "VeraConfig(basis_shape=(r, max_in, max_out)) on the first adapter)"
        )

    def slices(
        self, in_features: int, out_features: int, r: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-copy views ``A[:r, :in_features]`` and ``B[:out_features, :r]``."""
        return self.A[:r, :in_features], self.B[:out_features, :r]

    def extra_repr(self) -> str:
        r, max_in, max_out = self.shape
        return f"r={r}, max_in={max_in}, max_out={max_out}, seed={self.seed}"
