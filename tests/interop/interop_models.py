"""Models, batches and output helpers the interop tests share (LoRA and DoRA against PEFT)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adapt.core.testing import tiny_llama, token_ids


def llama() -> nn.Module:
    # the kit's tiny Llama, at transformers' default max_position_embeddings
    return tiny_llama(max_position_embeddings=2048)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


def tokens(model: nn.Module) -> dict[str, torch.Tensor]:
    return {"input_ids": token_ids(2, 12, seed=1)}


def image(model: nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(2, 3, 16, 16, generator=g)}


def output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The no-grad output: logits, else the last hidden state, else the tensor itself."""
    with torch.no_grad():
        out = model(**batch)
    if isinstance(out, torch.Tensor):
        return out
    return (
        out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
    )


def seeded_eval(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` built after ``torch.manual_seed(0)``, in eval mode."""
    torch.manual_seed(0)
    return factory().eval()
