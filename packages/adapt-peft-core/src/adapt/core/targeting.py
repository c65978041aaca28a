"""Which modules of a model a config targets.

* a list of names matches a module path by suffix at a dot boundary (``"q_proj"`` matches
  ``model.layers.0.self_attn.q_proj``, ``"self_attn.q_proj"`` too, ``"proj"`` does not);
* a string is a regular expression that must match the whole path;
* ``"all-linear"`` is every linear layer (``nn.Linear``, transformers ``Conv1D`` and their
  subclasses, quantised linears included) except the model's output head;
* no ``target_modules`` at all means the method's default for the transformers model type
  (:attr:`adapt.core.Method.default_target_modules`), as in PEFT.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from .errors import TargetError
from .typenames import CONV1D_TRANSFORMERS, type_names

ALL_LINEAR = "all-linear"
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def _by_names(groups: dict[tuple[str, ...], tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {model_type: names for names, types in groups.items() for model_type in types}


#: What PEFT adapts for LoRA when a config names no target modules, by transformers
#: ``model_type``: the attention's query and value projections, or the fused projection that
#: holds them (phi also its MLP). Checkpoints then list these names, as PEFT's do.
QUERY_VALUE_TARGETS: dict[str, tuple[str, ...]] = _by_names(
    {
        ("q_proj", "v_proj"): (
            "bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral",
            "stablelm", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
        ),
        ("query", "value"): ("bert", "roberta", "xlm-roberta", "electra", "layoutlm"),
        ("q", "v"): ("t5", "mt5"),
        ("query_key_value",): (
            "bloom", "gpt_neox", "chatglm", "falcon", "RefinedWeb", "RefinedWebModel",
        ),
        ("c_attn",): ("gpt2", "gpt_bigcode"),
        ("query_proj", "value_proj"): ("deberta-v2",),
        ("in_proj",): ("deberta",),
        ("Wqkv",): ("mpt",),
        ("qkv_proj",): ("codegen",),
        ("c_proj", "c_attn"): ("btlm",),
        ("q", "v", "q_proj", "v_proj"): ("blip-2",),
        ("q_proj", "v_proj", "fc1", "fc2"): ("phi",),
    }
)  # fmt: skip


def model_type_of(model: nn.Module) -> str | None:
    """The transformers ``config.model_type`` of ``model`` (``None`` for other models)."""
    config = getattr(model, "config", None)
    model_type = (
        config.get("model_type")
        if isinstance(config, dict)
        else getattr(config, "model_type", None)
    )
    return model_type if isinstance(model_type, str) and model_type else None


def matches_name(path: str, names: str | Sequence[str]) -> bool:
    """Whether ``path`` matches a regex string (full match) or a list of suffix names."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or CONV1D_TRANSFORMERS in type_names(type(module))


def layer_index(path: str, patterns: str | Sequence[str] | None) -> int | None:
    """The layer index in ``path`` after a component named by ``patterns`` (``layers.3.``)."""
    pats = [patterns] if isinstance(patterns, str) else list(patterns or DEFAULT_LAYERS_PATTERNS)
    for pat in pats:
        m = re.search(rf"(?:^|\.){pat}\.(\d+)(?:\.|$)", path)
        if m:
            return int(m.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the model's output head (excluded from ``all-linear``)."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
    if head is not None:
        for path, module in model.named_modules():
            if module is head:
                names.add(path)
    if not names:
        for path, _ in model.named_modules():
            if path.split(".")[-1] in ("lm_head", "classifier", "score"):
                names.add(path)
    return names


def find_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip: tuple[type, ...] = (),
) -> list[str]:
    """Paths of the modules the config targets, in model order.

    Raises :class:`TargetError` naming the closest module names when nothing matches.
    """
    if target_modules is None:
        raise TargetError(
            "target_modules is not set; name the modules to adapt, e.g. "
            f"target_modules=['q_proj', 'v_proj'], or use '{ALL_LINEAR}'. "
            f"Modules in this model: {module_summary(model)}"
        )
    heads = output_head_names(model) if target_modules == ALL_LINEAR else set()
    wanted_layers: set[int] | None = None
    if layers_to_transform is not None:
        wanted_layers = (
            {layers_to_transform}
            if isinstance(layers_to_transform, int)
            else set(layers_to_transform)
        )
    found: list[str] = []
    inside_skip: list[str] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in inside_skip):
            continue
        probe = module
        if skip and isinstance(module, skip):
            # an already adapted module is matched by its own path, never its insides
            inside_skip.append(path)
            get_base = getattr(module, "get_base_layer", None)
            probe = get_base() if callable(get_base) else module
        if target_modules == ALL_LINEAR:
            hit = is_linear(probe) and path not in heads
        else:
            hit = matches_name(path, target_modules)
        if not hit:
            continue
        if exclude_modules is not None and matches_name(path, exclude_modules):
            continue
        if wanted_layers is not None:
            idx = layer_index(path, layers_pattern)
            if idx is None or idx not in wanted_layers:
                continue
        found.append(path)
    if not found:
        raise TargetError(_no_match_message(model, target_modules, layers_to_transform))
    return found


def module_summary(model: nn.Module, limit: int = 12) -> str:
    leaves = sorted(
        {p.split(".")[-1] for p, m in model.named_modules() if p and not list(m.children())}
    )
    text = ", ".join(leaves[:limit])
    return text + (", …" if len(leaves) > limit else "")


def close_names(asked: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """Candidates close to the last segment of each asked name (the one near-name hint)."""
    close: list[str] = []
    for name in asked:
        for cand in difflib.get_close_matches(name.split(".")[-1], candidates, n=3, cutoff=0.5):
            if cand not in close:
                close.append(cand)
    return close


def leaf_names(model: nn.Module) -> list[str]:
    """The last path segment of every module of ``model``, sorted, once each."""
    return sorted({p.split(".")[-1] for p, _ in model.named_modules() if p})


def names_hint(model: nn.Module, names: Sequence[str]) -> str:
    """ "did you mean [...]?" for ``names`` that matched no module, or some module names."""
    leaves = leaf_names(model)
    close = sorted(close_names(names, leaves))
    return f"did you mean {close}?" if close else f"module names in this model: {leaves[:12]}"


def _no_match_message(
    model: nn.Module,
    target_modules: str | Sequence[str],
    layers_to_transform: int | Sequence[int] | None,
) -> str:
    paths = [p for p, _ in model.named_modules() if p]
    leaves = sorted({p.split(".")[-1] for p in paths})
    asked = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    close = close_names(asked, leaves)
    msg = f"target_modules {target_modules!r} matched no module of {type(model).__name__}"
    if layers_to_transform is not None:
        msg += f" in layers {layers_to_transform!r}"
    if close:
        msg += f". Did you mean: {', '.join(repr(c) for c in close)}?"
    msg += f" Candidate module names: {module_summary(model)}"
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        msg += " (a string is a regular expression matched against the full module path)"
    return msg
