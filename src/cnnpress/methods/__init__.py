"""Compression methods behind one registry and one contract (see ``base``)."""

from __future__ import annotations

from cnnpress.methods import slbf  # noqa: F401  (registers the method)
from cnnpress.methods.base import METHODS, LayerCost, Method, MethodConfig

__all__ = ["LayerCost", "Method", "MethodConfig", "get", "names"]


def names() -> list[str]:
    """Every registered method name."""
    return METHODS.names()


def get(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    return METHODS.get(name)
