"""LoRA's sub-configurations, in PEFT's names and defaults: ``LoftQConfig``, ``EvaConfig``,
``CordaConfig`` (dataclasses; a config read from ``adapter_config.json`` gives them as dicts,
which :func:`sub_config` turns back into the dataclass, as PEFT 0.21 does)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from adapt.core import ConfigError

__all__ = ["CordaConfig", "EvaConfig", "LoftQConfig", "sub_config"]

S = TypeVar("S")


@dataclasses.dataclass
class LoftQConfig:
    """LoftQ's options (PEFT's ``LoftQConfig``): ``loftq_bits`` (4: nf4, 8: int8) and
    ``loftq_iter``, the alternating quantise / low-rank steps."""

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclasses.dataclass
class EvaConfig:
    """EVA's options (PEFT's ``EvaConfig``): ``rho`` (a layer may get up to ``round(rho·r)``
    ranks, ≥ 1), ``tau`` (cosine-similarity threshold of convergence, in [0, 1]),
    ``use_label_mask`` / ``label_mask_value`` (tokens whose label is that value are left out),
    ``whiten`` (divide the components by √singular value), ``adjust_scaling_factors`` (keep
    ``lora_alpha / r`` when a layer's rank changes)."""

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or self.rho < 1:
            raise ConfigError(f"EvaConfig.rho must be a number ≥ 1.0, got {self.rho!r}")
        if (
            isinstance(self.tau, bool)
            or not isinstance(self.tau, (int, float))
            or not (0 <= self.tau <= 1)
        ):
            raise ConfigError(f"EvaConfig.tau must be between 0.0 and 1.0, got {self.tau!r}")


@dataclasses.dataclass
class CordaConfig:
    """CorDA's options (PEFT's ``CordaConfig``): ``cache_file`` / ``covariance_file`` (where
    the decomposition / the covariances are cached), ``corda_method`` (``"ipm"``: keep the
    directions that matter most for the data, ``"kpm"``: the least), ``verbose``,
    ``use_float16_for_covariance``, ``prune_temporary_fields``."""

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        if self.corda_method not in ("ipm", "kpm"):
            raise ConfigError(
                f"CordaConfig.corda_method must be 'ipm' or 'kpm', got {self.corda_method!r}"
            )


def sub_config(owner: str, field: str, cls: type[S], value: Any) -> S | None:
    """``value`` as a ``cls`` (from the dataclass itself or its dict); :class:`ConfigError`
    naming the unknown keys or the wrong type."""
    if value is None or isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(
            f"{owner}.{field} must be a {cls.__name__}(...) or its dict, got {value!r}"
        )
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(
            f"{owner}.{field} has unknown keys {unknown}; {cls.__name__} takes {sorted(names)}"
        )
    try:
        return cls(**value)
    except TypeError as exc:
        raise ConfigError(f"{owner}.{field}: {exc}") from exc
