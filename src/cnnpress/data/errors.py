"""The one error type of :mod:`cnnpress.data`."""

from __future__ import annotations

from pathlib import Path

from cnnpress.errors import CnnpressError

__all__ = ["DataError", "file_error"]


class DataError(CnnpressError):
    """A data file or folder is missing, unreadable or malformed, or a name is unknown.

    The message is always a single line that names the file (or name) and says what to do.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


def file_error(path: str | Path, problem: str, hint: str = "") -> DataError:
    """Build a one-line :class:`DataError` of the form ``cannot read PATH: PROBLEM; HINT``.

    Args:
        path: The file (or file pattern) that could not be read.
        problem: What is wrong with it.
        hint: What the user can do about it; left out when empty.

    Returns:
        The error, ready to raise.
    """
    message = f"cannot read {path}: {problem}"
    if hint:
        message += f"; {hint}"
    return DataError(message)
