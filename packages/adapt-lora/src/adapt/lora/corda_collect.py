"""CorDA's calibration: the input covariance of each target (forward hooks), and the
safetensors files that cache covariances and decompositions (:func:`preprocess_corda`'s
``covariance_file`` / ``cache_file``).

Each forward call of a target contributes ``X̂ᵀX̂``, where ``X̂`` is the call's input divided by
``|max(X)|`` (the signed maximum's magnitude, as PEFT); the covariance is the mean over the
samples. PEFT takes the input's first dimension away only when it is 1, so it works with
batches of one sequence only (a batch of several fails in ``x.t()``). adapt takes a 3-D (or
higher) input as a batch: each sequence is one sample, scaled by its own maximum, so a batch of
B sequences gives what B calls with one sequence each give — PEFT's numbers exactly when the
batch size is 1. A 2-D input ``(tokens, features)`` is one sample, as in PEFT. Padding tokens
count like any other: for PEFT's numbers, calibrate on unpadded sequences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapt.core import CheckpointError, ConfigError, TargetError
from adapt.core.files import atomic_write

__all__ = [
    "CordaDecomposition",
    "CordaStatistics",
    "collect_covariances",
    "existing_file",
    "read_cache",
    "read_covariances",
    "sample_covariance",
    "write_cache",
    "write_covariances",
]

SUFFIX = ".safetensors"
_KEYS = ("S_WC", "U_WC", "V_WC")  # PEFT's cache keys: f"{name}.eigens.{key}"
_FORMAT = {"format": "adapt-corda"}


@dataclasses.dataclass
class CordaDecomposition:
    """What ``init_lora_weights="corda"`` takes from a module: the kept singular values ``s``
    (r,), ``u`` (out, r) and ``v`` (in, r) with ``W ≈ u·diag(s)·vᵀ`` on those directions, and
    the mode (``"ipm"``/``"kpm"``; None from a cache written without it)."""

    s: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    method: str | None

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])


@dataclasses.dataclass
class CordaStatistics:
    """A target's input covariance (the mean of ``X̂ᵀX̂`` over its samples) and the number of
    samples (forward calls with batch size 1; None when read from a ``covariance_file``)."""

    covariance: torch.Tensor
    sample_count: int | None


def sample_covariance(
    inputs: torch.Tensor, keep_dtype: bool, where: str
) -> tuple[torch.Tensor, int]:
    """``(Σ X̂ᵀX̂ over the samples of one call, number of samples)``."""
    x = inputs.detach()
    if not keep_dtype:
        x = x.float()
    features = x.shape[-1] if x.dim() else 1
    samples = x.reshape(1 if x.dim() <= 2 else x.shape[0], -1, features)
    top = samples.amax(dim=(1, 2)).abs()
    scaled = samples / top[:, None, None]
    if not torch.isfinite(scaled).all():
        raise TargetError(
            f"the inputs of {where!r} hold NaN or inf, or a sample whose maximum is 0 (CorDA "
            "divides each sample by its largest value): check the calibration data run_model "
            "feeds the model"
        )
    flat = scaled.reshape(-1, features)
    covariance = flat.T @ flat
    if not torch.isfinite(covariance).all():
        raise TargetError(
            f"the input covariance of {where!r} overflowed (NaN or inf); with "
            "use_float16_for_covariance=True it is accumulated in the model's dtype: set it "
            "to False to accumulate in float32"
        )
    return covariance, samples.shape[0]


class _Sums:
    """Running sums of the hooked targets, by name."""

    def __init__(self, keep_dtype: bool) -> None:
        self.keep_dtype = keep_dtype
        self.total: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def hook(self, name: str) -> Callable[..., None]:
        def record(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            inputs = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(inputs, torch.Tensor):
                raise TargetError(f"{name!r} was called without an input tensor")
            covariance, samples = sample_covariance(inputs, self.keep_dtype, name)
            if name in self.total:
                self.total[name] += covariance
            else:
                self.total[name] = covariance
            self.count[name] = self.count.get(name, 0) + samples

        return record


def collect_covariances(
    hooked: dict[str, nn.Module],
    hooked_model: nn.Module,
    run_model: Callable[[], object],
    keep_dtype: bool,
) -> dict[str, CordaStatistics]:
    """Run ``run_model()`` with a forward hook on every module of ``hooked`` (by name), under
    ``no_grad``, with ``hooked_model`` in eval mode; the hooks are removed and the modules'
    training modes restored whatever happens."""
    sums = _Sums(keep_dtype)
    modes = {module: module.training for module in hooked_model.modules()}
    handles = []
    try:
        for name, module in hooked.items():
            handles.append(module.register_forward_hook(sums.hook(name), with_kwargs=True))
        hooked_model.eval()
        with torch.no_grad():
            run_model()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return {
        name: CordaStatistics(sums.total[name] / sums.count[name], sums.count[name])
        for name in sums.total
    }


#: how to turn a PEFT (torch.save) file one trusts into one adapt reads (a file object, since
#: torch ≥ 2.13 reads a *path* ending in .safetensors as safetensors)
_CONVERT = (
    "convert a PEFT file you trust once: with open(old, 'rb') as f: tensors = torch.load(f, "
    "weights_only=True); then safetensors.torch.save_file({k: v.contiguous() for k, v in "
    f"tensors.items()}}, 'new{SUFFIX}')"
)


def existing_file(path: str | None, field: str) -> Path | None:
    """``path`` as a Path if it names an existing, non-empty file (PEFT's test), else None;
    a path that does not end in ``.safetensors`` is refused."""
    if path is None:
        return None
    if not str(path).endswith(SUFFIX):
        raise ConfigError(
            f"CordaConfig.{field}={path!r}: adapt reads and writes CorDA's {field} as "
            f"safetensors, never as pickle (PEFT's torch.save files cannot be read): give a "
            f"path ending in {SUFFIX!r}" + (f"; or {_CONVERT}" if Path(path).is_file() else "")
        )
    file = Path(path)
    return file if file.is_file() and file.stat().st_size > 0 else None


def _read(file: Path, field: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file; :class:`CheckpointError` if it is
    not one (a pickle written by PEFT's ``torch.save``, say)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(
            f"CordaConfig.{field} {str(file)!r} is not a safetensors file ({exc}). adapt never "
            "loads pickle, so PEFT's torch.save cache and covariance files cannot be read: "
            f"delete the file to rebuild it with run_model, or {_CONVERT}"
        ) from exc
    return tensors, metadata


def _write(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``file`` atomically (its folder created if missing)."""
    from safetensors.torch import save_file

    ready = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    atomic_write(file, lambda tmp: save_file(ready, tmp, metadata=metadata))


def read_covariances(file: Path, paths: list[str]) -> dict[str, CordaStatistics]:
    """The covariances of ``paths`` from a ``covariance_file``."""
    tensors, _ = _read(file, "covariance_file")
    missing = [p for p in paths if p not in tensors]
    if missing:
        raise ConfigError(
            f"covariance_file {str(file)!r} has no covariance for {missing[0]!r} (it was "
            "built for another model or other target_modules): delete it to rebuild it"
        )
    return {p: CordaStatistics(tensors[p], None) for p in paths}


def write_covariances(file: Path, statistics: dict[str, CordaStatistics]) -> None:
    _write(file, {p: stats.covariance for p, stats in statistics.items()}, dict(_FORMAT))


def _check_cached(
    path: str, found: CordaDecomposition, rank: int, weight: torch.Tensor, file: Path
) -> None:
    out, inp = weight.shape
    want = {"S_WC": (rank,), "U_WC": (out, rank), "V_WC": (inp, rank)}
    got = {"S_WC": found.s.shape, "U_WC": found.u.shape, "V_WC": found.v.shape}
    for key, shape in want.items():
        if tuple(got[key]) != shape:
            raise ConfigError(
                f"cache_file {str(file)!r} holds {path}.eigens.{key} of shape "
                f"{tuple(got[key])}, and this model and config need {shape} (r={rank}): it was "
                "built for another model or rank; delete it to rebuild it with run_model"
            )


def read_cache(
    file: Path, weights: dict[str, torch.Tensor], ranks: dict[str, int], corda_method: str
) -> dict[str, CordaDecomposition]:
    """The decompositions of a ``cache_file`` for the targets (``weights``: their dense
    weights, by path), checked against the weights' shapes, the ranks and the mode."""
    tensors, metadata = _read(file, "cache_file")
    method = metadata.get("corda_method")
    if method is not None and method != corda_method:
        raise ConfigError(
            f"cache_file {str(file)!r} holds a {method.upper()} decomposition and "
            f"corda_method is {corda_method!r}: set corda_method={method!r} to use it, "
            "or delete the file to rebuild it"
        )
    found = {}
    for path, weight in weights.items():
        keys = [f"{path}.eigens.{key}" for key in _KEYS]
        if any(key not in tensors for key in keys):
            raise ConfigError(
                f"cache_file {str(file)!r} has no decomposition for {path!r} (built for another "
                "model or other target_modules): delete it to rebuild it with run_model"
            )
        s, u, v = (tensors[key].to(weight.device, torch.float32) for key in keys)
        found[path] = CordaDecomposition(s, u, v, method)
        _check_cached(path, found[path], ranks[path], weight, file)
    return found


def write_cache(file: Path, found: dict[str, CordaDecomposition], corda_method: str) -> None:
    """PEFT's cache keys (``{path}.eigens.S_WC`` / ``U_WC`` / ``V_WC``), as safetensors, with
    the mode in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    for path, item in found.items():
        for key, tensor in zip(_KEYS, (item.s, item.u, item.v), strict=True):
            tensors[f"{path}.eigens.{key}"] = tensor
    _write(file, tensors, {**_FORMAT, "corda_method": corda_method})
