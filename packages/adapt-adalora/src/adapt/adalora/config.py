"""``AdaLoraConfig``: rank controls that say what they mean (``init_r``, ``target_r``)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from adapt.core import ANY_VALUE, AdapterConfig, ConfigError
from adapt.core.errors import warn_user

C = TypeVar("C", bound="AdaLoraConfig")

_BIAS = ("none", "all", "lora_only")

#: PEFT's AdaLoraConfig inherits every LoraConfig field; PEFT writes them all into an AdaLoRA
#: adapter_config.json. These are ignored at their defaults (the neutral values), refused
#: otherwise. (adapt-adalora owns this table: it needs no LoRA code.)
_PEFT_ADALORA_KEYS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "ensure_weight_tying": (False, None),
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": ({}, None),
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": ANY_VALUE,
    "monteclora_config": None,
    "qalora_group_size": ANY_VALUE,
    "target_parameters": (None, []),
    "trainable_token_indices": None,
    "use_bdlora": (None, False),
    "use_dora": False,
    "use_qalora": False,
    "velora_config": None,
    "use_rslora": False,
    "alpha_pattern": ({}, None),
    "lora_bias": False,
    "runtime_config": ANY_VALUE,
}

#: PEFT writes LoraConfig's default ``"r": 8`` into every AdaLoRA config; AdaLoRA ignores it.
PEFT_DEFAULT_R = 8

R_IGNORED = (
    "AdaLoraConfig ignores `r` (got r={r}): AdaLoRA's ranks are set by `init_r` (the initial rank every "
    "matrix starts with, default 12) and `target_r` (the average rank left after budgeting, "
    "default 8). Use AdaLoraConfig(init_r=..., target_r=...) instead."
)


@dataclasses.dataclass
class AdaLoraConfig(AdapterConfig):
    """AdaLoRA (Zhang et al., ICLR 2023): ΔW = B (A ⊙ E) · α / init_r, in SVD form.

    Every adapted matrix starts with ``init_r`` singular triplets (rows of A, entries of E,
    columns of B). During training, ``update_and_allocate(step)`` scores each triplet by the
    smoothed sensitivity |w · ∇w| (EMA ``beta1``) times its uncertainty (EMA ``beta2``) and
    masks the least important ones so the total rank follows a schedule:

    * steps ``0 .. tinit``: warm-up, all ``init_r`` ranks kept;
    * ``tinit .. total_step - tfinal``: the budget falls as a cubic from
      ``init_r × matrices`` to ``target_r × matrices``, masking every ``deltaT`` steps;
    * ``total_step - tfinal .. total_step``: the final pattern is frozen (``rank_pattern``),
      and the remaining ranks fine-tune.

    ``orth_reg_weight`` weighs the orthogonality regulariser ‖AAᵀ − I‖ + ‖BᵀB − I‖ added to
    the model's loss. ``r`` is not an AdaLoRA setting: passing it warns and points here.
    """

    peft_type: ClassVar[str] = "ADALORA"
    peft_ignored_keys: ClassVar[dict[str, Any]] = _PEFT_ADALORA_KEYS
    adapted_bias_values: ClassVar[tuple[str, ...]] = ("lora_only",)

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: bool = True
    #: Not used by AdaLoRA (see ``init_r`` / ``target_r``); setting it warns.
    r: int | None = None

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.r is not None:
            warn_user(R_IGNORED.format(r=self.r))
        check = self._check_number
        check(name, "init_r", self.init_r, kind=int, low=0, low_open=True)
        check(name, "target_r", self.target_r, kind=int, low=0, low_open=True)
        if self.target_r > self.init_r:
            raise ConfigError(
                f"{name}.target_r ({self.target_r}) must be <= init_r ({self.init_r}): "
                "budgeting only removes ranks; raise init_r or lower target_r"
            )
        if self.total_step is None:
            raise ConfigError(
                f"{name}.total_step is required: the rank budget schedule is laid out over the "
                "training run; set it to the number of optimizer steps you will train for"
            )
        check(name, "total_step", self.total_step, kind=int, low=0, low_open=True)
        check(name, "tinit", self.tinit, kind=int, low=0)
        check(name, "tfinal", self.tfinal, kind=int, low=0)
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(
                f"{name}: tinit ({self.tinit}) must be < total_step - tfinal "
                f"({self.total_step} - {self.tfinal} = {self.total_step - self.tfinal}), or "
                "there is no budgeting phase and no rank is ever pruned; lower tinit or tfinal, "
                "or raise total_step"
            )
        check(name, "deltaT", self.deltaT, kind=int, low=1)
        check(name, "beta1", self.beta1, low=0, high=1, high_open=True)
        check(name, "beta2", self.beta2, low=0, high=1, high_open=True)
        check(name, "orth_reg_weight", self.orth_reg_weight, low=0)
        check(name, "lora_alpha", self.lora_alpha)
        check(name, "lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)
        if self.bias not in _BIAS:
            raise ConfigError(f"{name}.bias must be one of {_BIAS}, got {self.bias!r}")
        if not isinstance(self.init_lora_weights, bool):
            raise ConfigError(
                f"{name}.init_lora_weights must be true or false, got {self.init_lora_weights!r}"
            )
        if self.rank_pattern is not None:
            self._check_rank_pattern(name)

    def _check_rank_pattern(self, name: str) -> None:
        pattern = self.rank_pattern
        if not isinstance(pattern, dict):
            raise ConfigError(f"{name}.rank_pattern must map module names to lists of booleans")
        for key, mask in pattern.items():
            if not isinstance(key, str) or not key.endswith("lora_E"):
                raise ConfigError(
                    f"{name}.rank_pattern key {key!r} must name a layer's lora_E, e.g. "
                    "'model.layers.0.self_attn.q_proj.lora_E'"
                )
            if not isinstance(mask, list) or not all(isinstance(b, bool) for b in mask):
                raise ConfigError(
                    f"{name}.rank_pattern[{key!r}] must be a list of true/false, one per initial "
                    f"rank, got {mask!r}"
                )
            if len(mask) != self.init_r:
                raise ConfigError(
                    f"{name}.rank_pattern[{key!r}] has {len(mask)} entries but init_r is "
                    f"{self.init_r}: the pattern marks which of the init_r ranks are kept"
                )

    # -- pattern lookup -------------------------------------------------------------------------
    def kept_ranks(self, path: str) -> list[bool] | None:
        """The rank mask of the module at ``path`` from ``rank_pattern``, if it has one."""
        if not self.rank_pattern:
            return None
        key = f"{path}.lora_E"
        if key in self.rank_pattern:
            return self.rank_pattern[key]
        for k, mask in self.rank_pattern.items():  # a pattern from a differently-wrapped model
            if re.fullmatch(rf"(.*\.)?{re.escape(path)}\.lora_E", k) or k.endswith(f".{key}"):
                return mask
        return None

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        # PEFT's AdaLoraConfig is a LoraConfig: write LoRA's default r (ignored by both).
        data["r"] = PEFT_DEFAULT_R
        return data

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
        if isinstance(data, Mapping) and "r" in data:
            data = dict(data)
            r = data.pop("r")
            if r not in (None, PEFT_DEFAULT_R):
                warn_user(f"{source}: " + R_IGNORED.format(r=r))
        return super().from_dict(data, source=source)
