"""Reference architectures (CIFAR-style) behind one registry.

``create(name, in_channels, num_classes)`` builds a model and records how it was built in
``model.cnnpress_arch`` so that a file can rebuild it by name.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cnnpress.models import lenet, mobile, resnet, vgg  # noqa: F401  (registers them)
from cnnpress.models.registry import MODELS

__all__ = ["create", "names", "arch_of"]


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
    model = factory(in_channels=in_channels, num_classes=num_classes, **kwargs)
    model.cnnpress_arch = {
        "name": name,
        "in_channels": in_channels,
        "num_classes": num_classes,
        **kwargs,
    }
    return model


def names() -> list[str]:
    """Every registered architecture name."""
    return MODELS.names()


def arch_of(model: nn.Module) -> dict[str, Any]:
    """The recorded architecture of a model built by :func:`create`."""
    arch = getattr(model, "cnnpress_arch", None)
    if arch is None:
        raise ValueError(
            "model was not built by cnnpress.models.create; its architecture is unknown"
        )
    return dict(arch)
