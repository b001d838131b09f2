"""One small generic registry: a name -> object map filled by a decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from cnnpress.errors import CnnpressError

__all__ = ["Registry", "RegistryError"]

T = TypeVar("T")


class RegistryError(CnnpressError):
    """An unknown name was asked for, or a name was registered twice."""


class Registry(Generic[T]):
    """Maps names to objects (classes or factory functions).

    Args:
        kind: What the registry holds, used in error messages ("model", "method").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name``; a duplicate name is an error."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """Return the object registered under ``name``."""
        try:
            return self._items[name]
        except (KeyError, TypeError):  # TypeError: a list or mapping given as a name
            known = ", ".join(self.names())
            raise RegistryError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
