"""``VeraConfig``: VeRA's hyper-parameters, in PEFT's field names and defaults."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from adapt.core import AdapterConfig, ConfigError
from adapt.core.errors import warn_user

_BIAS = ("none", "all", "vera_only")


@dataclasses.dataclass
class VeraConfig(AdapterConfig):
    """VeRA: ΔW = diag(λ_b) · B · diag(λ_d) · A with A, B frozen, random and shared.

    * ``r``: rank of the shared basis (VeRA uses large ranks cheaply: only λ_d has r entries).
    * ``projection_prng_key``: seed of the basis; every adapter on a model uses the same key.
    * ``save_projection``: save A and B with the adapter (once, not per layer); without it they
      are regenerated from the key when loading.
    * ``vera_dropout``: dropout on the adapter's input. ``d_initial``: initial value of λ_d
      (λ_b starts at 0, so the adapter starts as the identity).
    * ``bias``: ``"none"``, ``"all"`` or ``"vera_only"``: which biases train and are saved.
    * ``init_weights``: ``False`` starts λ_b = 1 and λ_d random (not the identity; for tests).
    """

    peft_type: ClassVar[str] = "VERA"
    peft_ignored_keys: ClassVar[dict[str, Any]] = {}
    adapted_bias_values: ClassVar[tuple[str, ...]] = ("vera_only",)

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    #: Size of the shared basis, ``(r, max_in, max_out)``, when the first adapter should make
    #: room for larger ones added later (default: just what this adapter's layers need).
    basis_shape: list[int] | None = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self._check_number(name, "r", self.r, kind=int, low=0, low_open=True)
        # torch.Generator.manual_seed takes an unsigned 64-bit seed
        self._check_number(
            name, "projection_prng_key", self.projection_prng_key, kind=int, low=0, high=2**64 - 1
        )
        self._check_number(name, "vera_dropout", self.vera_dropout, low=0, high=1, high_open=True)
        self._check_number(name, "d_initial", self.d_initial)
        if self.bias not in _BIAS:
            raise ConfigError(f"{name}.bias must be one of {_BIAS}, got {self.bias!r}")
        if self.basis_shape is not None:
            shape = self.basis_shape
            if isinstance(shape, tuple):
                shape = self.basis_shape = list(shape)
            if (
                not isinstance(shape, list)
                or len(shape) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
            ):
                raise ConfigError(
                    f"{name}.basis_shape must be three positive integers (r, max_in, max_out), "
                    f"got {self.basis_shape!r}"
                )
            if shape[0] < self.r:
                raise ConfigError(
                    f"{name}.basis_shape has rank {shape[0]} but r is {self.r}: the basis must "
                    "hold at least r ranks"
                )
        for field in ("save_projection", "fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(
                    f"{name}.{field} must be true or false, got {getattr(self, field)!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        # PEFT's VeraConfig has no exclude_modules: leave it out of the file when unused, and
        # say so when it is used (PEFT would ignore it and adapt the excluded modules too).
        if data.get("basis_shape") is None:
            data.pop("basis_shape", None)  # not a PEFT field; PEFT ignores it when present
        if data.get("exclude_modules") is None:
            data.pop("exclude_modules", None)
        else:
            warn_user(
                "this VeRA adapter uses exclude_modules, which PEFT's VeraConfig does not have: "
                "adapt loads it correctly, but PEFT would ignore the exclusion and adapt those "
                "modules too. To share the adapter with PEFT users, list the modules to adapt in "
                "target_modules instead"
            )
        return data
