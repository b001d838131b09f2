"""Reference architectures (CIFAR-style) behind one registry.

``create(name, in_channels, num_classes)`` builds a model and records how it was built in
``model.cnnpress_arch`` so that a file can rebuild it by name.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from cnnpress.errors import ConfigError
from cnnpress.models import graph, lenet, mobile, resnet, vgg  # noqa: F401  (registers them)
from cnnpress.models.registry import MODELS
from cnnpress.typecheck import check_arguments

__all__ = ["arch_of", "check_args", "create", "from_arch", "names"]


def create(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``name``.

    Args:
        name: A name from :func:`names`.
        in_channels: Channels of the input images.
        num_classes: Outputs of the classifier.
        **kwargs: Architecture options (for example ``width``).

    Returns:
        A freshly initialised model with ``cnnpress_arch`` set.
    """
    factory = MODELS.get(name)
    check_args(name, {"in_channels": in_channels, "num_classes": num_classes, **kwargs})
    model = factory(in_channels=in_channels, num_classes=num_classes, **kwargs)
    model.cnnpress_arch = {
        "name": name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        **kwargs,
    }
    return model


def check_args(name: str, args: dict[str, Any]) -> None:
    """Refuse an argument architecture ``name`` does not take, or a value that is not of the
    type its factory declares or not positive (one :class:`ConfigError` line each).

    Only types and signs: how large a model may be is the caller's business (a file's
    loader bounds it by what the file can hold, ``cnnpress.format.validate``).
    """
    factory = MODELS.get(name)
    params = inspect.signature(factory).parameters
    unknown = sorted(str(key) for key in args if key not in params)
    if unknown:
        raise ConfigError(
            f"model {name} takes no argument(s) {', '.join(unknown)}; "
            f"its arguments: {', '.join(params)}"
        )
    try:
        check_arguments(factory, args)
    except ConfigError as err:
        raise ConfigError(f"model {name}: {err}") from None
    for key, value in args.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"model {name}: {key} must be positive, got {value!r}")


def names() -> list[str]:
    """Every registered architecture name."""
    return MODELS.names()


def arch_of(model: nn.Module) -> dict[str, Any]:
    """How a file rebuilds ``model``: the registry name and arguments of a model built by
    :func:`create` (``cnnpress_arch``), else its traced graph, ``{"graph": ...}``
    (:func:`cnnpress.models.graph.trace`; one error line when it cannot be traced)."""
    arch = getattr(model, "cnnpress_arch", None)
    if arch is not None:
        return dict(arch)
    why = getattr(model, "cnnpress_arch_error", None)  # a compressed copy of an untraceable one
    if why:
        raise ConfigError(why)
    return {"graph": graph.trace(model)}


def from_arch(arch: dict[str, Any]) -> nn.Module:
    """A fresh model of a recorded architecture: a registry name, or a graph (then its
    modules hold placeholder values until the caller loads the file's)."""
    if "graph" in arch:
        model = graph.build(arch["graph"])
        model.cnnpress_arch = {"graph": arch["graph"]}
        return model
    arch = dict(arch)
    return create(arch.pop("name", None), **arch)
