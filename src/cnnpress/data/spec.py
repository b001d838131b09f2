"""What a data set is: its static description (:class:`DatasetSpec`) and its tensors."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from cnnpress.data.errors import DataError

__all__ = ["Dataset", "DatasetSpec", "SPLITS"]

#: The published splits every data set offers.
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of an image classification data set.

    Attributes:
        name: Registry name, e.g. ``"fashion-mnist"``.
        in_channels: Number of image channels.
        image_size: ``(height, width)`` in pixels.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        mean: Per-channel mean in [0, 1] pixel units, used by normalisation.
        std: Per-channel standard deviation in [0, 1] pixel units.
        class_names: One human-readable name per class.
        crop_padding: Zero padding of the training random crop.
        hflip: Whether training uses random horizontal flips.
    """

    name: str
    in_channels: int
    image_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    crop_padding: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_classes < 1:
            raise DataError(f"dataset spec {self.name!r}: in_channels and num_classes must be >= 1")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise DataError(f"dataset spec {self.name!r}: image_size must be (H, W) >= 1")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise DataError(f"dataset spec {self.name!r}: mean/std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise DataError(f"dataset spec {self.name!r}: std values must be positive")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"dataset spec {self.name!r}: need one class name per class")
        if self.crop_padding < 0:
            raise DataError(f"dataset spec {self.name!r}: crop_padding must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as plain JSON types (lists instead of tuples)."""
        return {
            "name": self.name,
            "in_channels": self.in_channels,
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
            "crop_padding": self.crop_padding,
            "hflip": self.hflip,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSpec:
        """Rebuild a spec from :meth:`to_dict` output.

        Raises:
            DataError: A key is missing or unknown, or a value has the wrong type.
        """
        names = {f.name for f in fields(cls)}
        required = names - {"crop_padding", "hflip"}
        if not isinstance(data, dict):
            raise DataError(f"dataset spec must be a mapping, got {type(data).__name__}")
        missing = sorted(required - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise DataError(f"bad dataset spec: missing keys {missing}, unknown keys {unknown}")
        try:
            return cls(
                name=str(data["name"]),
                in_channels=int(data["in_channels"]),
                image_size=(int(data["image_size"][0]), int(data["image_size"][1])),
                num_classes=int(data["num_classes"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                class_names=tuple(str(v) for v in data["class_names"]),
                crop_padding=int(data.get("crop_padding", 0)),
                hflip=bool(data.get("hflip", False)),
            )
        except DataError:
            raise
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise DataError(f"bad dataset spec: {exc}") from None


@dataclass(eq=False)
class Dataset:
    """A whole split held in memory.

    Attributes:
        images: uint8 tensor of shape ``(N, C, H, W)``.
        labels: int64 tensor of shape ``(N,)``.
        spec: The data set's description.
        split: ``"train"`` or ``"test"``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    spec: DatasetSpec
    split: str

    def __post_init__(self) -> None:
        name = self.spec.name
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"dataset {name!r}: images must be uint8 (N, C, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"dataset {name!r}: labels must be int64 (N,)")
        if self.labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"dataset {name!r}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        expected = (self.spec.in_channels, *self.spec.image_size)
        if tuple(self.images.shape[1:]) != expected:
            raise DataError(
                f"dataset {name!r}: images are {tuple(self.images.shape[1:])}, spec says {expected}"
            )
        if len(self.labels) and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= self.spec.num_classes
        ):
            raise DataError(f"dataset {name!r}: labels must lie in 0..{self.spec.num_classes - 1}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])
