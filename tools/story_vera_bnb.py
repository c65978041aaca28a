"""The adapt-bnb user story, run by the ``wheels`` nox session in a fresh venv that holds only
``pip install adapt-vera adapt-bnb`` (from the built wheels) and their dependencies.

VeRA on a 4-bit model whose layers have different shapes: train a few steps (loss must drop),
save, load onto a fresh copy of the quantised model (outputs must match), merge. adapt-vera
does not know bitsandbytes: the 4-bit layers are served by adapt-bnb's weight backend, found
through the ``adapt.backends`` entry point. Exits non-zero with a message on any failure.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn

from adapt.core import AdaptedModel, adapt
from adapt.vera import VeraConfig


def fail(msg: str) -> None:
    print(f"story: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def four_bit(linear: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, compute_dtype=torch.float32, quant_type="nf4"
    )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantises on .to(device)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = four_bit(nn.Linear(64, 256))
        self.gate = four_bit(nn.Linear(64, 256))
        self.down = four_bit(nn.Linear(256, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))  # type: ignore[no-any-return]


def main() -> None:
    for name in ("adapt.lora", "adapt.adalora"):
        if importlib.util.find_spec(name) is not None:
            fail(f"{name} is installed, but this venv should hold only adapt-vera and adapt-bnb")
    torch.manual_seed(1)
    x, target = torch.randn(32, 64), torch.randn(32, 64)
    model = adapt(Mlp(), VeraConfig(r=32, target_modules=["up", "gate", "down"]))
    backends = {type(layer.backend).__name__ for _, layer in model.adapter_layers()}
    if backends != {"FourBitBackend"}:
        fail(f"expected adapt-bnb's FourBitBackend on every layer, got {backends}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if not losses[-1] < losses[0]:
        fail(f"loss did not drop: {losses[0]:.4f} -> {losses[-1]:.4f}")
    model.eval()
    with torch.no_grad():
        before = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = sorted(p.name for p in Path(tmp).iterdir())
        loaded = AdaptedModel.from_pretrained(Mlp(), tmp).eval()
    with torch.no_grad():
        after = loaded(x)
    diff = (before - after).abs().max().item()
    if diff != 0.0:
        fail(f"reloaded adapter gives different outputs (max abs diff {diff:.3g})")
    report = loaded.merge_adapter()
    with torch.no_grad():
        merged = loaded(x)
    change = ((merged - after).norm() / after.norm()).item()
    print(
        f"story: VeRA on 4-bit nf4 (adapt-vera + adapt-bnb only): loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f} in 20 steps; saved {files}; reload max diff {diff}; merge "
        f"requantisation error {report.max_abs_error:.3g} max abs ({report.rel_error:.2%}), "
        f"output change {change:.2%}"
    )


if __name__ == "__main__":
    main()
