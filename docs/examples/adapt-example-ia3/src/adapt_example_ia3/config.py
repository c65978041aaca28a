"""``IA3Config``: IA³'s settings, under PEFT's keys and defaults."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeGuard, TypeVar

from adapt.core import AdapterConfig, ConfigError
from adapt.core.errors import warn_user

_C = TypeVar("_C", bound="IA3Config")


def is_feedforward(feedforward_modules: list[str] | str | None, path: str) -> bool:
    """Whether the module at ``path`` is feed-forward, by PEFT's rule: a list matches when
    the path ends with one of its entries (a plain string suffix, no dot boundary), a string
    when it matches the whole path as a regular expression."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, path) is not None
    return any(path.endswith(entry) for entry in feedforward_modules)


def _may_select(entry: str, target: str) -> bool:
    """Whether some module path that the target name ``target`` selects (the path is
    ``target`` or ends with ``.target``) ends with ``entry``."""
    return target.endswith(entry) or entry.endswith("." + target)


def feedforward_within(targets: Sequence[str], entries: Sequence[str]) -> list[str] | str:
    """``entries`` (a feed-forward list) rewritten to select the same modules among those
    ``targets`` (a target list) selects, in a form PEFT accepts: a subset of ``targets``.

    Entries that can select no target are dropped. When what is left is still not a subset
    (``"mlp.c_proj"`` with the target ``"c_proj"``), the same rule is returned as a regular
    expression: a full match of ``.*(?:e1|e2)`` is "ends with e1 or e2".
    """
    kept = [e for e in entries if any(_may_select(e, t) for t in targets)]
    if all(e in targets for e in kept):
        return kept
    return ".*(?:" + "|".join(re.escape(e) for e in kept) + ")"


@dataclasses.dataclass
class IA3Config(AdapterConfig):
    """IA³ (Liu et al. 2022): one learned vector per adapted layer rescales its activations.

    * ``feedforward_modules``: the targets whose *input* is scaled (vector ``(1, in)``); the
      others scale their output (``(out, 1)``, bias included when merged). A list matches a
      module path that ends with an entry; a string is a regex matching the whole path. When
      both are lists it must be a subset of ``target_modules`` (PEFT's rule). None: PEFT's
      default for the model type (none for a model type it has no default for).
    * ``fan_in_fan_out``: kept and saved for PEFT; adapt's weight backend knows each module's
      layout (transformers ``Conv1D`` stores ``(in, out)``), so it changes nothing here.
    * ``init_ia3_weights``: vectors start at 1 (the identity); False draws them from N(0, 1).

    PEFT's IA³ has no ``layers_to_transform`` / ``layers_pattern``: they are not saved.
    """

    peft_type: ClassVar[str] = "IA3"
    peft_ignored_keys: ClassVar[dict[str, Any]] = {}
    omitted_fields: ClassVar[tuple[str, ...]] = ("layers_to_transform", "layers_pattern")

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        # PEFT keeps sets; adapt keeps sorted lists (JSON has no sets)
        ff = self.feedforward_modules
        if isinstance(ff, (set, frozenset)):
            self.feedforward_modules = sorted(ff)
        elif isinstance(ff, tuple):
            self.feedforward_modules = list(ff)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        ff = self.feedforward_modules
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as exc:
                raise ConfigError(
                    f"{name}.feedforward_modules is not a valid regular expression: {exc}"
                ) from exc
        elif ff is not None and (
            not isinstance(ff, list) or not all(isinstance(v, str) for v in ff)
        ):
            raise ConfigError(
                f"{name}.feedforward_modules must be a list of module names or a regex string, "
                f"got {ff!r}"
            )
        for field in ("fan_in_fan_out", "init_ia3_weights"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(
                    f"{name}.{field} must be true or false, got {getattr(self, field)!r}"
                )
        targets = self.target_modules
        if isinstance(ff, list) and isinstance(targets, list):
            missing = [e for e in ff if e not in targets]
            if missing:
                raise ConfigError(
                    f"{name}.feedforward_modules must be a subset of target_modules (PEFT's "
                    f"rule): {missing} not in target_modules {targets}; add them to "
                    "target_modules or remove them from feedforward_modules"
                )

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any], *, source: str = "config") -> _C:
        """Read a config written by adapt or PEFT. PEFT fills in its default
        ``feedforward_modules`` even when they are not among explicit ``target_modules``, and
        then refuses the file it wrote; adapt reads such a file as the equivalent subset (or
        regex), with a warning."""
        if isinstance(data, Mapping):
            targets, ff = data.get("target_modules"), data.get("feedforward_modules")
            if _str_list(targets) and _str_list(ff) and not set(ff).issubset(targets):
                repaired = feedforward_within(targets, ff)
                warn_user(
                    f"{source}: feedforward_modules {sorted(ff)} is not a subset of "
                    f"target_modules {sorted(targets)} (PEFT writes such files but cannot read "
                    f"them back); reading it as feedforward_modules={repaired!r}, which makes "
                    "the same modules feed-forward"
                )
                data = {**data, "feedforward_modules": repaired}
        return super().from_dict(data, source=source)


def _str_list(value: Any) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
