"""Read images for ``cnnpress predict``: IDX, .npy, PNG or JPEG files, or folders of PNG and
JPEG images, checked against the model's input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from cnnpress.data import DatasetSpec, normalize
from cnnpress.data.idx import read_idx
from cnnpress.errors import CnnpressError

__all__ = ["FORMATS", "IMAGE_SUFFIXES", "read_images", "read_inputs"]

#: The files of images that Pillow reads, by suffix (a folder's images are these).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: The first bytes of a PNG and of a JPEG file (read as images whatever their suffix).
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff")
#: What ``predict`` reads, in words (for the messages).
FORMATS = "IDX (N x H x W), .npy (N, [C,] H, W), PNG or JPEG files, or folders of PNG/JPEG"


def _as_nchw(arr: np.ndarray, spec: DatasetSpec, path: Path) -> np.ndarray:
    c, (h, w) = spec.in_channels, spec.image_size
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3):
        arr = arr.transpose(2, 0, 1)[None]  # one H x W x C image
    elif arr.ndim == 3:
        arr = arr[:, None] if c == 1 and arr.shape[0] != 1 else arr[None]
    elif arr.ndim != 4:
        raise CnnpressError(
            f"{path}: expected images of shape (N, C, H, W) or (N, H, W), got {arr.shape}"
        )
    if arr.shape[1] == 4 and c == 3:
        arr = arr[:, :3]  # drop PNG alpha
    if arr.shape[1] == 3 and c == 1:
        raise CnnpressError(f"{path}: the model takes 1-channel (grayscale) images, got 3")
    if arr.shape[1] != c or arr.shape[2:] != (h, w):
        raise CnnpressError(
            f"{path}: the model takes {c}x{h}x{w} images, got "
            f"{arr.shape[1]}x{arr.shape[2]}x{arr.shape[3]}; resize them first"
        )
    return arr


def _pixels(arr: np.ndarray, path: Path) -> np.ndarray:
    """The uint8 pixels of a .npy array: integers in 0..255, or floats in [0, 1]."""
    kind = arr.dtype.kind
    if kind in "iu" and arr.size:
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high > 255:
            raise CnnpressError(
                f"{path}: integer pixels must lie in 0..255, these lie in {low}..{high}"
            )
    if kind in "iu":
        return arr.astype(np.uint8)
    if kind == "f":
        if not np.isfinite(arr).all():
            raise CnnpressError(f"{path}: the pixels include NaN or infinite values")
        if arr.size and (arr.min() < 0 or arr.max() > 1):
            raise CnnpressError(
                f"{path}: float pixels must lie in [0, 1], these lie in "
                f"[{float(arr.min()):g}, {float(arr.max()):g}] (divide 0-255 values by 255)"
            )
        return np.rint(arr * 255.0).astype(np.uint8)
    raise CnnpressError(
        f"{path}: pixels must be integers in 0..255 (uint8) or floats in [0, 1], "
        f"not {arr.dtype} ({_KINDS.get(kind, 'another kind of value')})"
    )


#: numpy's dtype kinds that are no pixel values, in words.
_KINDS = {
    "b": "true/false values",
    "c": "complex numbers",
    "U": "text",
    "S": "bytes",
    "O": "Python objects",
    "V": "records",
    "M": "dates",
    "m": "time spans",
}


def read_images(path: str | Path, spec: DatasetSpec) -> torch.Tensor:
    """Normalised float images (N, C, H, W) from an IDX, .npy or PNG file.

    Pixels are integers in 0-255 (uint8 or wider); float .npy arrays must be in [0, 1].
    """
    path = Path(path)
    if not path.is_file():
        raise CnnpressError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(IMAGE_SUFFIXES) or _starts_as_image(path):
        arr = _picture(path, spec)
    elif name.endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise CnnpressError(f"{path}: not a readable .npy array ({err})") from None
        arr = _pixels(arr, path)
    else:
        try:
            arr = read_idx(path)
        except CnnpressError as err:
            raise CnnpressError(f"{err}; predict reads {FORMATS}") from None
    images = torch.from_numpy(np.array(_as_nchw(arr, spec, path), dtype=np.uint8))
    return normalize(images, spec.mean, spec.std)


def _starts_as_image(path: Path) -> bool:
    """Whether the file begins as a PNG or a JPEG does."""
    with path.open("rb") as f:
        return f.read(4).startswith(_IMAGE_MAGIC)


def _picture(path: Path, spec: DatasetSpec) -> np.ndarray:
    """The pixels of a PNG or JPEG file, as the model's channels (grey or RGB)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L" if spec.in_channels == 1 else "RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise CnnpressError(f"{path}: not a readable PNG or JPEG image ({err})") from None


def read_inputs(
    paths: list[str | Path], spec: DatasetSpec
) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """Every image of ``paths`` (files, or folders whose PNG and JPEG images are read in name
    order).

    Returns:
        The normalised images (N, C, H, W) and, per image, its file and index in that file.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CnnpressError(f"{path}: a folder with no .png or .jpg images")
            files += found
        else:
            files.append(path)
    batches, sources = [], []
    for path in files:
        images = read_images(path, spec)
        batches.append(images)
        sources += [(str(path), i) for i in range(len(images))]
    return torch.cat(batches), sources
