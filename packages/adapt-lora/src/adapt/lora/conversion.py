"""PiSSA / OLoRA adapters as plain LoRA adapters for the original base (PEFT's
``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

The initialisation left the base as ``W − s·B₀A₀``; after training the model computes
``W − s·B₀A₀ + s·BA = W + s·(BA − B₀A₀) = W + s·[B | −B₀][A ; A₀]``: a LoRA of rank 2r on the
original ``W``, with the same scaling (``lora_alpha`` doubled, or × √2 with rsLoRA). Every other
saved tensor (biases, ``modules_to_save``, DoRA magnitudes) is written as it is.

Where adapt differs from PEFT 0.21: PEFT writes only the ``lora_A`` / ``lora_B`` tensors
(embedding factors, biases and DoRA magnitudes are dropped from the converted file), and refuses
rsLoRA with ``rank_pattern`` / ``alpha_pattern``, which adapt converts (α × √2 everywhere).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from adapt.core import CheckpointError, ConfigError

from .config import weight_init

__all__ = ["convert_for_initial"]

_FACTORS = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}


def _factor(key: str) -> str | None:
    for part in key.split("."):
        if part in _FACTORS:
            return part
    return None


def _check_convertible(config: dict[str, Any], initial_config: dict[str, Any], source: str) -> None:
    init = config.get("init_lora_weights", True)
    found = weight_init(init)
    if found is not None and found[0] == "loftq":
        raise ConfigError(
            "path_initial_model_for_weight_conversion cannot convert a LoftQ adapter: LoftQ "
            "replaced the base weights by their quantised values, not by W − s·B₀A₀; save the "
            "adapter with its quantised base instead"
        )
    if init is False:
        raise ConfigError(
            "path_initial_model_for_weight_conversion converts adapters initialised from the "
            "base weight (PiSSA, OLoRA); this one was initialised with init_lora_weights=False"
        )
    if initial_config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{source} holds a {initial_config.get('peft_type')!r} adapter, not the LoRA adapter "
            "saved before training"
        )
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        if (initial_config.get(key) or None) != (config.get(key) or None):
            raise CheckpointError(
                f"{source} is not this adapter before training: its {key} is "
                f"{initial_config.get(key)!r}, this adapter's {config.get(key)!r}"
            )


def _doubled(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    grow: float = math.sqrt(2) if config.get("use_rslora") else 2  # ints stay ints, as in PEFT
    out["r"] = 2 * int(config["r"])
    out["lora_alpha"] = config["lora_alpha"] * grow
    out["rank_pattern"] = {k: 2 * int(v) for k, v in (config.get("rank_pattern") or {}).items()}
    out["alpha_pattern"] = {k: v * grow for k, v in (config.get("alpha_pattern") or {}).items()}
    out["init_lora_weights"] = True
    out["corda_config"] = None  # a plain LoRA now: nothing for a CorDA config to say
    return out


def convert_for_initial(
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    initial_config: dict[str, Any],
    initial: dict[str, torch.Tensor],
    source: str,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The rank-2r plain LoRA equal to the trained PiSSA / OLoRA adapter on the original base."""
    _check_convertible(config, initial_config, source)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        factor = _factor(key)
        if factor is None:
            out[key] = tensor
            continue
        start = initial.get(key)
        if start is None or start.shape != tensor.shape:
            got = "missing" if start is None else f"of shape {tuple(start.shape)}"
            raise CheckpointError(
                f"{source} is not this adapter before training: {key} is {got} there, "
                f"{tuple(tensor.shape)} here; save the adapter to that folder right after "
                "creating it, before training"
            )
        start = start.to(tensor.dtype)
        dim = _FACTORS[factor]
        out[key] = torch.cat([tensor, start if dim == 0 else -start], dim=dim).contiguous()
    return _doubled(config), out
