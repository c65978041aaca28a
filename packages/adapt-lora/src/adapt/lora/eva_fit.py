"""EVA's computation (:func:`adapt.lora.eva.get_eva_state_dict`): hooks on the layers' inputs,
incremental PCA until the needed components converge, and the rank distribution.

The order of every step is PEFT's (``peft.tuners.lora.eva``), so the ranks and components match
PEFT's to round-off: the hash pass over the first batch, the per-step convergence check before
the forward, the redistribution after it, ``argsort`` over the same candidate list (ties
included), the swap that gives a group's first layer its largest rank.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from adapt.core import AdapterStateError, ConfigError
from adapt.core.progress import progress

from .config import LoraConfig
from .incremental_pca import IncrementalPCA
from .subconfigs import EvaConfig

#: passes over the dataloader after which EVA gives up (PEFT has no limit)
MAX_EPOCHS = 100
#: the prefix of PEFT's module names (``PeftModel.named_modules()``), accepted in keys
PEFT_PREFIX = "base_model.model."

LayerInputsFn = Callable[[Any, Any, str], torch.Tensor]
ForwardFn = Callable[[nn.Module, Any], Any]


def first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    """A hook's input: the first positional argument."""
    if isinstance(layer_input, (tuple, list)) and layer_input:
        layer_input = layer_input[0]
    if not isinstance(layer_input, torch.Tensor):
        raise TypeError(
            f"the input of {layer_name} is a {type(layer_input).__name__}, not a tensor"
        )
    return layer_input


def every_position(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """``prepare_layer_inputs_fn=None``: every position, all dimensions but the last flattened."""
    x = first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.size(-1)) if x.dim() > 2 else x


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gathered(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order (padded to the longest for the collective)."""
    world = dist.get_world_size()
    local = torch.tensor([x.shape[0]], device=x.device)
    sizes_t = torch.empty(world, dtype=local.dtype, device=x.device)
    dist.all_gather_into_tensor(sizes_t, local)
    sizes = [int(s) for s in sizes_t.tolist()]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0)


class _Hook:
    """A forward hook reading one layer's prepared (and gathered) input."""

    def __init__(self, name: str, prepare: LayerInputsFn, gather: bool) -> None:
        self.name, self.prepare, self.gather = name, prepare, gather
        self.model_input: Any = None

    def states(self, args: tuple[Any, ...]) -> torch.Tensor:
        try:
            x = self.prepare(args, self.model_input, self.name)
        except (IndexError, TypeError) as exc:
            raise ConfigError(
                f"EVA could not take the input of {self.name}: {exc}. Pass "
                "prepare_layer_inputs_fn=... (a function, or a dict by layer path) returning "
                "the 2-D (tokens × in_features) input to decompose"
            ) from exc
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"prepare_layer_inputs_fn gave {got} for {self.name}; it must return a 2-D "
                "tensor (tokens × in_features)"
            )
        return _gathered(x) if self.gather else x


class _HashHook(_Hook):
    digest: str | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.digest is None:  # the first call is the one compared, as in PEFT
            x = self.states(args).detach().cpu().contiguous() + 0  # -0.0 hashes as 0.0
            digest = hashlib.blake2b(f"{tuple(x.shape)}{x.dtype}".encode())
            digest.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
            self.digest = digest.hexdigest()


class _SVDHook(_Hook):
    def __init__(self, name: str, prepare: LayerInputsFn, gather: bool, k: int, tau: float):
        super().__init__(name, prepare, gather)
        self.k, self.tau = k, tau
        self.pca = IncrementalPCA(k, lowrank=True, lowrank_seed=42)
        self.converged = torch.zeros((k,), dtype=torch.bool)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        before = self.pca.components_
        previous = None if before is None else before.clone()
        states = self.states(args)
        if states.size(0) < self.k:
            return  # fewer tokens than components: the step is skipped (as in PEFT)
        self.pca.partial_fit(states.to(torch.float32))
        if previous is not None:
            components = cast(torch.Tensor, self.pca.components_)
            self.converged = F.cosine_similarity(components, previous) >= self.tau


@dataclass
class Run:
    """One EVA computation: the layers by path (model order), their input functions, component
    counts, rank budget and convergence threshold; then the hooks and the equal-input map
    (layer → the layer whose decomposition it shares)."""

    modules: dict[str, nn.Module]
    fns: dict[str, LayerInputsFn]
    max_components: dict[str, int]
    budget: int
    tau: float
    gather: bool
    hooks: dict[str, _SVDHook] = field(default_factory=dict)
    equal: dict[str, str] = field(default_factory=dict)

    @property
    def layer_hook_map(self) -> dict[str, str]:
        return {**{name: name for name in self.hooks}, **self.equal}


def _layer_fns(paths: list[str], given: Any) -> dict[str, LayerInputsFn]:
    if given is None:
        return dict.fromkeys(paths, every_position)
    if not isinstance(given, Mapping):
        if not callable(given):
            raise ConfigError(
                f"prepare_layer_inputs_fn must be a function or a dict, got {given!r}"
            )
        return dict.fromkeys(paths, given)
    by_path = {k[len(PEFT_PREFIX) :] if k.startswith(PEFT_PREFIX) else k: k for k in given}
    unknown = [k for p, k in by_path.items() if p not in paths]
    if unknown:
        raise ConfigError(
            f"prepare_layer_inputs_fn is a dict, and {unknown} name no layer EVA decomposes; "
            f"its keys are layer paths such as {paths[:2]}"
        )
    fns: dict[str, LayerInputsFn] = {}
    for path in paths:  # layers not in the dict (or mapped to None) decompose every position
        fn = given[by_path[path]] if path in by_path else None
        fns[path] = every_position if fn is None else fn
    return fns


def plan_run(
    model: nn.Module, config: LoraConfig, layers: dict[str, nn.Module], fn: Any, gather: bool
) -> Run:
    """Component counts ``round(rho·r)`` (refused above a layer's input width), the budget
    ``Σ r`` and each layer's input function; nothing runs yet."""
    eva = cast(EvaConfig, config.eva_config)
    rho = eva.rho
    if rho > 1000:  # PEFT's ceiling for huge rho
        widest = max((max(p.shape, default=1) for p in model.parameters()), default=1)
        rho = min(rho, widest // config.r)
    ranks = {path: config.rank_and_alpha(path)[0] for path in layers}
    counts = {path: round(r * rho) for path, r in ranks.items()}
    for path, k in counts.items():
        # input width: LoRA layers' and nn.Linear's in_features, transformers Conv1D's nx
        width = getattr(layers[path], "in_features", None) or getattr(layers[path], "nx", None)
        if isinstance(width, int) and k > width:
            raise ConfigError(
                f"EVA fits round(rho·r) = {k} components for {path}, which has {width} input "
                "features: lower rho (EvaConfig(rho=...)) or this layer's r (rank_pattern)"
            )
    fns = _layer_fns(list(layers), fn)
    return Run(dict(layers), fns, counts, sum(ranks.values()), float(eva.tau), gather)


def find_equal_inputs(
    model: nn.Module, run: Run, inputs: Any, model_input: Any, forward_fn: ForwardFn
) -> None:
    """One forward of the first batch: layers whose prepared inputs are bit-identical share a
    decomposition (the first in model order holds it, with the group's largest count)."""
    hashes = {p: _HashHook(p, run.fns[p], run.gather) for p in run.modules}
    handles = []
    for path, hook in hashes.items():
        hook.model_input = model_input
        handles.append(run.modules[path].register_forward_hook(hook))
    try:
        forward_fn(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    silent = [p for p, h in hashes.items() if h.digest is None]
    if silent:
        raise ConfigError(
            f"EVA: {silent[:3]} ({len(silent)} layers) did not run in the forward pass of the "
            "first batch, so they cannot be initialised from data: leave them out of "
            "target_modules, or check forward_fn"
        )
    groups: dict[str, list[str]] = {}
    for path, hook in hashes.items():
        groups.setdefault(cast(str, hook.digest), []).append(path)
    for members in groups.values():
        top = max(run.max_components[m] for m in members)
        for member in members:
            run.max_components[member] = top
        run.equal.update(dict.fromkeys(members[1:], members[0]))
    for path in run.modules:
        if path not in run.equal:
            k = run.max_components[path]
            run.hooks[path] = _SVDHook(path, run.fns[path], run.gather, k, run.tau)


def _rank_distribution(run: Run) -> dict[str, int]:
    """Share the budget by explained-variance ratio; a group's first layer gets its largest rank."""
    ratios = {
        n: cast(torch.Tensor, h.pca.explained_variance_ratio_)[: run.max_components[n]]
        for n, h in run.hooks.items()
    }
    mapping = run.layer_hook_map
    keys, values = zip(*[(k, c) for k, name in mapping.items() for c in ratios[name]], strict=True)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[: run.budget])
    ranks = {k: counts.get(k, 0) for k in mapping}
    for k, rep in run.equal.items():
        if ranks[rep] < ranks[k]:
            ranks[rep], ranks[k] = ranks[k], ranks[rep]
    return ranks


def _cycled(dataloader: Any, show: bool, status: Callable[[], str]) -> Iterator[Any]:
    """The dataloader's batches, then the first pass's again (as ``itertools.cycle``), for at
    most :data:`MAX_EPOCHS` passes; a progress bar per pass (on a terminal)."""
    first: list[Any] = []
    for epoch in range(MAX_EPOCHS):
        items: Iterable[Any] = dataloader if epoch == 0 else first
        count = len(dataloader) if epoch == 0 else len(first)
        enable = None if show else False
        ticks = progress(range(count), desc=status(), unit="batch", enable=enable, min_items=1)
        try:
            for _, batch in zip(ticks, items, strict=False):
                if epoch == 0:
                    first.append(batch)
                yield batch
        finally:
            close = getattr(ticks, "close", None)
            if callable(close):
                close()  # the bar ends with the pass, or when EVA stops inside it
        if not first:
            return


def fit(
    model: nn.Module,
    run: Run,
    dataloader: Any,
    step: Callable[[Any], tuple[Any, Any]],
    forward_fn: ForwardFn,
    show: bool,
) -> dict[str, int]:
    """Forward batches until every layer's first ``rank`` components converged; the ranks."""
    ranks = dict(run.max_components)
    done = dict.fromkeys(run.hooks, False)
    handles: dict[str, RemovableHandle] = {}
    for name, hook in run.hooks.items():
        handles[name] = run.modules[name].register_forward_hook(hook)

    def status() -> str:
        return f"EVA: {sum(done.values())}/{len(done)} layers converged"

    try:
        for batch in _cycled(dataloader, show, status):
            inputs, model_input = step(batch)
            for name, hook in run.hooks.items():
                now = bool(torch.all(hook.converged[: ranks[name]]))
                if not done[name] and now:  # converged: its fit is frozen from here on
                    handles.pop(name).remove()
                    done[name] = True
                    continue
                if done[name] and not now:  # its rank grew into unconverged components
                    handles[name] = run.modules[name].register_forward_hook(hook)
                    done[name] = False
                hook.model_input = model_input
            if all(done.values()):
                return ranks
            forward_fn(model, inputs)
            if all(h.pca.components_ is not None for h in run.hooks.values()):
                ranks = _rank_distribution(run)
    finally:
        for handle in handles.values():
            handle.remove()
    raise _not_converged(run, ranks, len(dataloader))


def _not_converged(run: Run, ranks: dict[str, int], n_batches: int) -> ConfigError:
    unfit = [n for n, h in run.hooks.items() if h.pca.components_ is None]
    if unfit:
        return ConfigError(
            f"EVA: {unfit[:3]} ({len(unfit)} layers) never got as many tokens in one batch as "
            f"the components to fit ({run.hooks[unfit[0]].k} for {unfit[0]}): use larger "
            "batches, or lower rho (EvaConfig(rho=...)) or r"
        )
    moving = [n for n, h in run.hooks.items() if not torch.all(h.converged[: ranks[n]])]
    return ConfigError(
        f"EVA did not converge in {MAX_EPOCHS} passes over the {n_batches} batches of the "
        f"dataloader: the components of {moving[:3]} ({len(moving)} layers) still change "
        f"(cosine similarity < tau={run.tau}); lower tau (EvaConfig(tau=...)) or give more data"
    )


def components(run: Run, ranks: dict[str, int], whiten: bool) -> dict[str, torch.Tensor]:
    """Each layer's top ``rank`` components (float64; ``whiten``: divided by √singular value)."""
    out: dict[str, torch.Tensor] = {}
    for name, rank in ranks.items():
        hook = run.hooks[run.layer_hook_map[name]]
        if not torch.all(hook.converged[:rank]):
            raise AdapterStateError(
                f"EVA assigned {name} rank {rank} before its components converged (a bug in "
                "adapt: please report it)"
            )
        u = cast(torch.Tensor, hook.pca.components_)[:rank].clone()
        if whiten:
            u = u / cast(torch.Tensor, hook.pca.singular_values_)[:rank].sqrt().reshape(-1, 1)
        out[name] = u
    return out
