"""The conformance kit for weight backends: :func:`check_backend` runs each check of the
backend protocol on a module it serves and reports it in words, as :func:`check_layer` does
for layers."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..backends import WeightBackend, backend_supports, declared_error, resolve_backend
from ..merge import MergeReport
from .conformance import ConformanceReport, _finish, _Runner

SERVES = "the registry picks the backend for the module, and supports() accepts it"
SHAPE = "shape() matches the weight get_weight() returns"
DTYPE = "get_weight() is a floating tensor on the module's device; compute_dtype() is floating"
DECLARED = "a lossy backend declares max_rel_error"
ROUND_TRIP = "writing back the weight it read stays within max_rel_error"
WRITE = "a changed weight is stored within max_rel_error"
REPORT = "the MergeReport is not below the measured error"
KEEPS = "writing keeps the module's type, weight type, device and dtype"

#: slack for float round-off on top of a declared bound
_SLACK = 1e-6


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _serves(backend: WeightBackend, module: nn.Module) -> None:
    if not backend_supports(backend, module):
        raise AssertionError(f"{type(backend).__name__}.supports() refuses the module")
    found = resolve_backend(module)
    if found is None or type(found) is not type(backend):
        raise AssertionError(
            f"the registry resolves {type(found).__name__ if found else None} for the module, "
            f"not {type(backend).__name__} (is the backend installed or registered?)"
        )


def _shape(backend: WeightBackend, module: nn.Module) -> None:
    n_in, n_out = backend.shape(module)
    weight = backend.get_weight(module)
    first = tuple(weight.shape[:2])
    # (out, in) for linear layers, (num_embeddings, dim) for embeddings, (out, in/groups, *k)
    ok = weight.dim() >= 2 and (
        first in ((n_out, n_in), (n_in, n_out)) or (first[0] == n_out and n_in % first[1] == 0)
    )
    if not ok:
        raise AssertionError(
            f"get_weight() has shape {tuple(weight.shape)}, shape() (in, out) = {(n_in, n_out)}: "
            "the canonical layout is (out, in) (embeddings (num_embeddings, dim), convolutions "
            "(out, in/groups, *kernel))"
        )


def _dtype(backend: WeightBackend, module: nn.Module) -> None:
    weight = backend.get_weight(module)
    if not weight.is_floating_point():
        raise AssertionError(f"get_weight() returned a {weight.dtype} tensor")
    devices = {t.device for t in module.parameters()} | {t.device for t in module.buffers()}
    if devices and weight.device not in devices:
        raise AssertionError(f"get_weight() is on {weight.device}, the module on {devices}")
    if not backend.compute_dtype(module).is_floating_point:
        raise AssertionError(f"compute_dtype() is {backend.compute_dtype(module)}")


def _declared(backend: WeightBackend) -> None:
    if declared_error(backend) is None:
        raise AssertionError(
            f"{type(backend).__name__} is lossy but declares no max_rel_error (the relative "
            "error writing a weight may introduce)"
        )


class _Writes:
    """What the write checks share: the bound and the measured errors."""

    def __init__(self, backend: WeightBackend, module: nn.Module) -> None:
        self.backend, self.module = backend, module
        self.bound = (declared_error(backend) or 0.0) + _SLACK
        self.reports: list[tuple[MergeReport, float]] = []

    def _write(self, wanted: torch.Tensor) -> float:
        report = self.backend.set_weight(self.module, wanted)
        stored = self.backend.get_weight(self.module)
        error = _rel(stored, wanted)
        self.reports.append((report, error))
        if error > self.bound:
            raise AssertionError(
                f"stored weight is {error:.3g} (relative) from the one written; the backend "
                f"declares max_rel_error={declared_error(self.backend)}"
            )
        return error

    def round_trip(self) -> None:
        self._write(self.backend.get_weight(self.module).detach().clone())

    def changed(self) -> None:
        stored = self.backend.get_weight(self.module).detach()
        weight = stored.float()
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(weight.shape, generator=gen) * weight.std() * 0.1
        self._write((weight + noise.to(weight.device)).to(stored.dtype))

    def report(self) -> None:
        if not self.reports:
            raise AssertionError("no write was measured (see the checks above)")
        for report, error in self.reports:
            if not isinstance(report, MergeReport):
                raise AssertionError(
                    f"set_weight returned {type(report).__name__}, not MergeReport"
                )
            if error > 0 and report.rel_error < error * 0.999 - _SLACK:
                raise AssertionError(
                    f"set_weight reported rel_error={report.rel_error:.3g}, but the stored weight "
                    f"is {error:.3g} from the one written"
                )
            if error > 0 and not report.lossy:
                raise AssertionError("set_weight lost precision but reported lossy=False")


def _keeps(backend: WeightBackend, make_module: Callable[[], nn.Module]) -> None:
    module = make_module()
    before = (type(module), type(getattr(module, "weight", None)))
    weight = backend.get_weight(module)
    backend.set_weight(module, weight.detach().clone())
    after = (type(module), type(getattr(module, "weight", None)))
    if after != before:
        raise AssertionError(f"writing changed the module/weight types {before} to {after}")
    again = backend.get_weight(module)
    if (again.device, again.dtype) != (weight.device, weight.dtype):
        raise AssertionError(
            f"get_weight() gave {weight.dtype} on {weight.device}, after a write "
            f"{again.dtype} on {again.device}"
        )


def check_backend(
    backend: WeightBackend,
    make_module: Callable[[], nn.Module],
    *,
    raise_on_failure: bool = True,
) -> ConformanceReport:
    """Check that ``backend`` honours the weight-backend protocol on the module
    ``make_module()`` builds (a fresh one, the same weights every call: seed inside it).

    Checks, each reported in words: the registry resolves the backend for the module (so it
    must be installed or registered) and ``supports()`` accepts it; ``shape()`` matches the
    canonical ``(out, in)`` weight; dtypes and device; a lossy backend declares
    ``max_rel_error``; writing back the weight it read, and a changed weight, store it within
    that bound (exactly, for a lossless backend); the returned :class:`MergeReport` is not
    below the measured error; writing keeps the module's and the weight's types, device, dtype.

    Raises ``AssertionError`` with the report when a check fails (unless
    ``raise_on_failure=False``); returns the :class:`ConformanceReport`.
    """
    report = ConformanceReport(layer=f"{type(backend).__module__}.{type(backend).__qualname__}")
    runner = _Runner(report)
    module = make_module()
    runner.run(SERVES, functools.partial(_serves, backend, module))
    runner.run(SHAPE, functools.partial(_shape, backend, module))
    runner.run(DTYPE, functools.partial(_dtype, backend, module))
    if backend.lossy:
        runner.run(DECLARED, functools.partial(_declared, backend))
    writes = _Writes(backend, module)
    runner.run(ROUND_TRIP, writes.round_trip)
    runner.run(WRITE, writes.changed)
    runner.run(REPORT, writes.report)
    runner.run(KEEPS, functools.partial(_keeps, backend, make_module))
    return _finish(report, raise_on_failure)
