"""``LoraConfig``: the LoRA hyper-parameters, in PEFT's field names and defaults."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, ClassVar

from adapt.core import ANY_VALUE, AdapterConfig, ConfigError
from adapt.core.param_targeting import check_names

from .subconfigs import CordaConfig, EvaConfig, LoftQConfig, sub_config

_BIAS = ("none", "all", "lora_only")

#: Keys PEFT writes in a LoRA adapter_config.json: ignored at these values, refused otherwise.
PEFT_LORA_KEYS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "ensure_weight_tying": (False, None),
    "kasa_config": None,
    "layer_replication": None,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": ANY_VALUE,
    "monteclora_config": None,
    "qalora_group_size": ANY_VALUE,
    "use_bdlora": (None, False),
    "use_qalora": False,
    "velora_config": None,
}


#: ``init_lora_weights`` values that derive A and B from the base weight and rewrite it.
WEIGHT_INITS = ("pissa", "pissa_niter_<K>", "olora", "loftq", "corda")
_INITS = (True, False, "gaussian", "pissa", "olora", "loftq", "eva", "corda")


def weight_init(init: object) -> tuple[str, int | None] | None:
    """``("pissa", None)``, ``("pissa", K)`` for ``"pissa_niter_K"``, ``("olora", None)``,
    ``("loftq", None)``; None for the initialisations that leave the base alone."""
    if init in ("pissa", "olora", "loftq", "corda") and isinstance(init, str):
        return init, None
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        return "pissa", int(init[len("pissa_niter_") :])
    return None


def pattern_value(pattern: dict[str, Any], path: str) -> Any | None:
    """The value of the first ``pattern`` key matching ``path`` as ``(.*\\.)?(key)$``."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return None


@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA (Hu et al., 2021): ΔW = (α / r) · B A with A (r × in), B (out × r), B = 0 at init.

    * ``r``: rank of the update; ``lora_alpha``: scale numerator (α / r, or α / √r with
      ``use_rslora``); ``lora_dropout``: dropout on the adapter's input.
    * ``bias``: ``"none"``, ``"all"`` (train every bias of the model) or ``"lora_only"``
      (biases of adapted layers); trained biases are saved with the adapter.
    * ``init_lora_weights``: ``True`` (A Kaiming-uniform, B zero: the adapter starts as
      identity), ``"gaussian"`` (A ~ N(0, 1/r)), ``False`` (random B: not identity; tests);
      from the base weight, which is rewritten so the model's output is unchanged:
      ``"pissa"`` (top-r singular triplets of W, W ← W − s·BA), ``"pissa_niter_K"`` (the same
      by a randomised SVD with K subspace iterations), ``"olora"`` (QR of W), ``"loftq"``
      (with ``loftq_config``: W ← dequant(quant(·)) and BA fits the quantisation error).
    * ``loftq_config``: :class:`LoftQConfig` (or its dict) for ``init_lora_weights="loftq"``.
    * ``rank_pattern`` / ``alpha_pattern``: per-module r / α, keys matched against module paths
      as ``(.*\\.)?(key)$``.
    * ``fan_in_fan_out``: kept for PEFT compatibility; adapt reads each layer's weight layout
      itself (transformers ``Conv1D`` stores (in, out)).
    * ``use_dora``: DoRA (Liu et al., 2024): the adapted weight's rows are rescaled to a
      trained magnitude ``m`` (``lora_magnitude_vector``): ``W' = m · (W + s·BA) / ‖W + s·BA‖``.
    * ``target_parameters``: parameters to adapt directly (suffixes of parameter paths,
      ``["experts.gate_up_proj", "experts.down_proj"]``): fused MoE experts get one rank-r
      update per expert, stored stacked (``lora_A`` (r·E, in), ``lora_B`` (out, r·E)).
    * ``variant`` / ``variant_options`` (adapt only, not written when unset): a LoRA variant
      installed as a plugin (entry-point group ``adapt.lora_variants``) and its options.
    """

    peft_type: ClassVar[str] = "LORA"
    peft_ignored_keys: ClassVar[dict[str, Any]] = PEFT_LORA_KEYS
    adapted_bias_values: ClassVar[tuple[str, ...]] = ("lora_only",)

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    loftq_config: dict[str, Any] | LoftQConfig = dataclasses.field(default_factory=dict)
    eva_config: EvaConfig | None = None
    corda_config: CordaConfig | None = None
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    variant: str | None = None
    variant_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    extension_fields: ClassVar[tuple[str, ...]] = ("variant", "variant_options")

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        self._check_number(name, "r", self.r, kind=int, low=0, low_open=True)
        self._check_number(name, "lora_alpha", self.lora_alpha)
        self._check_number(name, "lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)
        self._check_variant(name)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, tuple):
                self.target_parameters = list(self.target_parameters)
            elif isinstance(self.target_parameters, (set, frozenset)):
                self.target_parameters = sorted(self.target_parameters)
            check_names(name, self.target_parameters)
        if self.bias not in _BIAS:
            raise ConfigError(f"{name}.bias must be one of {_BIAS}, got {self.bias!r}")
        if not isinstance(self.fan_in_fan_out, bool) or not isinstance(self.use_rslora, bool):
            raise ConfigError(f"{name}.fan_in_fan_out and use_rslora must be true or false")
        self._check_init(name)
        for field, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            pattern = getattr(self, field)
            if pattern is None:
                setattr(self, field, {})
                continue
            if not isinstance(pattern, dict):
                raise ConfigError(
                    f"{name}.{field} must map module names to values, got {pattern!r}"
                )
            for key, value in pattern.items():
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ConfigError(
                        f"{name}.{field} key {key!r} is not a valid regex: {exc}"
                    ) from exc
                if kind is int:
                    self._check_number(
                        name, f"{field}[{key!r}]", value, kind=int, low=0, low_open=True
                    )
                else:
                    self._check_number(name, f"{field}[{key!r}]", value)

    def _check_init(self, name: str) -> None:
        init = self.init_lora_weights
        niter = init[len("pissa_niter_") :] if isinstance(init, str) else ""
        known = isinstance(init, (bool, str)) and (
            init in _INITS
            or (isinstance(init, str) and init.startswith("pissa_niter_") and niter.isdigit())
        )
        if not known:
            raise ConfigError(
                f"{name}.init_lora_weights must be True, False, 'gaussian', 'pissa', "
                f"'pissa_niter_<K>' (K a whole number of iterations, e.g. 'pissa_niter_4'), "
                f"'olora', 'loftq', 'eva' or 'corda', got {init!r}"
            )
        self._check_loftq(name)
        self._check_data_inits(name)
        if not isinstance(self.lora_bias, bool):
            raise ConfigError(f"{name}.lora_bias must be true or false, got {self.lora_bias!r}")
        if self.lora_bias and (
            init not in (True, False) or self.use_dora or self.target_parameters
        ):
            raise ConfigError(
                f"{name}: lora_bias=True works with init_lora_weights=True or False, without "
                f"DoRA and without target_parameters (as in PEFT); got init_lora_weights="
                f"{init!r}, use_dora={self.use_dora}, target_parameters={self.target_parameters}"
            )
        kind = weight_init(init)
        if kind is not None and self.target_parameters:
            raise ConfigError(
                f"{name}: init_lora_weights={init!r} initialises from 2-D layer weights; it "
                "does not apply to target_parameters (fused expert tensors): use the default "
                "initialisation there, or target the experts' Linear modules"
            )

    def _check_data_inits(self, name: str) -> None:
        for field, cls, init in (
            ("eva_config", EvaConfig, "eva"),
            ("corda_config", CordaConfig, "corda"),
        ):
            value = sub_config(name, field, cls, getattr(self, field))
            if self.init_lora_weights == init and value is None:
                warnings.warn(
                    f"{name}: init_lora_weights={init!r} without {field}: using the default "
                    f"{cls.__name__}() (as PEFT)",
                    UserWarning,
                    stacklevel=5,
                )
                value = cls()
            elif self.init_lora_weights != init and value is not None:
                warnings.warn(
                    f"{name}.{field} is ignored: init_lora_weights is "
                    f"{self.init_lora_weights!r}, not {init!r}",
                    UserWarning,
                    stacklevel=5,
                )
            setattr(self, field, value)

    def _check_loftq(self, name: str) -> None:
        loftq = self.loftq_config
        if isinstance(loftq, LoftQConfig):
            loftq = dataclasses.asdict(loftq)
        if loftq is None:
            loftq = {}
        if not isinstance(loftq, dict):
            raise ConfigError(
                f"{name}.loftq_config must be a LoftQConfig(loftq_bits=..., loftq_iter=...) or "
                f"its dict, got {loftq!r}"
            )
        self.loftq_config = loftq
        if self.init_lora_weights != "loftq":
            if loftq:
                warnings.warn(
                    f"{name}.loftq_config is ignored: init_lora_weights is "
                    f"{self.init_lora_weights!r}, not 'loftq' (cleared, as in PEFT)",
                    UserWarning,
                    stacklevel=4,
                )
                self.loftq_config = {}
            return
        if not loftq:
            raise ConfigError(
                f"{name}: init_lora_weights='loftq' needs loftq_config, e.g. "
                "loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1)"
            )
        unknown = sorted(set(loftq) - {"loftq_bits", "loftq_iter"})
        if unknown:
            raise ConfigError(
                f"{name}.loftq_config has unknown keys {unknown}; it takes loftq_bits and "
                "loftq_iter"
            )
        bits, iters = loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1)
        if bits not in (4, 8) or isinstance(bits, bool):
            raise ConfigError(
                f"{name}.loftq_config.loftq_bits must be 4 (nf4) or 8 (int8), got {bits!r}"
            )
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ConfigError(
                f"{name}.loftq_config.loftq_iter must be a whole number ≥ 1, got {iters!r}"
            )
        self.loftq_config = {"loftq_bits": int(bits), "loftq_iter": iters}

    def _check_variant(self, name: str) -> None:
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"{name}.use_dora must be true or false, got {self.use_dora!r}")
        if self.variant is not None and (not isinstance(self.variant, str) or not self.variant):
            raise ConfigError(
                f"{name}.variant must be the name of an installed LoRA variant, got "
                f"{self.variant!r}"
            )
        if self.use_dora and self.variant not in (None, "dora"):
            raise ConfigError(
                f"{name} sets use_dora=True and variant={self.variant!r}; an adapter has one "
                "variant: drop one of them"
            )
        if self.variant == "dora":  # one spelling on disk, PEFT's
            self.use_dora, self.variant = True, None
        if self.variant_options is None:
            self.variant_options = {}
        if not isinstance(self.variant_options, dict):
            raise ConfigError(
                f"{name}.variant_options must be a dict of the variant's options, got "
                f"{self.variant_options!r}"
            )
        if self.variant_options and not (self.use_dora or self.variant):
            raise ConfigError(
                f"{name}.variant_options is set but no variant is; set variant='...' too"
            )

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` for the module at ``path``, patterns applied."""
        r = pattern_value(self.rank_pattern, path)
        alpha = pattern_value(self.alpha_pattern, path)
        return (self.r if r is None else int(r)), (self.lora_alpha if alpha is None else alpha)

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r
