"""Quantised models and layers for the adapt-bnb tests (real bitsandbytes, on the CPU)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn

from adapt.core import AdaptedModel, AdapterLayer
from adapt.core.testing import tiny_llama, token_ids

#: name -> (bitsandbytes layer factory kwargs, transformers BitsAndBytesConfig kwargs)
KINDS: dict[str, dict[str, Any]] = {
    "8bit": {"bits": 8},
    "nf4": {"bits": 4, "quant_type": "nf4", "double": False},
    "fp4": {"bits": 4, "quant_type": "fp4", "double": False},
    "nf4-dq": {"bits": 4, "quant_type": "nf4", "double": True},
    "fp4-dq": {"bits": 4, "quant_type": "fp4", "double": True},
}
MAIN_KINDS = ["8bit", "nf4", "fp4"]


def quantise(linear: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes copy of ``linear`` (quantised on the CPU, as ``.to(device)`` does)."""
    spec = KINDS[kind]
    has_bias = linear.bias is not None
    layer: nn.Module
    if spec["bits"] == 8:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=torch.float32,
            quant_type=spec["quant_type"],
            compress_statistics=spec["double"],
        )
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


class Net(nn.Module):
    """Two layers of different shapes (64 -> 128 -> 64), so VeRA's basis is sliced.

    (bitsandbytes' CPU kernel needs in_features to be a multiple of the 4-bit block size, 64.)
    """

    def __init__(self, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.up = up
        self.down = down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))  # type: ignore[no-any-return]


def dense_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(nn.Linear(64, 128), nn.Linear(128, 64))


def quantised_net(kind: str, seed: int = 0) -> Net:
    dense = dense_net(seed)
    return Net(quantise(dense.up, kind), quantise(dense.down, kind))


def adapter_layers(model: AdaptedModel) -> list[AdapterLayer]:
    return [layer for _, layer in model.adapter_layers()]


def dense_reference(layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """W_deq x + b + Σ ΔW x over the active, unmerged adapters: the definition."""
    base = layer.base_layer
    weight = layer.backend.get_weight(base).float()
    bias = base.bias.float() if getattr(base, "bias", None) is not None else None
    out = F.linear(x.float(), weight, bias)
    for name in layer.active_adapters:
        if name not in layer.merged_adapters:
            out = out + F.linear(x.float(), layer.delta_weight(name).float())
    return out


def base_error(layer: AdapterLayer, x: torch.Tensor) -> float:
    """bitsandbytes' own error: its kernel's output vs the dequantised weight's."""
    base = layer.base_layer
    weight = layer.backend.get_weight(base).float()
    bias = base.bias.float() if getattr(base, "bias", None) is not None else None
    with torch.no_grad():
        return float((base(x).float() - F.linear(x.float(), weight, bias)).abs().max())


def layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """The input each adapter layer receives when ``model(x)`` runs, by ``id(layer)``."""
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for module in model.modules():
        if isinstance(module, AdapterLayer):

            def hook(m: nn.Module, args: Any, _out: Any) -> None:
                seen[id(m)] = args[0].detach()

            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def raw_storage(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every tensor of a quantised layer (data, CB/SCB, quant_state tensors)."""
    out = {k: v.detach().clone() for k, v in module.state_dict().items()}
    weight = module.weight
    for attr in ("CB", "SCB"):
        value = getattr(weight, attr, None)
        if isinstance(value, torch.Tensor):
            out[attr] = value.clone()
    return out


def llama_folder(root: Path, seed: int = 0) -> Path:
    """The kit's default tiny Llama (:func:`adapt.core.testing.tiny_llama`), saved to ``root``."""
    tiny_llama(seed).save_pretrained(root)
    return root


def load_llama(folder: Path, kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    import transformers

    spec = KINDS[kind]
    if spec["bits"] == 8:
        qconfig = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconfig = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec["quant_type"],
            bnb_4bit_use_double_quant=spec["double"],
            bnb_4bit_compute_dtype=dtype,
        )
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs: dict[str, Any] = {key: dtype}
    return transformers.LlamaForCausalLM.from_pretrained(
        folder, quantization_config=qconfig, device_map="cpu", **kwargs
    )


#: 2 sequences of 12 ids in [0, 128), seed 5
ids = partial(token_ids, batch=2, length=12, seed=5)
