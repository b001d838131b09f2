"""Does a data set fit a model? Its images must have the shape the model was built (and
trained) for, and its classes must be the model's outputs; anything else gives an IndexError
deep in the loss or an accuracy that means nothing."""

from __future__ import annotations

from typing import Any

from torch import nn

from cnnpress.data.spec import DatasetSpec
from cnnpress.errors import CnnpressError

__all__ = ["DataMismatchError", "check_fits", "expected_input"]


class DataMismatchError(CnnpressError):
    """A data set whose image shape or class count is not the model's."""


def expected_input(model: nn.Module) -> dict[str, Any]:
    """What ``model`` takes and gives, from what it records: ``in_channels``, ``image_size``
    (``None`` where it records no data set) and ``num_classes`` (``None`` where unknown)."""
    arch = getattr(model, "cnnpress_arch", None) or {}
    data = getattr(model, "cnnpress_dataset", None) or {}
    size = data.get("image_size")
    return {
        "in_channels": arch.get("in_channels", data.get("in_channels")),
        "image_size": tuple(size) if isinstance(size, (list, tuple)) else None,
        "num_classes": arch.get("num_classes", data.get("num_classes")),
    }


def _shape(channels: Any, size: tuple[int, ...] | None) -> str:
    return f"{channels}x{size[0]}x{size[1]}" if size else f"{channels}-channel"


def check_fits(model: nn.Module, spec: DatasetSpec, where: str = "the model") -> None:
    """Refuse the data set ``spec`` describes for ``model`` unless its image shape and class
    count are the model's (before its files are read: a spec is enough).

    Raises:
        DataMismatchError: One line naming both: what the model takes and gives, and what
            the data set holds.
    """
    want = expected_input(model)
    have = {"in_channels": spec.in_channels, "image_size": tuple(spec.image_size)}
    have["num_classes"] = spec.num_classes
    wrong = [k for k, v in want.items() if v is not None and v != have[k]]
    if not wrong:
        return
    takes = f"takes {_shape(want['in_channels'], want['image_size'])} images"
    if want["num_classes"] is not None:
        takes += f" and predicts {want['num_classes']} classes"
    holds = f"{_shape(spec.in_channels, spec.image_size)} images and {spec.num_classes} classes"
    raise DataMismatchError(
        f"{where} {takes}, but {spec.name} has {holds}; use the data set it was trained on"
    )
