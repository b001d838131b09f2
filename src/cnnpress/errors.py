"""The one base class for errors a user can cause; the CLI prints them as one line."""

from __future__ import annotations

__all__ = ["CnnpressError", "ConfigError"]


class CnnpressError(ValueError):
    """An error caused by user input: a bad setting, file or name. Its message says what to do."""


class ConfigError(CnnpressError):
    """An invalid setting (method config, training config, recipe)."""
