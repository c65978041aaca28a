"""CorDA (Yang et al., 2024): context-oriented decomposition, PEFT 0.21's ``preprocess_corda``
and ``init_lora_weights="corda"``.

``preprocess_corda(model, lora_config, run_model=...)`` runs calibration data through the plain
model and takes, for each targeted linear weight ``W`` (out × in, canonical layout), the input
covariance ``C`` (:mod:`adapt.lora.corda_collect`), damps it (``C' = C + d·mean(diag C)·I``,
``d = 0.01`` doubled until ``‖C'C'⁻¹ − I‖_F < 0.05``) and decomposes ``W C' = U S Vh``; with
``V = (Vh C'⁻¹)ᵀ``, ``W = U S Vᵀ`` exactly. IPM keeps the r largest triplets (the directions
that matter most on the data: they train), KPM the r smallest (the knowledge the data
touches least stays in the frozen base, the rest trains). The cropped ``(S, U, V)`` is kept on
the module; ``adapt(model, LoraConfig(init_lora_weights="corda", ...))`` then sets
``A = √(S/s) Vᵀ``, ``B = U √(S/s)`` and the base to ``W − s·BA``, so the output at init is the
base's, and drops the decomposition (PEFT deletes it too).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapt.core import ConfigError, TargetError
from adapt.core.backends import resolve_backend
from adapt.core.distributed import is_partitioned
from adapt.core.layer import AdapterLayer
from adapt.core.progress import progress
from adapt.core.targeting import QUERY_VALUE_TARGETS, find_targets, is_linear, model_type_of
from adapt.core.typenames import describe

from .config import LoraConfig
from .corda_collect import (
    CordaDecomposition,
    CordaStatistics,
    collect_covariances,
    existing_file,
    read_cache,
    read_covariances,
    write_cache,
    write_covariances,
)
from .inits import full_float32
from .subconfigs import CordaConfig, sub_config

__all__ = [
    "CordaDecomposition",
    "corda_factors",
    "corda_forget",
    "corda_refusal",
    "decompose",
    "preprocess_corda",
]

#: the attributes preprocess_corda sets on each target module
DECOMPOSITION = "_adapt_corda"
STATISTICS = "_adapt_corda_statistics"  # with prune_temporary_fields=False only
_MAX_DOUBLINGS = 40


def damped(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C', C'⁻¹)``: PEFT's damping loop (at least 1 % of the mean diagonal)."""
    n = covariance.shape[0]
    mean = torch.mean(torch.diag(covariance))
    if not bool(torch.isfinite(mean)) or float(mean) <= 0:
        raise TargetError(
            f"the input covariance has mean diagonal {float(mean)} (all-zero or invalid "
            "inputs): calibrate on real data, or leave this module out of target_modules"
        )
    dtype, device = covariance.dtype, covariance.device
    eye = torch.eye(n, dtype=dtype, device=device)
    damp = 0.01
    for _ in range(_MAX_DOUBLINGS):
        compensate = torch.diag(torch.ones(n, dtype=dtype, device=device) * mean * damp)
        fixed = covariance + compensate
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            return fixed, inverse
        damp *= 2
    raise TargetError(
        "the damped input covariance could not be inverted accurately: its inputs hold values "
        "too far apart for float32; check the calibration data"
    )


def decompose(
    weight: torch.Tensor, covariance: torch.Tensor, rank: int, method: str
) -> CordaDecomposition:
    """The CorDA decomposition of ``weight`` (out, in) for ``covariance`` (in, in)."""
    with full_float32():
        fixed, inverse = damped(covariance.float())
        u, s, vh = torch.linalg.svd(weight.float() @ fixed, full_matrices=False)
        v = (vh @ inverse).T
    keep = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return CordaDecomposition(
        s[keep].clone(), u[:, keep].contiguous(), v[:, keep].contiguous(), method
    )


# ------------------------------------------------------------------------- preprocessing


def _options(config: LoraConfig) -> CordaConfig:
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"preprocess_corda takes a LoraConfig, got {type(config).__name__}")
    if config.init_lora_weights != "corda":
        raise ConfigError(
            "preprocess_corda prepares init_lora_weights='corda', and this LoraConfig has "
            f"init_lora_weights={config.init_lora_weights!r}: pass the config you give adapt"
        )
    options = sub_config("LoraConfig", "corda_config", CordaConfig, config.corda_config)
    options = options or CordaConfig()
    if options.corda_method not in ("ipm", "kpm"):
        raise ConfigError(
            f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {options.corda_method!r}"
        )
    return options


def _target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    targets = config.target_modules
    if targets is None:
        model_type = model_type_of(model)
        defaults = QUERY_VALUE_TARGETS.get(model_type) if model_type else None
        if not defaults:
            raise TargetError(
                "target_modules is not set and there is no LoRA default for this model "
                f"(model type {model_type!r}): name the modules, e.g. target_modules=['q_proj']"
            )
        targets = list(defaults)
    return find_targets(
        model,
        targets,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
    )


def corda_targets(model: nn.Module, config: LoraConfig) -> dict[str, nn.Module]:
    """The linear modules (``nn.Linear``, transformers ``Conv1D``) ``config`` targets, by path,
    as PEFT's CorDA chooses them; refusals for what cannot be decomposed."""
    adapted = [p for p, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if adapted:
        raise TargetError(
            f"preprocess_corda runs on the plain model, before adapt(...); this one already has "
            f"adapter layers ({adapted[0]!r}, ...): call it on the base model first"
        )
    found = {p: model.get_submodule(p) for p in _target_names(model, config)}
    chosen = {p: m for p, m in found.items() if is_linear(m)}
    if not chosen:
        raise TargetError(
            f"CorDA decomposes linear layers, and none of the {len(found)} targeted modules "
            f"is one ({', '.join(repr(p) for p in list(found)[:3])}): target Linear modules"
        )
    for path, module in chosen.items():
        backend = resolve_backend(module)
        weight = getattr(module, "weight", None)
        if backend is None or backend.lossy:
            raise TargetError(
                f"CorDA cannot decompose {path!r} ({describe(module)}): its weight is "
                "quantised, and the residual would be requantised (PEFT refuses it too): "
                "initialise CorDA on the float model, then quantise the residual model"
            )
        if isinstance(weight, torch.Tensor) and (weight.is_meta or is_partitioned(weight)):
            raise TargetError(
                f"CorDA reads the weight of {path!r}, which is not here (meta device or a "
                "ZeRO-3 partition): preprocess the loaded model, outside deepspeed.zero.Init"
            )
    return chosen


def _dense_weight(module: nn.Module) -> torch.Tensor:
    backend = resolve_backend(module)
    assert backend is not None  # corda_targets refused the others
    return backend.get_weight(module).detach()


def _ranks(config: LoraConfig, targets: dict[str, nn.Module]) -> dict[str, int]:
    ranks = {}
    for path, module in targets.items():
        rank = config.rank_and_alpha(path)[0]
        out, inp = _dense_weight(module).shape
        if rank > min(out, inp):
            raise ConfigError(
                f"rank r={rank} for {path!r} is larger than its weight allows ({out} × {inp}: "
                f"at most {min(out, inp)}); lower r (or rank_pattern for this module)"
            )
        ranks[path] = rank
    return ranks


def _statistics(
    model: nn.Module,
    config: LoraConfig,
    options: CordaConfig,
    targets: dict[str, nn.Module],
    run_model: Callable[[], object] | None,
    hooked_model: nn.Module | None,
) -> tuple[dict[str, CordaStatistics], bool]:
    """The covariances, from ``covariance_file`` or by running the model; and whether they
    were computed now (to be written to ``covariance_file``)."""
    file = existing_file(options.covariance_file, "covariance_file")
    if file is not None:
        return read_covariances(file, list(targets)), False
    if run_model is None:
        raise ConfigError(
            "preprocess_corda needs run_model, a function that runs the model over calibration "
            "data (e.g. run_model=lambda: [model(ids) for ids in batches]), unless "
            "corda_config.cache_file or covariance_file names an existing file"
        )
    hooked = targets if hooked_model is None else corda_targets(hooked_model, config)
    found = collect_covariances(
        hooked, hooked_model or model, run_model, options.use_float16_for_covariance
    )
    unseen = [p for p in targets if p not in found]
    if unseen:
        raise TargetError(
            f"run_model never called {unseen[0]!r} ({len(unseen)} targeted module(s) saw no "
            "input): run the model over the calibration data in run_model, or leave modules "
            "the forward does not reach out of target_modules"
        )
    return {p: found[p] for p in targets}, True


def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Callable[[], object] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Compute CorDA's decomposition for every linear module ``lora_config`` targets (PEFT's
    ``preprocess_corda``), on the plain model, before ``adapt(model, lora_config)``.

    * ``lora_config``: the ``LoraConfig(init_lora_weights="corda", corda_config=...)`` you then
      give ``adapt``; its ``target_modules`` (as adapt matches them), ``r`` / ``rank_pattern``
      and :class:`~adapt.lora.CordaConfig` (``corda_method``, ``cache_file``,
      ``covariance_file``, ``use_float16_for_covariance``, ``prune_temporary_fields``,
      ``verbose``) apply.
    * ``run_model``: called once with forward hooks on the targets (eval mode, no gradients);
      it should run the model over the calibration data. Batches of several sequences work:
      each sequence is one sample (PEFT accepts batches of one only; with batch size 1 the
      numbers are PEFT's). Not needed when ``cache_file`` or ``covariance_file`` exists.
    * ``hooked_model``: a copy of the model to run instead (its modules are matched by path).

    ``cache_file`` (the cropped decomposition: it depends on r and the mode) and
    ``covariance_file`` (it does not) are read when they exist and written otherwise, as
    **safetensors** (paths ending in ``.safetensors``): adapt never loads pickle, so PEFT's
    ``torch.save`` files cannot be read — rebuild them, or convert a file you trust.

    Everything is checked and computed before any module changes: on any error (in
    ``run_model`` too) the hooks are gone and the model is as it was. The result is kept on
    each module (``module._adapt_corda``) until ``adapt`` uses it.
    """
    options = _options(lora_config)
    targets = corda_targets(model, lora_config)
    ranks = _ranks(lora_config, targets)
    cache = existing_file(options.cache_file, "cache_file")
    existing_file(options.covariance_file, "covariance_file")  # the suffix, before any work
    statistics: dict[str, CordaStatistics] = {}
    if cache is not None:
        weights = {path: _dense_weight(module) for path, module in targets.items()}
        found = read_cache(cache, weights, ranks, options.corda_method)
    else:
        statistics, fresh = _statistics(
            model, lora_config, options, targets, run_model, hooked_model
        )
        found = _decompose_all(targets, statistics, ranks, options)
        if fresh and options.covariance_file is not None:
            write_covariances(Path(options.covariance_file), statistics)
        if options.cache_file is not None:
            write_cache(Path(options.cache_file), found, options.corda_method)
    for path, module in targets.items():
        setattr(module, DECOMPOSITION, found[path])
        if statistics and not options.prune_temporary_fields:
            setattr(module, STATISTICS, statistics[path])


def _decompose_all(
    targets: dict[str, nn.Module],
    statistics: dict[str, CordaStatistics],
    ranks: dict[str, int],
    options: CordaConfig,
) -> dict[str, CordaDecomposition]:
    found = {}
    bar = progress(targets.items(), desc="CorDA", unit="layer", enable=options.verbose)
    for path, module in bar:
        weight = _dense_weight(module).float()
        covariance = statistics[path].covariance.to(weight.device)
        try:
            found[path] = decompose(weight, covariance, ranks[path], options.corda_method)
        except TargetError as exc:
            raise TargetError(f"CorDA cannot decompose {path!r}: {exc}") from exc
    return found


# ------------------------------------------------------------- used by weight_init.py


def decomposition_of(module: nn.Module) -> CordaDecomposition | None:
    found = getattr(module, DECOMPOSITION, None)
    return found if isinstance(found, CordaDecomposition) else None


def _current_adapter(layer: Any, adapter_name: str | None) -> str:
    # the adapter being initialised is the one added last (weight_init runs right after)
    return adapter_name if adapter_name is not None else next(reversed(layer.r))


def corda_refusal(
    layer: Any, adapter_name: str | None = None, config: LoraConfig | None = None
) -> str | None:
    """Why ``init_lora_weights="corda"`` cannot initialise ``layer`` (None if it can)."""
    found = decomposition_of(layer.get_base_layer())
    if found is None:
        return (
            "CorDA starts from the decomposition preprocess_corda computes from calibration "
            "data, and this module has none: run preprocess_corda(model, lora_config, "
            "run_model=...) on the model before adapt(model, lora_config); to load a saved "
            "CorDA adapter, run it before from_pretrained (same data, or its cache_file), or "
            "load the plain LoRA save_pretrained(..., path_initial_model_for_weight_conversion"
            "=...) writes"
        )
    name = _current_adapter(layer, adapter_name)
    r, scaling = layer.r[name], layer.scaling[name]
    if found.rank != r:
        return (
            f"preprocess_corda decomposed this module for rank {found.rank}, and the adapter's "
            f"r here is {r}: run preprocess_corda with the LoraConfig (r, rank_pattern) you "
            "give adapt (a cache_file keeps the rank it was built for: delete it to rebuild)"
        )
    if found.u.shape[0] != layer.out_features or found.v.shape[0] != layer.in_features:
        return (
            f"the decomposition preprocess_corda stored here is for a {found.u.shape[0]} × "
            f"{found.v.shape[0]} weight, and this one is {layer.out_features} × "
            f"{layer.in_features}: run preprocess_corda on this model again"
        )
    wanted = config.corda_config if config is not None else None
    if isinstance(wanted, CordaConfig) and found.method not in (None, wanted.corda_method):
        return (
            f"preprocess_corda made a {found.method.upper()} decomposition here, and this "
            f"config's corda_method is {wanted.corda_method!r}: use the same config for both"
        )
    if scaling <= 0:
        return f"CorDA splits √(S / scaling) between A and B and needs lora_alpha > 0 (scaling {scaling})"
    if not all(bool(torch.isfinite(t).all()) for t in (found.s, found.u, found.v)):
        return "the stored decomposition holds NaN or inf: run preprocess_corda again"
    return None


def corda_factors(
    layer: Any, weight: torch.Tensor, r: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` float32: ``A = √(S/s) Vᵀ``, ``B = U √(S/s)`` (PEFT's
    ``corda_init``), so ``s·BA = U S Vᵀ``, the part the base gives up."""
    found = decomposition_of(layer.get_base_layer())
    if found is None or found.rank != r:
        raise TargetError("no CorDA decomposition of this rank here: run preprocess_corda first")
    device = weight.device
    root = (found.s.to(device, torch.float32) / scaling).sqrt()
    a = found.v.to(device, torch.float32).T * root[:, None]
    b = found.u.to(device, torch.float32) * root
    return a.contiguous(), b.contiguous()


def corda_forget(layer: Any) -> None:
    """Drop the decomposition once the adapter is in (PEFT deletes it too)."""
    base = layer.get_base_layer()
    if DECOMPOSITION in vars(base):
        delattr(base, DECOMPOSITION)
