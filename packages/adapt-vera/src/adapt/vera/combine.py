"""VeRA's ``add_weighted_adapter`` and ``adapt combine``: the exact weighted sum, or a refusal.

VeRA's update at a module is ``ΔW = diag(λ_b) · B_s · diag(λ_d) · A_s``, ``(A, B)`` the frozen
basis all VeRA adapters of a model share. ``Σ wᵢ ΔWᵢ`` is such an update where it is exact, so
at each module, over the sources present there (``torch.equal``; one source: ``λ_b = w · λ_b``):

* all have one λ_d: ``λ_b = Σ wᵢ λ_bᵢ`` with that λ_d; else all have one λ_b: ``λ_d = Σ wᵢ λ_dᵢ``;
* else refused, naming the module: the sum is not ``diag(λ_b) B diag(λ_d) A`` for one λ_b and
  one λ_d, so no VeRA adapter gives it.

A module only some sources adapt combines those (the others add nothing there: still exact), as
LoRA does. ``combination_type="linear"`` only (the default ``"svd"`` too is refused), and no
option that cannot apply (svd_*, density, majority_sign_method, generator). Sources have one
``r`` and ``projection_prng_key``, ``bias="none"`` (trained base biases are shared by the
model's adapters and have no combination rule) and no ``modules_to_save``.

The new config is the first source's, targeting the union: ``target_modules`` kept when all are
equal, else lists merged or regexes joined; the adapted modules' paths when the sources restrict
targets differently (``exclude_modules``, ``layers_to_transform``, ``layers_pattern``) or mix
lists, regexes and ``"all-linear"``. Dropout (no part of ΔW), ``save_projection`` and
``basis_shape`` are the first's. λ are summed and written in float32 (float64 for float64 λ):
the new adapter's dtype in a model, on half-precision bases too.

Offline (:func:`combine_checkpoints`) the rules are the same and the projection is checked from
the files. If all sources saved it, their ``vera_A`` / ``vera_B`` must be slices of one basis
(sources of different modules save different sizes); the result has the largest when its config
says ``save_projection=True``, as ``save_pretrained`` writes the in-model result. If none saved
it, each regenerates it from the key at the size of its layers or its ``basis_shape``: one
``basis_shape``, and with none declared the same modules (layer input sizes are not in the
files). A mix is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from adapt.core import CheckpointError, ConfigError
from adapt.core.method import CombineOptions
from adapt.core.protocols import ModelView
from adapt.core.targeting import ALL_LINEAR

from .config import VeraConfig
from .layer import VeraLayer

__all__ = ["TYPES", "combine_adapters", "combine_checkpoints"]

#: the combination types VeRA has
TYPES = ("linear",)
PREFIX = "base_model.model."
PROJECTION = ("base_model.vera_A", "base_model.vera_B")
RESTRICTIONS = ("exclude_modules", "layers_to_transform", "layers_pattern")
SAME_BASIS = (
    ("r", "VeRA adapters of different r use different slices of the basis (λ_d has r entries)"),
    ("projection_prng_key", "their λ scale different random bases, so their sum is no VeRA update"),
)


class Entry(NamedTuple):
    """One source at one module: its name for messages, λ_b, λ_d and weight."""

    label: str
    lambda_b: torch.Tensor
    lambda_d: torch.Tensor
    weight: float


#: one adapted module: its path and the sources present there
Site = tuple[str, list[Entry]]
State = Mapping[str, torch.Tensor]  # an adapter's on-disk tensors
Found = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module path → (λ_b, λ_d)
Labels = Sequence[str]


def combine_adapters(
    model: ModelView,
    configs: Sequence[VeraConfig],
    sources: Sequence[str],
    weights: Sequence[float],
    options: CombineOptions,
) -> tuple[VeraConfig, Callable[[], dict[str, torch.Tensor]]]:
    """The combined adapter's config and its tensors (keys relative to the wrapped model),
    computed and checked here, before the model changes."""
    where = "add_weighted_adapter"
    labels = [repr(name) for name in sources]
    check_options(options, where)
    check_configs(configs, labels, where)
    sites = []
    for path, layer in model.adapter_layers():
        entries = [
            Entry(label, layer.vera_lambda_b[name].detach(), layer.vera_lambda_d[name].detach(), w)
            for label, name, w in zip(labels, sources, weights, strict=True)
            if isinstance(layer, VeraLayer) and name in layer.vera_lambda_b
        ]
        if entries:
            sites.append((path, entries))
    if not sites:
        raise ConfigError(f"{where}: adapters {list(sources)} adapt no module")
    tensors = site_tensors(sites, where)
    config = new_config(configs, [path for path, _ in sites])

    def compute() -> dict[str, torch.Tensor]:
        return dict(tensors)  # core adds the basis the new adapter shares with its sources

    return config, compute


def combine_checkpoints(
    configs: Sequence[VeraConfig],
    tensors: Sequence[State],
    weights: Sequence[float],
    options: CombineOptions,
) -> tuple[VeraConfig, dict[str, torch.Tensor]]:
    """The combination of saved adapters from their configs and on-disk tensors alone: what
    :func:`combine_adapters` gives in a model holding them, as ``save_pretrained`` writes it."""
    where = "combine"
    labels = [f"#{i + 1}" for i in range(len(configs))]
    check_options(options, where)
    check_configs(configs, labels, where)
    lambdas = [
        saved_lambdas(state, label, config.r)
        for state, label, config in zip(tensors, labels, configs, strict=True)
    ]
    present: dict[str, list[Entry]] = {}
    for label, found, weight in zip(labels, lambdas, weights, strict=True):
        for path, (lambda_b, lambda_d) in found.items():
            present.setdefault(path, []).append(Entry(label, lambda_b, lambda_d, weight))
    if not present:
        raise CheckpointError(f"{where}: the adapters hold no VeRA λ vectors; nothing to combine")
    sites = sorted(present.items())
    out = {PREFIX + key: value for key, value in site_tensors(sites, where).items()}
    out.update(saved_projection(configs, tensors, lambdas, labels))
    return new_config(configs, [path for path, _ in sites]), out


def check_options(options: CombineOptions, where: str) -> None:
    kind = options.combination_type
    if kind not in TYPES:
        raise ConfigError(
            f"{where}: combination_type {kind!r} is not available for VeRA adapters: they share "
            "one frozen random basis, so the only combination that is again a VeRA adapter is "
            "the exact weighted sum Σ wᵢ ΔWᵢ (no SVD, pruning or concatenation of factors); "
            "pass combination_type='linear' (adapt combine: --type linear)"
        )
    defaults = CombineOptions(combination_type=kind)
    unused = [
        f.name
        for f in dataclasses.fields(options)
        if f.name != "combination_type" and getattr(options, f.name) != getattr(defaults, f.name)
    ]
    if unused:
        raise ConfigError(
            f"{where}: combination_type='linear' is VeRA's exact weighted sum and uses none of "
            f"{unused}; drop {'it' if len(unused) == 1 else 'them'} (adapt combine: --svd-rank, "
            "--svd-clamp, --density, --majority-sign-method, --seed)"
        )


def check_configs(configs: Sequence[VeraConfig], labels: Sequence[str], where: str) -> None:
    """Refuse sources that cannot be combined, naming the adapter and the reason."""
    first, head = configs[0], labels[0]
    for label, config in zip(labels, configs, strict=True):
        if config.bias != "none":
            raise ConfigError(
                f"{where}: adapter {label} sets bias={config.bias!r}: it trained base-model "
                "biases, which all adapters on a model share and which have no combination "
                "rule; combine adapters trained with bias='none'"
            )
        if config.modules_to_save:
            raise ConfigError(
                f"{where}: adapter {label} sets modules_to_save={config.modules_to_save!r}: a "
                "combination has no rule for full module copies; combine adapters without "
                "modules_to_save"
            )
        for field, reason in SAME_BASIS:
            if getattr(config, field) != getattr(first, field):
                raise ConfigError(
                    f"{where}: adapter {head} has {field}={getattr(first, field)} and adapter "
                    f"{label} {getattr(config, field)}: {reason}; combine adapters of one {field}"
                )


def site_tensors(sites: Sequence[Site], where: str) -> dict[str, torch.Tensor]:
    """``<path>.vera_lambda_b`` / ``<path>.vera_lambda_d`` of the combination, for each site."""
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for path, entries in sites:
            lambda_b, lambda_d = combine_site(path, entries, where)
            out[f"{path}.vera_lambda_b"] = lambda_b
            out[f"{path}.vera_lambda_d"] = lambda_d
    return out


def combine_site(
    path: str, entries: Sequence[Entry], where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(λ_b, λ_d)`` at ``path`` by the rules of the module docstring (at least float32)."""
    if len({(e.lambda_b.shape, e.lambda_d.shape) for e in entries}) > 1:
        raise CheckpointError(
            f"{where}: the adapters' λ at {path} differ in size (the module's output size): "
            "they were saved for different base models; combine adapters of one base model"
        )
    work = torch.float32
    for entry in entries:
        for tensor in (entry.lambda_b, entry.lambda_d):
            work = torch.promote_types(work, tensor.dtype)
    device = entries[0].lambda_b.device
    bs = [entry.lambda_b.to(device=device, dtype=work) for entry in entries]
    ds = [entry.lambda_d.to(device=device, dtype=work) for entry in entries]
    weights = [entry.weight for entry in entries]
    other_d = next((i for i, d in enumerate(ds) if not torch.equal(d, ds[0])), None)
    other_b = next((i for i, b in enumerate(bs) if not torch.equal(b, bs[0])), None)
    if other_d is None:
        lambda_b, lambda_d = weighted_sum(bs, weights), ds[0].clone()
    elif other_b is None:
        lambda_b, lambda_d = bs[0].clone(), weighted_sum(ds, weights)
    else:
        first, by_d, by_b = (entries[i].label for i in (0, other_d, other_b))
        which = (
            f"adapters {first} and {by_d} differ in both λ_d and λ_b there"
            if other_d == other_b
            else f"λ_d differs between adapters {first} and {by_d} there, λ_b between {first} "
            f"and {by_b}"
        )
        raise ConfigError(
            f"{where}: cannot combine at {path}: {which}, so the weighted sum is not "
            "diag(λ_b)·B·diag(λ_d)·A for one λ_b and one λ_d (VeRA's form) and no VeRA adapter "
            "gives it. VeRA adapters combine exactly at modules where all share λ_d (their λ_b "
            "are summed) or all share λ_b (their λ_d are summed); leave one of these adapters out"
        )
    if not (torch.isfinite(lambda_b).all() and torch.isfinite(lambda_d).all()):
        raise ConfigError(
            f"{where}: the combination at {path} is not finite (an adapter holds NaN or Inf "
            "there, or the weights overflow); check the adapters and use smaller weights"
        )
    return lambda_b, lambda_d


def weighted_sum(vectors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = vectors[0] * weights[0]
    for vector, weight in zip(vectors[1:], weights[1:], strict=True):
        total = total + vector * weight
    return total


def saved_lambdas(state: State, label: str, r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path → ``(λ_b, λ_d)`` of one saved adapter, its keys and shapes checked."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in PROJECTION:
            continue
        path, _, name = key.removeprefix(PREFIX).rpartition(".")
        if not key.startswith(PREFIX) or name not in ("vera_lambda_b", "vera_lambda_d"):
            raise CheckpointError(
                f"combine: adapter {label} holds {key!r}, which is neither a VeRA λ vector "
                "(base_model.model.<module>.vera_lambda_b / _d) nor the projection "
                "(base_model.vera_A / _B); only plain VeRA adapters can be combined"
            )
        found.setdefault(path, {})[name] = value
    out = {}
    for path, pair in found.items():
        lambda_b, lambda_d = pair.get("vera_lambda_b"), pair.get("vera_lambda_d")
        if lambda_b is None or lambda_d is None:
            raise CheckpointError(
                f"combine: adapter {label} holds only one of vera_lambda_b / vera_lambda_d at "
                f"{path}; the file is incomplete"
            )
        floats = lambda_b.is_floating_point() and lambda_d.is_floating_point()
        if lambda_b.dim() != 1 or tuple(lambda_d.shape) != (r,) or not floats:
            raise CheckpointError(
                f"combine: adapter {label} has λ_b {tuple(lambda_b.shape)} {lambda_b.dtype} and "
                f"λ_d {tuple(lambda_d.shape)} {lambda_d.dtype} at {path}, but VeRA's λ are "
                f"floating-point vectors and its config says r={r}; the file and config disagree"
            )
        out[path] = (lambda_b, lambda_d)
    return out


def new_config(configs: Sequence[VeraConfig], paths: Sequence[str]) -> VeraConfig:
    """The first source's config, targeting the union of the sources' modules."""
    return dataclasses.replace(configs[0], **union_of_targets(configs, paths))


def union_of_targets(configs: Sequence[VeraConfig], paths: Sequence[str]) -> dict[str, Any]:
    """The union's targeting fields, from the configs alone (a model and files agree)."""
    first = configs[0]
    targets = [config.target_modules for config in configs]
    same_restrictions = all(
        getattr(config, field) == getattr(first, field)
        for config in configs
        for field in RESTRICTIONS
    )
    if same_restrictions:
        if all(t == targets[0] for t in targets):
            return {"target_modules": list(t) if isinstance(t := targets[0], list) else t}
        if all(isinstance(t, list) for t in targets):
            return {"target_modules": sorted({name for t in targets for name in t or ()})}
        if all(isinstance(t, str) and t != ALL_LINEAR for t in targets):
            joined = "|".join(f"(?:{t})" for t in dict.fromkeys(str(t) for t in targets))
            return {"target_modules": joined}
    return {"target_modules": sorted(paths), **dict.fromkeys(RESTRICTIONS)}


def saved_projection(
    configs: Sequence[VeraConfig],
    tensors: Sequence[State],
    lambdas: Sequence[Found],
    labels: Labels,
) -> dict[str, torch.Tensor]:
    """The projection tensors to write (``base_model.vera_A`` / ``_B``), checked to be one
    basis for all sources (see the module docstring)."""
    saved = []
    for label, config, state in zip(labels, configs, tensors, strict=True):
        present = [key in state for key in PROJECTION]
        if any(present) != all(present) or (config.save_projection and not any(present)):
            raise CheckpointError(
                f"combine: adapter {label}'s file lacks {'one' if any(present) else 'both'} of "
                "base_model.vera_A / base_model.vera_B (a saved projection needs both; its "
                f"config says save_projection={config.save_projection}); the file is incomplete"
            )
        saved.append(all(present))
    if all(saved):
        a, b = one_basis(tensors, lambdas, labels, configs[0].r)
        return dict(zip(PROJECTION, (a, b), strict=True)) if configs[0].save_projection else {}
    if any(saved):
        kept, lost = labels[saved.index(True)], labels[saved.index(False)]
        raise ConfigError(
            f"combine: adapter {kept} saved its projection and adapter {lost} did not "
            "(save_projection=false), so without the base model adapt cannot check that "
            f"{lost}'s basis, regenerated from its key, is the one {kept} saved; save {lost} "
            "with save_projection=True, or combine the adapters in the model "
            "(add_weighted_adapter, then save_pretrained)"
        )
    regenerated(configs, lambdas, labels)
    return {}


def one_basis(
    tensors: Sequence[State], lambdas: Sequence[Found], labels: Labels, r: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest saved ``vera_A`` and ``vera_B``, every other saved one a slice of them."""
    pairs = [(state[PROJECTION[0]], state[PROJECTION[1]]) for state in tensors]
    for label, (a, b), found in zip(labels, pairs, lambdas, strict=True):
        max_out = max(lambda_b.shape[0] for lambda_b, _ in found.values())
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or tuple(b.shape) != (max_out, r):
            raise CheckpointError(
                f"combine: adapter {label} saved vera_A {tuple(a.shape)} and vera_B "
                f"{tuple(b.shape)}, but its r={r} and largest λ_b ({max_out}) need ({r}, in) "
                f"and ({max_out}, {r}); the file and its config disagree"
            )
    big_a = max((a for a, _ in pairs), key=lambda a: a.shape[1])
    big_b = max((b for _, b in pairs), key=lambda b: b.shape[0])
    for label, (a, b) in zip(labels, pairs, strict=True):
        same_a = a.dtype == big_a.dtype and torch.equal(a, big_a[:, : a.shape[1]])
        same_b = b.dtype == big_b.dtype and torch.equal(b, big_b[: b.shape[0]])
        if not (same_a and same_b):
            raise ConfigError(
                f"combine: the saved projections (vera_A / vera_B) of adapters {labels[0]} and "
                f"{label} differ: they were trained on different VeRA bases (another key or "
                "basis size), so their λ vectors scale different matrices and their sum is no "
                "VeRA adapter; combine adapters trained on one basis (one model)"
            )
    return big_a, big_b


def regenerated(configs: Sequence[VeraConfig], lambdas: Sequence[Found], labels: Labels) -> None:
    """Sources without a saved projection: refused unless they regenerate one basis."""
    first = configs[0]
    for label, config, found in zip(labels, configs, lambdas, strict=True):
        if config.basis_shape != first.basis_shape:
            raise ConfigError(
                f"combine: adapters {labels[0]} and {label} regenerate their projection with "
                f"basis_shape {first.basis_shape} and {config.basis_shape}, which gives "
                "different bases; combine adapters of one basis_shape, or save them with "
                "save_projection=True"
            )
        if first.basis_shape is None and set(found) != set(lambdas[0]):
            raise ConfigError(
                f"combine: adapters {labels[0]} and {label} adapt different modules and were "
                "saved without their projection: each regenerates its basis at the size of its "
                "own layers, which adapt cannot check to be one basis without the base model. "
                "Save them with save_projection=True, or combine them in the model "
                "(add_weighted_adapter, then save_pretrained)"
            )
