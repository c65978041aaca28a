"""Test kit for adapt and its plugins: a toy method and reusable assertions.

Core's own tests use it so that ``adapt.core`` is tested without any method package; plugin
authors can use it to check that their layers honour the layer protocol.

* :class:`ToyConfig`, :class:`ToyLayer`, :class:`ToyMethod`: the smallest complete method.
  ``ToyLayer`` wraps ``nn.Linear`` with ``ΔW = B @ A`` (``toy_A``: r × in, ``toy_B``:
  out × r); B starts at zero, so a new adapter is the identity, unless
  ``init_identity=False``.
* :func:`registered_toy` registers the toy method and layer in-process (for a ``with``
  block or a pytest fixture) and unregisters them afterwards.
* :func:`isolated_registry` swaps the process-wide registry for an empty one that ignores
  installed entry points, so a test sees only what it registers.
* :func:`assert_merge_roundtrip` and :func:`assert_mixed_batch_matches` check the merge
  protocol and mixed-batch routing of any :class:`~adapt.core.AdaptedModel`.

Example, as pytest fixtures::

    import pytest
    from adapt.core.testing import isolated_registry, registered_toy


    @pytest.fixture(autouse=True)
    def toy():
        with isolated_registry(), registered_toy() as method:
            yield method
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from . import registry as _registry_module
from .config import AdapterConfig
from .errors import ConfigError
from .layer import AdapterLayer, adapter_dtype_device
from .method import Method
from .model import AdaptedModel
from .registry import GROUP_LAYERS, GROUP_METHODS, GROUPS, Registry, get_registry
from .routing import BASE

__all__ = [
    "TOY_LAYER_NAME",
    "TOY_METHOD_NAME",
    "ConformanceReport",
    "ToyConfig",
    "ToyLayer",
    "ToyMethod",
    "assert_merge_roundtrip",
    "assert_mixed_batch_matches",
    "check_layer",
    "isolated_registry",
    "output_tensor",
    "registered_toy",
]

#: Registry names :func:`registered_toy` uses.
TOY_METHOD_NAME = "toy"
TOY_LAYER_NAME = "toy-linear"

_TOY_BIAS = ("none", "all", "adapter_only")


@dataclasses.dataclass
class ToyConfig(AdapterConfig):
    """Config of the toy method (``peft_type`` ``"TOY"``).

    * ``r``: rank of ``A`` (r × in) and ``B`` (out × r);
    * ``init_identity``: start with ``B = 0`` (the adapter changes nothing) when True,
      random ``B`` otherwise;
    * ``bias``: ``"none"``, ``"all"`` or ``"adapter_only"`` (which base biases train).
    """

    peft_type: ClassVar[str] = "TOY"

    r: int = 2
    init_identity: bool = True
    bias: str = "none"

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self._check_number(name, "r", self.r, kind=int, low=1)
        if not isinstance(self.init_identity, bool):
            raise ConfigError(
                f"{name}.init_identity must be true or false, got {self.init_identity!r}"
            )
        if self.bias not in _TOY_BIAS:
            raise ConfigError(f"{name}.bias must be one of {list(_TOY_BIAS)}, got {self.bias!r}")


class ToyLayer(AdapterLayer):
    """Toy adapter on ``nn.Linear``: ``out = base(x) + x @ Aᵀ @ Bᵀ``, ``ΔW = B @ A``."""

    method: ClassVar[str] = TOY_METHOD_NAME
    base_types: ClassVar[tuple[type | str, ...]] = (nn.Linear,)
    adapter_layer_names: ClassVar[tuple[str, ...]] = ("toy_A", "toy_B")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.toy_A = nn.ParameterDict()
        self.toy_B = nn.ParameterDict()
        self.r: dict[str, int] = {}

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Create ``toy_A[adapter_name]`` (random) and ``toy_B[adapter_name]`` (zero when
        ``config.init_identity``). ``r=`` in ``kwargs`` overrides ``config.r``."""
        r = kwargs.get("r", config.r)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ConfigError(f"toy rank must be a positive integer, got r={r!r}")
        dtype, device = adapter_dtype_device(self)
        weight_a = torch.randn(r, self.in_features, dtype=dtype, device=device)
        weight_a /= math.sqrt(self.in_features)
        if config.init_identity:
            weight_b = torch.zeros(self.out_features, r, dtype=dtype, device=device)
        else:
            weight_b = torch.randn(self.out_features, r, dtype=dtype, device=device) / math.sqrt(r)
        self.toy_A[adapter_name] = nn.Parameter(weight_a)
        self.toy_B[adapter_name] = nn.Parameter(weight_b)
        self.r[adapter_name] = r

    def adapter_output(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        weight_a = self.toy_A[adapter_name]
        weight_b = self.toy_B[adapter_name]
        out: torch.Tensor = x.to(weight_a.dtype) @ weight_a.T @ weight_b.T
        return out

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta: torch.Tensor = self.toy_B[adapter_name] @ self.toy_A[adapter_name]
        return delta

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.r.pop(adapter_name, None)


class ToyMethod(Method):
    """The toy method object (what a method package publishes under ``adapt.methods``)."""

    name: ClassVar[str] = TOY_METHOD_NAME
    peft_type: ClassVar[str] = "TOY"
    package: ClassVar[str] = "adapt-peft-core"
    config_class: ClassVar[type[AdapterConfig]] = ToyConfig


@contextlib.contextmanager
def registered_toy(
    registry: Registry | None = None,
    *,
    method: Method | None = None,
    layer: type[AdapterLayer] = ToyLayer,
) -> Iterator[Method]:
    """Register the toy method and layer in ``registry`` (default: the process-wide one)
    for the duration of the block; yields the method object.

    ``method`` and ``layer`` replace the toy ones (e.g. a subclass whose hooks fail); they
    are registered under the same names, :data:`TOY_METHOD_NAME` and :data:`TOY_LAYER_NAME`.
    """
    reg = registry if registry is not None else get_registry()
    obj = method if method is not None else ToyMethod()
    reg.register_method(obj, name=TOY_METHOD_NAME)
    reg.register_layer(layer, name=TOY_LAYER_NAME)
    try:
        yield obj
    finally:
        reg.unregister(GROUP_LAYERS, TOY_LAYER_NAME)
        reg.unregister(GROUP_METHODS, TOY_METHOD_NAME)


@contextlib.contextmanager
def isolated_registry() -> Iterator[Registry]:
    """Replace the process-wide registry with an empty one for the duration of the block.

    The replacement never reads entry points, so installed plugins (working or broken) are
    invisible; only in-process registrations count. The previous registry is restored after.
    """
    fresh = Registry()
    for group in GROUPS:
        fresh._groups[group].scanned = True
    previous = _registry_module.swap_registry(fresh)
    try:
        yield fresh
    finally:
        _registry_module.swap_registry(previous)


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output: the tensor itself, ``.logits``, or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Sequence) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


def _call(model: nn.Module, batch: Any, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(batch, Mapping):
            return output_tensor(model(**batch, **kwargs)).detach().clone()
        return output_tensor(model(batch, **kwargs)).detach().clone()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    diff = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    if not diff <= atol:
        raise AssertionError(f"{what}: max abs difference {diff:.3g} exceeds atol={atol:g}")


def assert_merge_roundtrip(
    model: AdaptedModel,
    batch_fn: Callable[[], Any],
    atol: float = 1e-5,
    *,
    adapter_names: Sequence[str] | None = None,
) -> None:
    """Check the merge protocol on ``model``, whose adapters must all be unmerged.

    * the merged model gives the unmerged output (``batch_fn()`` is a tensor passed
      positionally, or a mapping passed as keyword arguments);
    * ``unmerge_adapter()`` restores every base weight to within ``atol``, and the
      output with it.

    Adapters ``adapter_names`` (default: the active ones) are merged. The model is left
    unmerged.
    """
    for path, layer in model.adapter_layers():
        if layer.merged:
            raise AssertionError(f"{path} is already merged; unmerge it before the round trip")
    batch = batch_fn()
    before = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    unmerged = _call(model, batch)
    model.merge_adapter(adapter_names)
    if not any(layer.merged for _, layer in model.adapter_layers()):
        raise AssertionError("merge_adapter() merged no layer")
    merged = _call(model, batch)
    _assert_close(merged, unmerged, atol, "merged output vs unmerged output")
    model.unmerge_adapter()
    for path, layer in model.adapter_layers():
        if layer.merged:
            raise AssertionError(f"{path} is still merged after unmerge_adapter()")
    after = model.model.state_dict()
    if set(after) != set(before):
        raise AssertionError(
            f"unmerge changed the state-dict keys: {sorted(set(after) ^ set(before))[:5]}"
        )
    for key, value in before.items():
        if value.is_floating_point():
            _assert_close(after[key], value, atol, f"{key} after merge→unmerge")
        elif not torch.equal(after[key], value):
            raise AssertionError(f"{key} changed after merge→unmerge")
    _assert_close(_call(model, batch), unmerged, atol, "output after merge→unmerge")


def _select(batch: Any, index: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[index : index + 1]
    if isinstance(batch, Mapping):
        return {
            k: v[index : index + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }
    raise TypeError(f"cannot split a batch of type {type(batch).__name__} into samples")


def assert_mixed_batch_matches(
    model: AdaptedModel,
    batch: Any,
    adapter_names: Sequence[str],
    atol: float = 1e-5,
) -> None:
    """Check that ``model(batch, adapter_names=...)`` equals, sample by sample, the output of
    the model with only that sample's adapter active (``"__base__"``: adapters disabled).

    The active adapters are restored afterwards.
    """
    mixed = _call(model, batch, adapter_names=list(adapter_names))
    previous = list(model.active_adapters)
    try:
        for i, name in enumerate(adapter_names):
            sample = _select(batch, i)
            if name == BASE:
                with model.disable_adapter():
                    expected = _call(model, sample)
            else:
                model.set_adapter(name)
                expected = _call(model, sample)
            _assert_close(mixed[i : i + 1], expected, atol, f"sample {i} (adapter {name!r})")
    finally:
        if previous:
            model.set_adapter(previous)


# ----------------------------------------------------------------------------- conformance kit


@dataclasses.dataclass
class ConformanceReport:
    """What :func:`check_layer` found: each check passed, failed (with why) or skipped."""

    layer: str
    passed: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        lines = [f"adapt conformance of {self.layer}: {len(self.passed)} passed, "
                 f"{len(self.failed)} failed, {len(self.skipped)} skipped"]  # fmt: skip
        lines += [f"  PASS  {name}" for name in self.passed]
        lines += [f"  FAIL  {name}: {why}" for name, why in self.failed]
        lines += [f"  SKIP  {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


class _Host(nn.Module):
    """A one-module model: ``target`` is the base module under test."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: Any) -> Any:
        return self.target(x)


def _randomise(layer: AdapterLayer, adapter_name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tensor in sorted(layer.adapter_tensors(adapter_name).items()):
            if tensor.is_floating_point() and isinstance(tensor, nn.Parameter):
                noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
                tensor.copy_((noise * 0.1).to(tensor.dtype))


@contextlib.contextmanager
def _registered(layer_cls: type[AdapterLayer]) -> Iterator[str]:
    """Register ``layer_cls`` above every other layer for the duration of the block."""
    reg = get_registry()
    name = f"conformance:{layer_cls.__module__}.{layer_cls.__qualname__}"
    reg.register_layer(layer_cls, name=name, priority=10**6)
    try:
        yield name
    finally:
        reg.unregister(GROUP_LAYERS, name)


def check_layer(
    layer_cls: type[AdapterLayer],
    make_base: Callable[[], nn.Module],
    config: AdapterConfig,
    *,
    make_input: Callable[[], torch.Tensor] | None = None,
    identity_at_init: bool = True,
    atol: float = 1e-5,
    raise_on_failure: bool = True,
    tmp_dir: str | None = None,
) -> ConformanceReport:
    """Check that an adapter-layer class honours adapt's layer protocol.

    ``make_base()`` returns a fresh base module of the type the class serves, the same weights
    every call (seed inside it); ``config`` is a config of the layer's method (its
    ``target_modules`` is replaced by the module under test); ``make_input()`` returns a batch
    of at least three samples for the base module (default: ``torch.randn(4, in_features)``).
    ``identity_at_init=False`` documents a method whose new adapter changes the output.

    Checks, each reported in words: the registry picks the class; a new adapter is the
    identity; only the adapter's tensors are trainable and they get gradients; state-dict
    names follow the checkpoint convention; ``delta_weight`` has the weight's shape; forward
    with one and with several adapters; ``disable_adapter``; a mixed batch; merged output equals
    unmerged and merge→unmerge restores the weight; save/load round trip; ``delete_adapter``.

    Raises ``AssertionError`` with the report when a check fails (unless
    ``raise_on_failure=False``); returns the :class:`ConformanceReport`.
    """
    import tempfile

    report = ConformanceReport(layer=f"{layer_cls.__module__}.{layer_cls.__qualname__}")
    cfg = dataclasses.replace(config, target_modules=["target"], inference_mode=False)
    other_cfg = dataclasses.replace(cfg, inference_mode=True)

    holder: dict[str, Any] = {}

    def run(name: str, check: Callable[[], None]) -> bool:
        try:
            check()
        except Exception as exc:
            report.failed.append((name, f"{type(exc).__name__}: {exc}".strip()))
            # leave the model unmerged so one failure does not cascade into the next checks
            if "model" in holder:
                with contextlib.suppress(Exception):
                    holder["model"].unmerge_adapter()
            return False
        report.passed.append(name)
        return True

    with _registered(layer_cls):
        # eval mode: dropout would make every comparison below random
        host = _Host(make_base()).eval()
        base_copy = _Host(make_base()).eval()

        def build() -> None:
            model = AdaptedModel(host, cfg, "default", is_trainable=True)
            model.eval()
            layer = model.model.target
            if type(layer) is not layer_cls:
                raise AssertionError(
                    f"the registry wrapped the base module in {type(layer).__name__}, not "
                    f"{layer_cls.__name__} (check `method` and `base_types`)"
                )
            holder["model"], holder["layer"] = model, layer

        if not run("the registry picks the layer class for the base module", build):
            return _finish(report, raise_on_failure)
        model: AdaptedModel = holder["model"]
        layer: AdapterLayer = holder["layer"]
        if make_input is None:
            n_in = layer.in_features

            def make_input() -> torch.Tensor:
                return torch.randn(4, n_in, generator=torch.Generator().manual_seed(0))

        x = make_input()
        base_out = _call(base_copy, x)

        def identity() -> None:
            _assert_close(_call(model, x), base_out, atol, "output of a new adapter vs base")

        if identity_at_init:
            run("a new adapter starts as the identity", identity)
        else:
            report.skipped.append(("a new adapter starts as the identity", "documented as not"))
        _randomise(layer, "default", seed=1)

        def trainable() -> None:
            own = {id(t) for t in layer.adapter_tensors("default").values()}
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if not params:
                raise AssertionError("no parameter is trainable after adapt()")
            strangers = [n for n, p in params if id(p) not in own]
            if strangers:
                raise AssertionError(f"trainable parameters outside the adapter: {strangers}")
            model.zero_grad()
            out = model(x)
            loss = output_tensor(out).float().pow(2).mean()
            torch.autograd.backward(loss)
            missing = [n for n, p in params if p.grad is None]
            if missing:
                raise AssertionError(f"adapter parameters without a gradient: {missing}")
            model.zero_grad()

        run("only the adapter's tensors are trainable, and they get gradients", trainable)

        def names() -> None:
            keys = list(model.adapter_state_dict("default", include_shared=False))
            if not keys:
                raise AssertionError("adapter_state_dict() is empty")
            for key in keys:
                if not key.startswith("base_model.model.target."):
                    raise AssertionError(f"{key!r} does not start with 'base_model.model.target.'")
                suffix = key.removeprefix("base_model.model.target.")
                if suffix.split(".")[0] not in layer.adapter_layer_names:
                    raise AssertionError(
                        f"{key!r}: {suffix.split('.')[0]!r} is not in the class's "
                        f"adapter_layer_names {layer.adapter_layer_names}"
                    )
                if ".default" in f".{suffix}":
                    raise AssertionError(f"{key!r} contains the adapter name; PEFT keys do not")

        run("state-dict names follow the checkpoint convention", names)

        def delta_shape() -> None:
            weight = layer.backend.get_weight(layer.base_layer)
            delta = layer.delta_weight("default")
            if tuple(delta.shape) != tuple(weight.shape):
                raise AssertionError(
                    f"delta_weight has shape {tuple(delta.shape)}, the base weight (canonical "
                    f"layout) {tuple(weight.shape)}"
                )

        run("delta_weight has the base weight's shape", delta_shape)

        def forward_one() -> None:
            out = _call(model, x)
            diff = (out - base_out).abs().max().item()
            if not diff > atol:
                raise AssertionError("a randomised adapter does not change the output")

        run("forward with one adapter changes the output", forward_one)
        run(
            "merged output equals unmerged, merge→unmerge restores the weight",
            lambda: assert_merge_roundtrip(model, lambda: x, atol),
        )

        def several() -> None:
            # a second adapter for inference (methods such as AdaLoRA train one at a time)
            model.add_adapter("other", other_cfg)
            _randomise(layer, "other", seed=2)
            model.set_adapter("default")
            one = _call(model, x)
            model.set_adapter(["default", "other"])
            both = _call(model, x)
            if not (both - one).abs().max().item() > atol:
                raise AssertionError("a second active adapter does not change the output")
            assert_merge_roundtrip(model, lambda: x, atol)
            model.set_adapter("default")

        has_other = run("forward with several adapters (and their merge)", several)

        def disabled() -> None:
            with model.disable_adapter():
                _assert_close(_call(model, x), base_out, atol, "output inside disable_adapter()")
            if not (_call(model, x) - base_out).abs().max().item() > atol:
                raise AssertionError("the adapter stays off after disable_adapter() exits")

        run("disable_adapter() gives the base output", disabled)

        if has_other and x.shape[0] >= 3:
            routing = ["default", "other", BASE] * (x.shape[0] // 3 + 1)
            run(
                "a mixed batch routes each sample to its adapter",
                lambda: assert_mixed_batch_matches(model, x, routing[: x.shape[0]], atol),
            )
        elif not has_other:
            report.skipped.append(("a mixed batch", "the second adapter failed (see above)"))
        else:
            report.skipped.append(("a mixed batch", "make_input() gave fewer than 3 samples"))

        def round_trip() -> None:
            model.set_adapter("default")
            want = _call(model, x)
            with tempfile.TemporaryDirectory(dir=tmp_dir) as folder:
                model.save_pretrained(folder, selected_adapters=["default"])
                loaded = AdaptedModel.from_pretrained(_Host(make_base()), folder).eval()
                _assert_close(_call(loaded, x), want, atol, "output after save/load")

        run("save_pretrained → from_pretrained gives the same output", round_trip)

        def delete() -> None:
            if "other" not in model.peft_config:
                model.add_adapter("other", other_cfg)
            model.delete_adapter("other")
            if "other" in layer.adapter_names:
                raise AssertionError("the layer still lists 'other' after delete_adapter")
            left = [
                k for k, _ in layer.named_parameters() if ".other" in f".{k}" or k.endswith("other")
            ]
            if left:
                raise AssertionError(f"tensors of the deleted adapter remain: {left}")

        run("delete_adapter removes the adapter's tensors", delete)
    return _finish(report, raise_on_failure)


def _finish(report: ConformanceReport, raise_on_failure: bool) -> ConformanceReport:
    if raise_on_failure and not report.ok:
        raise AssertionError(str(report))
    return report
