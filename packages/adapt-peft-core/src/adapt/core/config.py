"""Configuration base shared by every method.

A method's config is a dataclass that subclasses :class:`AdapterConfig`. It serialises to
PEFT's ``adapter_config.json`` (keys sorted, sets as lists, ``peft_type`` set) and reads
configs written by PEFT: keys PEFT writes that do not change behaviour at their default are
dropped silently, a PEFT feature adapt does not implement is refused by name, and any other
unknown key is dropped with one warning (as PEFT itself does).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, get_type_hints

from .errors import ConfigError, warn_user

C = TypeVar("C", bound="AdapterConfig")

ANY_VALUE = object()

# Keys every PEFT config may carry that mean nothing to adapt.
_COMMON_IGNORED: dict[str, Any] = {
    "peft_version": ANY_VALUE,
    "auto_mapping": ANY_VALUE,
}


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a sub-config
        return _to_jsonable(dataclasses.asdict(value))
    if isinstance(value, (set, frozenset)):
        return sorted(_to_jsonable(v) for v in value)
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    return value


def _at_default(config: Any, f: dataclasses.Field[Any]) -> bool:
    value = getattr(config, f.name)
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False


@dataclasses.dataclass
class AdapterConfig:
    """Fields shared by every method: which modules to adapt and bookkeeping PEFT writes.

    * ``target_modules``: a list of names matches module paths by suffix at a dot boundary
      (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a string is a regular
      expression that must match the whole path; ``"all-linear"`` targets every linear layer
      except the output head.
    * ``exclude_modules``: same rules, removes matches.
    * ``layers_to_transform`` / ``layers_pattern``: restrict to layer indices, found after a
      path component named by ``layers_pattern`` (default: ``layers``, ``h``, ``block``,
      ``blocks``, ``layer``).
    * ``modules_to_save``: modules trained in full and saved with the adapter.
    """

    #: PEFT's ``peft_type`` string (``"LORA"``); set by each method.
    peft_type: ClassVar[str] = ""
    #: Keys a PEFT config may carry that this method ignores. Maps key -> the neutral value
    #: (``ANY_VALUE`` for always ignored); a non-neutral value is refused as unsupported.
    peft_ignored_keys: ClassVar[dict[str, Any]] = {}
    #: Values of the config's ``bias`` field that train the biases of adapted layers only
    #: (LoRA's ``"lora_only"``); ``"none"`` and ``"all"`` mean what they say. Core reads the
    #: scope through :meth:`bias_scope`, never a method's spelling.
    adapted_bias_values: ClassVar[tuple[str, ...]] = ()
    #: Fields of this base class that the method's PEFT config does not have (IA³ has no
    #: ``layers_to_transform``): they are not saved, not read from a saved config (a stray one
    #: warns as an unknown key), and setting one to anything but its default is refused.
    omitted_fields: ClassVar[tuple[str, ...]] = ()
    #: Fields adapt has beyond the method's PEFT config (LoRA's ``variant``): written only when
    #: set to something other than their default, so a config that does not use them stays
    #: exactly PEFT's.
    extension_fields: ClassVar[tuple[str, ...]] = ()

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset, tuple)):
                setattr(
                    self,
                    name,
                    sorted(value) if isinstance(value, (set, frozenset)) else list(value),
                )
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.validate()

    def bias_scope(self) -> str:
        """Which base biases this adapter trains and saves: ``"none"``, ``"all"`` (every bias
        of the model) or ``"adapted"`` (the biases of the layers it adapts). Read from the
        ``bias`` field by default; a method whose config says it otherwise overrides this."""
        bias = getattr(self, "bias", "none")
        if bias == "all":
            return "all"
        return "adapted" if bias in self.adapted_bias_values else "none"

    # -- validation -------------------------------------------------------------------------
    @classmethod
    def saved_fields(cls) -> list[str]:
        """The keys this config writes (and reads): its fields but :attr:`omitted_fields`."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in cls.omitted_fields]

    def validate(self) -> None:
        """Check field values; raise :class:`ConfigError` saying what is wrong and how to fix it."""
        cls = type(self).__name__
        for f in dataclasses.fields(self):
            if f.name in self.omitted_fields and getattr(self, f.name) != f.default:
                raise ConfigError(
                    f"{cls} has no {f.name} (the method does not support it); leave it unset"
                )
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(
                    f"{cls}.{name} must be a list of module names or a regex string, got {value!r}"
                )
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(v, str) for v in self.modules_to_save)
        ):
            raise ConfigError(
                f"{cls}.modules_to_save must be a list of module names, got {self.modules_to_save!r}"
            )
        ltt = self.layers_to_transform
        if ltt is not None:
            items = [ltt] if isinstance(ltt, int) else ltt
            if not isinstance(items, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
            ):
                raise ConfigError(
                    f"{cls}.layers_to_transform must be a non-negative int or a list of them, "
                    f"got {ltt!r}"
                )
        if self.layers_pattern is not None and ltt is None:
            raise ConfigError(
                f"{cls}.layers_pattern is set but layers_to_transform is not; set "
                "layers_to_transform to the layer indices to adapt, or drop layers_pattern"
            )
        if (
            self.target_modules is not None
            and not self.target_modules
            and not getattr(self, "target_parameters", None)
        ):
            raise ConfigError(
                f"{cls}.target_modules is empty; name the modules to adapt, e.g. "
                "target_modules=['q_proj', 'v_proj'], or use 'all-linear'"
            )
        if not isinstance(self.inference_mode, bool):
            raise ConfigError(
                f"{cls}.inference_mode must be true or false, got {self.inference_mode!r}"
            )

    @staticmethod
    def _check_number(
        cls_name: str,
        name: str,
        value: Any,
        *,
        kind: type = float,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        ok_type = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
        if isinstance(value, bool) or not ok_type:
            raise ConfigError(
                f"{cls_name}.{name} must be {'a number' if kind is float else 'an integer'}, "
                f"got {value!r}"
            )
        if low is not None and (value <= low if low_open else value < low):
            op = ">" if low_open else ">="
            raise ConfigError(f"{cls_name}.{name} must be {op} {low}, got {value!r}")
        if high is not None and (value >= high if high_open else value > high):
            op = "<" if high_open else "<="
            raise ConfigError(f"{cls_name}.{name} must be {op} {high}, got {value!r}")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as PEFT writes it (JSON types, ``peft_type`` included)."""
        defaults = {f.name: f for f in dataclasses.fields(self)}
        data = {
            name: _to_jsonable(getattr(self, name))
            for name in self.saved_fields()
            if not (name in self.extension_fields and _at_default(self, defaults[name]))
        }
        data["peft_type"] = self.peft_type
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def unsupported_features(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """The keys of a saved config that turn on a PEFT feature adapt lacks, with their values
        (``peft_ignored_keys`` set to something other than their neutral value)."""
        ignored = {**_COMMON_IGNORED, **cls.peft_ignored_keys}
        found: dict[str, Any] = {}
        for key, value in data.items():
            if key not in ignored:
                continue
            neutral = ignored[key]
            if not (
                neutral is ANY_VALUE
                or value == neutral
                or (isinstance(neutral, tuple) and value in neutral)
            ):
                found[key] = value
        return found

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], *, source: str = "config") -> C:
        """Build a config from a dict written by adapt or PEFT.

        ``source`` names where the dict came from, for error messages.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type)
        if peft_type != cls.peft_type:
            raise ConfigError(
                f"{source}: peft_type is {peft_type!r} but {cls.__name__} reads "
                f"{cls.peft_type!r} configs"
            )
        fields = {
            f.name: f
            for f in dataclasses.fields(cls)
            if f.init and f.name not in cls.omitted_fields
        }
        hints = get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        ignored = {**_COMMON_IGNORED, **cls.peft_ignored_keys}
        unsupported = cls.unsupported_features(data)
        unknown: list[str] = []
        for key, value in data.items():
            if key in fields:
                kwargs[key] = value
                continue
            if key in ignored:
                if key in unsupported:
                    raise ConfigError(
                        f"{source} sets {key}={value!r}: this adapter was made with a PEFT "
                        "feature adapt does not implement yet. Its tensors mean something else "
                        "without that feature, so adapt refuses to load it (removing the key "
                        "would not make it load correctly). Use PEFT for this adapter, or train "
                        f"one without {key}"
                    )
                continue
            unknown.append(key)
        if unknown:
            warn_user(f"{source}: ignoring unknown {cls.__name__} keys {sorted(unknown)}")
        for key, value in kwargs.items():
            _check_json_type(cls.__name__, key, value, hints.get(key), source)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_json_file(cls: type[C], path: str) -> C:
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source=path)


def _check_json_type(cls_name: str, key: str, value: Any, hint: Any, source: str) -> None:
    """Reject values whose JSON type cannot be what the field holds (e.g. ``"r": "8"``)."""
    if hint is None:
        return
    text = str(hint)
    allowed: list[type] = []
    if "bool" in text:
        allowed.append(bool)
    if "int" in text:
        allowed.append(int)
    if "float" in text:
        allowed += [float, int]
    if "str" in text:
        allowed.append(str)
    if "list" in text or "tuple" in text:
        allowed.append(list)
    if "dict" in text:
        allowed.append(dict)
    if not allowed or "Any" in text:
        return
    if value is None and ("None" in text or "Optional" in text):
        return
    if isinstance(value, bool) and bool not in allowed:
        ok = False
    else:
        ok = isinstance(value, tuple(allowed))
    if not ok:
        raise ConfigError(
            f"{source}: {cls_name}.{key} has the wrong type: got {value!r} "
            f"({type(value).__name__}), expected {hint}"
        )
