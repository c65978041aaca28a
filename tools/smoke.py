"""Smoke test of the installed adapt wheels, run by the ``wheels`` nox session in a fresh venv.

Checks that ``adapt.core`` and ``adapt.lora`` import from site-packages (not from this repo),
that a LoRA adapter can be applied to a tiny torch model, saved, and loaded back onto a fresh
copy of the model with identical outputs. Exits non-zero with a message on any failure.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import json
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fail(msg: str) -> None:
    print(f"smoke: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check_installed(module: object, dist_name: str) -> None:
    name = getattr(module, "__name__", "?")
    origin = Path(getattr(module, "__file__", None) or "").resolve()
    if "site-packages" not in origin.parts:
        fail(f"{name} was imported from {origin}, not from site-packages")
    if (REPO / "packages") in origin.parents:
        fail(f"{name} was imported from the repository's sources ({origin}), not from a wheel")
    direct_url = importlib.metadata.distribution(dist_name).read_text("direct_url.json") or "{}"
    if json.loads(direct_url).get("dir_info", {}).get("editable"):
        fail(f"{dist_name} is an editable install, not a wheel")
    print(f"smoke: {name} {getattr(module, '__version__', '?')} from {origin.parent}")


def main() -> None:
    try:
        import torch
        from torch import nn

        core_module = importlib.import_module("adapt.core")
        lora_module = importlib.import_module("adapt.lora")
        from adapt.core import AdaptedModel, adapt
        from adapt.lora import LoraConfig
    except Exception:
        traceback.print_exc()
        fail("could not import torch / adapt.core / adapt.lora")

    check_installed(core_module, "adapt-peft-core")
    check_installed(lora_module, "adapt-lora")

    class Block(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.q_proj = nn.Linear(dim, dim)
            self.v_proj = nn.Linear(dim, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.q_proj(x)) + self.v_proj(x)

    torch.manual_seed(0)
    base = nn.Sequential(Block(16), Block(16), nn.Linear(16, 4)).eval()
    fresh = copy.deepcopy(base)
    x = torch.randn(3, 16)

    m = adapt(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # LoRA's B starts at zero; perturb every adapter weight so the round trip is meaningful.
    with torch.no_grad():
        trainable = [p for p in m.parameters() if p.requires_grad]
        if not trainable:
            fail("the adapted model has no trainable parameters")
        for p in trainable:
            p.add_(torch.randn_like(p) * 0.1)
    m.eval()
    with torch.no_grad():
        before = m(x)

    with tempfile.TemporaryDirectory() as tmpdir:
        m.save_pretrained(tmpdir)
        saved = sorted(p.name for p in Path(tmpdir).iterdir())
        print(f"smoke: saved {saved}")
        loaded = AdaptedModel.from_pretrained(fresh, tmpdir)
        loaded.eval()
        with torch.no_grad():
            after = loaded(x)

    if before.shape != after.shape:
        fail(f"output shapes differ after reload: {tuple(before.shape)} vs {tuple(after.shape)}")
    if not torch.allclose(before, after, rtol=0, atol=1e-6):
        diff = (before - after).abs().max().item()
        fail(f"outputs differ after save_pretrained/from_pretrained (max abs diff {diff:.3g})")
    print("smoke: OK (adapt + LoRA + save/load round trip from installed wheels)")


if __name__ == "__main__":
    main()
