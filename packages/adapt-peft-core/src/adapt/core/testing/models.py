"""What the conformance checks and the tests run on: a model made of the one base module under
test, seeded adapter weights, seeded token-id batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..layer import AdapterLayer


class SingleTargetModel(nn.Module):
    """A one-module model: ``target`` is the base module under test."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, *inputs: Any) -> Any:
        return self.target(*inputs)


def randomise_adapter(layer: AdapterLayer, adapter_name: str, seed: int) -> None:
    """Overwrite the floating-point parameters of ``adapter_name`` in ``layer`` with seeded
    noise (standard deviation 0.1), so that the adapter changes the output. For a layer whose
    adapters multiply (``composition = "product"``) or whose merge depends on the weight
    (DoRA's magnitudes) the noise is added to the current values instead, relative to their
    size (10 % of their root mean square; IA³'s ones, DoRA's row norms), so factors stay near
    their initial scale and merging stays well conditioned."""
    gen = torch.Generator().manual_seed(seed)
    around = type(layer).composition == "product" or layer.merge_depends_on_weight()
    with torch.no_grad():
        for _, tensor in sorted(layer.adapter_tensors(adapter_name).items()):
            if tensor.is_floating_point() and isinstance(tensor, nn.Parameter):
                noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * 0.1
                if around:
                    current = tensor.detach().float()
                    rms = float(current.square().mean().sqrt()) if current.numel() else 0.0
                    noise = current + noise * (rms if rms > 0 else 1.0)
                tensor.copy_(noise.to(tensor.dtype))


def randomise_adapters(
    model: nn.Module,
    seed: int = 1,
    scale: float = 0.1,
    *,
    where: Callable[[str, nn.Parameter], bool] | None = None,
) -> int:
    """Overwrite parameters of ``model`` with seeded noise (``randn · scale``, one generator
    drawn in the order of their sorted names), so that identity-initialised adapters (LoRA's B,
    VeRA's λ_b, AdaLoRA's E) change the output. ``where(name, param)`` picks the parameters;
    by default, every trainable one. Returns how many were overwritten."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if where(name, param) if where is not None else param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
                count += 1
    return count


def token_ids(
    batch: int = 2, length: int = 8, *, vocab_size: int = 128, low: int = 0, seed: int = 0
) -> torch.Tensor:
    """A seeded ``batch × length`` batch of token ids, uniform in ``[low, vocab_size)``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab_size, (batch, length), generator=gen)
