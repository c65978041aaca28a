"""Exceptions raised by adapt. Each says what was wrong and how to fix it."""

from __future__ import annotations


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


class AdapterStateError(AdaptError, RuntimeError):
    """The requested operation does not fit the adapters' current state."""
