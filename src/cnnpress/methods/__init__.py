"""Compression methods behind one registry and one contract (see ``base``)."""

from __future__ import annotations

from torch import nn

from cnnpress.methods import (  # noqa: F401  (register them)
    binary,
    filter_prune,
    kmeans,
    lowrank,
    pq,
    prune,
    slbf,
)
from cnnpress.methods.base import METHODS, LayerCost, Method, MethodConfig
from cnnpress.methods.distill import kd_loss  # distillation: a training aid of every method

__all__ = [
    "LayerCost",
    "Method",
    "MethodConfig",
    "get",
    "kd_loss",
    "method_for",
    "names",
    "use_plain_paths",
]


def names() -> list[str]:
    """Every registered method name."""
    return METHODS.names()


def get(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    return METHODS.get(name)


def method_for(module: nn.Module) -> Method | None:
    """An instance of the method whose layer ``module`` is, or ``None`` for other modules."""
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.layer_types and isinstance(module, cls.layer_types):
            return cls()
    return None


def use_plain_paths(model: nn.Module) -> None:
    """Put every compressed layer of ``model`` on PyTorch's plain path
    (:meth:`Method.use_plain_path`): the values the exports are checked against."""
    for module in model.modules():
        method = method_for(module)
        if method is not None:
            method.use_plain_path(module)
