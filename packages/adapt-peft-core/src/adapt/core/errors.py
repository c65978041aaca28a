"""Exceptions raised by adapt. Each says what was wrong and how to fix it."""

from __future__ import annotations

import sys
import warnings

#: Packages whose frames a warning skips to reach the user's line: adapt itself and the
#: libraries that call into it (module forwards, optimizer hooks, Trainer callbacks).
_LIBRARY_PREFIXES = ("adapt.", "torch", "transformers", "accelerate")
# The import machinery between an `import` line and the module it runs: skipped, and not
# counted, because warnings.warn does not count these frames in stacklevel either.
_IMPORT_MACHINERY = "importlib._bootstrap"


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside adapt, torch, transformers and
    accelerate: the user's line (``opt.step()``, ``model(...)``, ``save_pretrained``), however
    deep the call arrived through a module forward, an optimizer hook or a Trainer callback."""
    frame = sys._getframe(1)
    level = 1
    while (back := frame.f_back) is not None:
        module = str(frame.f_globals.get("__name__", ""))
        if module.startswith(_IMPORT_MACHINERY):
            frame = back
            continue
        if not module.startswith(_LIBRARY_PREFIXES) and module != "adapt":
            break
        frame = back
        level += 1
    warnings.warn(message, category, stacklevel=level + 1)


class AdaptError(Exception):
    """Base class of every error adapt raises on purpose."""


class ConfigError(AdaptError, ValueError):
    """A configuration value is invalid."""


class TargetError(AdaptError, ValueError):
    """Target modules could not be matched or cannot be adapted."""


class CheckpointError(AdaptError, ValueError):
    """A checkpoint is missing, corrupt or does not match the model."""


class PluginError(AdaptError, RuntimeError):
    """A plugin is missing, broken, or conflicts with another plugin."""


class MissingMethodError(PluginError):
    """No installed package provides the requested method."""


class AdapterStateError(AdaptError, RuntimeError, ValueError):
    """The requested operation does not fit the adapters' current state.

    Also a ``ValueError``: PEFT raises these conflicts between a call's arguments or a config and
    the model's adapters (an unknown adapter name, a basis too small for a new VeRA adapter,
    merged adapters in a mixed batch, a safe_merge that would write NaN, ...) as ``ValueError``,
    so migrated ``except ValueError`` code keeps catching them."""


class IntegrationError(AdaptError, TypeError):
    """Another library (a trainer, a framework) is using an adapted model in a way that cannot
    work without adapt's integration for it; the message names the integration to use."""
