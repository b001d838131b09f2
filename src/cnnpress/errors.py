"""The one base class for errors a user can cause; the CLI prints them as one line."""

from __future__ import annotations

__all__ = ["CnnpressError", "ConfigError"]


class CnnpressError(ValueError):
    """An error caused by user input: a bad setting, file or name. Its message says what to do.

    The message is one line: a newline in it (from a name or a value the user gave) becomes a
    space.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (" ".join(args[0].splitlines()),)
        super().__init__(*args)


class ConfigError(CnnpressError):
    """An invalid setting (method config, training config, recipe)."""
