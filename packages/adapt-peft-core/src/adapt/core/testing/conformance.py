"""The conformance kit: :func:`check_layer` runs the checks of :mod:`.checks` on a layer
class, in order, and reports each one in words (:class:`ConformanceReport`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable

import torch
from torch import nn

from ..backends import declared_error
from ..config import AdapterConfig
from ..layer import AdapterLayer
from ..model import AdaptedModel
from . import checks
from .asserts import forward_no_grad
from .checks import Subject
from .models import SingleTargetModel, randomise_adapter
from .registries import registered_first


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


class _Runner:
    """Runs one check at a time into the report; after a failure it unmerges the model (once
    there is one), so that one failure does not cascade into the next checks."""

    def __init__(self, report: ConformanceReport) -> None:
        self.report = report
        self.model: AdaptedModel | None = None

    def fail(self, name: str, exc: Exception) -> None:
        self.report.failed.append((name, f"{type(exc).__name__}: {exc}".strip()))
        if self.model is not None:
            with contextlib.suppress(Exception):
                self.model.unmerge_adapter()

    def run(self, name: str, check: Callable[[], None]) -> bool:
        try:
            check()
        except Exception as exc:
            self.fail(name, exc)
            return False
        self.report.passed.append(name)
        return True

    def check(self, name: str, check: Callable[[Subject], None], subject: Subject) -> bool:
        """:meth:`run` ``check(subject)``."""
        return self.run(name, functools.partial(check, subject))

    def skip(self, name: str, why: str) -> None:
        self.report.skipped.append((name, why))


def check_layer(
    layer_cls: type[AdapterLayer],
    make_base: Callable[[], nn.Module],
    config: AdapterConfig,
    *,
    make_input: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]] | None = None,
    identity_at_init: bool = True,
    atol: float = 1e-5,
    rtol: float | None = None,
    raise_on_failure: bool = True,
    tmp_dir: str | None = None,
) -> ConformanceReport:
    """Check that an adapter-layer class honours adapt's layer protocol.

    ``make_base()`` returns a fresh base module of the type the class serves, the same weights
    every call (seed inside it); ``config`` is a config of the layer's method (its
    ``target_modules`` is replaced by the module under test); ``make_input()`` returns a batch
    of at least three samples for the base module (default: ``torch.randn(4, in_features)``;
    a tuple for a layer class with ``takes_all_inputs``, each item batched along dim 0).
    ``identity_at_init=False`` documents a method whose new adapter changes the output.

    Checks, each reported in words (see :mod:`.checks`): building, identity, trainability,
    key names, the weight's shape, one and several adapters, merge round trip, disabling,
    mixed batches, save/load, deletion. On a lossy (quantised) backend, outputs after a merge
    and restored weights are held to a relative (Frobenius) error ``rtol`` instead: by default
    twice the backend's declared ``max_rel_error`` (a merge and an unmerge each requantise).

    Raises ``AssertionError`` with the report when a check fails (unless
    ``raise_on_failure=False``); returns the :class:`ConformanceReport`.
    """
    report = ConformanceReport(layer=layer_name(layer_cls))
    cfg = dataclasses.replace(config, target_modules=["target"], inference_mode=False)
    other_cfg = dataclasses.replace(cfg, inference_mode=True)
    runner = _Runner(report)
    with registered_first(layer_cls, f"conformance:{report.layer}"):
        # eval mode: dropout would make every comparison below random
        host = SingleTargetModel(make_base()).eval()
        base_copy = SingleTargetModel(make_base()).eval()
        try:
            model, layer = checks.build(host, cfg, layer_cls)
        except Exception as exc:
            runner.fail(checks.BUILD, exc)
            return _finish(report, raise_on_failure)
        report.passed.append(checks.BUILD)
        runner.model = model
        x = make_input() if make_input is not None else _default_input(layer.in_features)
        subject = Subject(
            model=model,
            layer=layer,
            x=x,
            base_out=forward_no_grad(base_copy, x),
            other_cfg=other_cfg,
            make_base=make_base,
            atol=atol,
            tmp_dir=tmp_dir,
            rtol=_lossy_rtol(layer, rtol),
        )
        _run_checks(runner, subject, identity_at_init)
    return _finish(report, raise_on_failure)


def layer_name(layer_cls: type[AdapterLayer]) -> str:
    """``module.QualifiedName`` of ``layer_cls``, as the report shows it. The kit's own classes
    are named by the package users import them from (``adapt.core.testing.ToyLayer``), not by
    the kit's module that defines them."""
    package = __name__.rpartition(".")[0]
    public = sys.modules.get(package)
    if layer_cls.__module__.startswith(f"{package}.") and (
        getattr(public, layer_cls.__qualname__, None) is layer_cls
    ):
        return f"{package}.{layer_cls.__qualname__}"
    return f"{layer_cls.__module__}.{layer_cls.__qualname__}"


def _lossy_rtol(layer: AdapterLayer, rtol: float | None) -> float:
    if rtol is not None:
        return rtol
    if not layer.backend.lossy:
        return 0.0
    declared = declared_error(layer.backend)
    if declared is None:
        raise AssertionError(
            f"{type(layer.backend).__name__} is lossy but declares no max_rel_error; declare it "
            "(see check_backend) or pass rtol= to check_layer"
        )
    return 2 * declared


def _default_input(in_features: int) -> torch.Tensor:
    return torch.randn(4, in_features, generator=torch.Generator().manual_seed(0))


def _run_checks(runner: _Runner, s: Subject, identity_at_init: bool) -> None:
    """Every check after :data:`~.checks.BUILD`, in order."""
    if identity_at_init:
        runner.check(checks.IDENTITY, checks.identity, s)
    else:
        runner.skip(checks.IDENTITY, "documented as not")
    randomise_adapter(s.layer, "default", seed=1)
    runner.check(checks.TRAINABLE, checks.trainable, s)
    runner.check(checks.NAMES, checks.names, s)
    # merging is the layer's own (not W + ΔW) when its merge hooks are overridden and in use
    # (LoRA layers route to a variant's merge only for adapters that have one)
    own_merge = s.layer.merge_depends_on_weight()
    shape_check = checks.MERGED_SHAPE if own_merge else checks.DELTA_SHAPE
    runner.check(shape_check, checks.delta_shape, s)
    runner.check(checks.FORWARD_ONE, checks.forward_one, s)
    runner.check(checks.MERGE, checks.merge, s)
    has_other = runner.check(checks.SEVERAL, checks.several, s)
    runner.check(checks.DISABLED, checks.disabled, s)
    if has_other and checks.batch_size(s.x) >= 3:
        runner.check(checks.MIXED, checks.mixed, s)
    elif not has_other:
        runner.skip(checks.MIXED_SKIPPED, "the second adapter failed (see above)")
    else:
        runner.skip(checks.MIXED_SKIPPED, "make_input() gave fewer than 3 samples")
    runner.check(checks.ROUND_TRIP, checks.round_trip, s)
    runner.check(checks.DELETE, checks.delete, s)


def _finish(report: ConformanceReport, raise_on_failure: bool) -> ConformanceReport:
    if raise_on_failure and not report.ok:
        raise AssertionError(str(report))
    return report
