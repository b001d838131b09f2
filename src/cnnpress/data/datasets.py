"""The data set registry: known specs, default folders and :func:`load_dataset`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnpress.data.cifar import load_cifar10
from cnnpress.data.errors import DataError, file_error
from cnnpress.data.idx import find_idx_file, read_idx
from cnnpress.data.spec import SPLITS, Dataset, DatasetSpec
from cnnpress.data.synthetic import make_synthetic, synthetic_spec

__all__ = ["DATA_DIR_ENV", "dataset_names", "default_data_dir", "get_spec", "load_dataset"]

#: Environment variable that, when set, is the data folder for every file-backed data set.
DATA_DIR_ENV = "CNNPRESS_DATA_DIR"

_SPECS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        in_channels=1,
        image_size=(28, 28),
        num_classes=10,
        mean=(0.2860,),
        std=(0.3530,),
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        crop_padding=2,
        hflip=True,
    ),
    "mnist": DatasetSpec(
        name="mnist",
        in_channels=1,
        image_size=(28, 28),
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        class_names=tuple(str(i) for i in range(10)),
        crop_padding=2,
        hflip=False,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        in_channels=3,
        image_size=(32, 32),
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        class_names=(
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ),
        crop_padding=4,
        hflip=True,
    ),
    "synthetic": synthetic_spec(),
}

_DEFAULT_DIRS: dict[str, Path] = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}

_HINTS: dict[str, str] = {
    "fashion-mnist": (
        "pass --data-dir pointing at the folder with the Fashion-MNIST IDX files, "
        "or on Debian run `apt-get install dataset-fashion-mnist`"
    ),
    "mnist": (
        "pass --data-dir pointing at the folder with the MNIST IDX files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...)"
    ),
    "cifar10": (
        "pass --data-dir pointing at the extracted CIFAR-10 binary or python version "
        "(cifar-10-batches-bin or cifar-10-batches-py, or the folder holding it)"
    ),
}

_IDX_PREFIX = {"train": "train", "test": "t10k"}


def dataset_names() -> list[str]:
    """All known data set names, sorted."""
    return sorted(_SPECS)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in _SPECS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")


def get_spec(name: str) -> DatasetSpec:
    """The spec of data set ``name`` (for ``synthetic``: with default options).

    Raises:
        DataError: Unknown name.
    """
    _check_name(name)
    return _SPECS[name]


def default_data_dir(name: str) -> Path | None:
    """Where data set ``name`` is looked for when no folder is given.

    ``$CNNPRESS_DATA_DIR``, when set and non-empty, is used as is for every file-backed data
    set; otherwise Fashion-MNIST and MNIST use the Debian locations under
    ``/usr/share/datasets``. CIFAR-10 has no default and ``synthetic`` needs no files (None).

    Raises:
        DataError: Unknown name.
    """
    _check_name(name)
    if name == "synthetic":
        return None
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env)
    return _DEFAULT_DIRS.get(name)


def _load_idx(name: str, split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    spec, hint = _SPECS[name], _HINTS[name]
    prefix = _IDX_PREFIX[split]
    image_path = find_idx_file(folder, f"{prefix}-images-idx3-ubyte", hint)
    label_path = find_idx_file(folder, f"{prefix}-labels-idx1-ubyte", hint)
    images, labels = read_idx(image_path, hint), read_idx(label_path, hint)
    h, w = spec.image_size
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (h, w):
        raise file_error(
            image_path, f"expected uint8 images of shape (N, {h}, {w}), got "
            f"{images.dtype} {images.shape}", hint,
        )  # fmt: skip
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise file_error(
            label_path, f"expected a 1-D uint8 label array, got {labels.dtype} {labels.shape}", hint
        )
    if labels.shape[0] != images.shape[0]:
        raise file_error(
            label_path,
            f"{labels.shape[0]} labels but {image_path.name} holds {images.shape[0]} images",
            hint,
        )
    if labels.size and int(labels.max()) >= spec.num_classes:
        raise file_error(
            label_path, f"label {int(labels.max())} >= {spec.num_classes} classes", hint
        )
    return images[:, None], labels


def load_dataset(
    name: str, split: str = "train", data_dir: str | Path | None = None, **options: Any
) -> Dataset:
    """Load a split of a known data set into memory (uint8 images, int64 labels).

    Args:
        name: One of :func:`dataset_names`.
        split: ``"train"`` or ``"test"`` (the published splits).
        data_dir: Folder holding the files; defaults to :func:`default_data_dir`.
        **options: ``limit`` (any dataset): keep only the first ``limit`` samples of the
            split, for smoke tests and quick trials (never for reported accuracy). Only for
            ``synthetic``: ``num_samples``, ``in_channels``, ``image_size``, ``num_classes``,
            ``seed``.

    Returns:
        The split.

    Raises:
        DataError: Unknown name, split or option, or missing or malformed files.
    """
    _check_name(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} for dataset {name!r}; use 'train' or 'test'")
    limit = options.pop("limit", None)
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise DataError(f"limit must be a positive integer, got {limit!r}")
        full = load_dataset(name, split, data_dir, **options)
        return Dataset(full.images[:limit].clone(), full.labels[:limit].clone(), full.spec, split)
    if name == "synthetic":
        return make_synthetic(split, **options)
    if options:
        raise DataError(f"dataset {name!r} takes no options, got: {', '.join(sorted(options))}")
    folder = Path(data_dir) if data_dir is not None else default_data_dir(name)
    if folder is None:
        raise DataError(f"dataset {name!r} has no default folder; {_HINTS[name]}")
    if folder.exists() and not folder.is_dir():
        raise DataError(
            f"{folder} is a file, not a folder: the data folder (--data-dir) is the folder "
            f"that holds the {name} files"
        )
    if name == "cifar10":
        images, labels = load_cifar10(folder, split, _HINTS[name])
    else:
        images, labels = _load_idx(name, split, folder)
    return Dataset(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        spec=_SPECS[name],
        split=split,
    )
