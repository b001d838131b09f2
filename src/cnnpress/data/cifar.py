"""Read (and, for tests, write) the two official CIFAR-10 file formats.

* Binary version (``cifar-10-batches-bin/``): ``data_batch_1.bin`` .. ``data_batch_5.bin`` and
  ``test_batch.bin``; each record is one label byte then 3072 pixel bytes, the R, G and B
  planes of a 32x32 image in row-major order.
* Python version (``cifar-10-batches-py/``): ``data_batch_1`` .. ``data_batch_5`` and
  ``test_batch``, each a pickled dict with ``b"data"`` (uint8 array, N x 3072) and
  ``b"labels"`` (list of ints). These are read only through :class:`RestrictedUnpickler`,
  which admits nothing but the numpy globals that a uint8 array needs.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cnnpress.data.errors import DataError, file_error

__all__ = [
    "CIFAR_RECORD_BYTES",
    "RestrictedUnpickler",
    "load_cifar10",
    "read_cifar_bin",
    "read_cifar_py",
    "restricted_loads",
    "write_cifar_bin",
    "write_cifar_py",
]

CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32
_NUM_CLASSES = 10
_SPLIT_STEMS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _numpy_global(modules: tuple[str, ...], name: str) -> Any:
    for module in modules:
        try:
            return getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
    return None


_RECONSTRUCT = _numpy_global(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
_FROMBUFFER = _numpy_global(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _pkg in ("numpy.core", "numpy._core"):
    if _RECONSTRUCT is not None:
        _ALLOWED[(f"{_pkg}.multiarray", "_reconstruct")] = _RECONSTRUCT
    if _FROMBUFFER is not None:
        _ALLOWED[(f"{_pkg}.numeric", "_frombuffer")] = _FROMBUFFER


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals needed to rebuild a numpy array.

    Admitted: ``numpy.ndarray``, ``numpy.dtype``, ``numpy[._]core.multiarray._reconstruct``
    (protocols 0-4) and ``numpy[._]core.numeric._frombuffer`` (protocol 5). Any other global
    (``os.system``, ``builtins.eval`` ...) raises :class:`DataError` before anything runs.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return an admitted numpy global; refuse everything else."""
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"the restricted unpickler refuses to load global {module}.{name}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids (never used by CIFAR files)."""
        raise DataError("the restricted unpickler refuses persistent ids")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` and ``encoding="bytes"``."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _to_images(flat: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32))


def _check_labels(path: Path, labels: np.ndarray, hint: str) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        raise file_error(path, f"labels must lie in 0..{_NUM_CLASSES - 1}", hint)
    return labels.astype(np.int64)


def _read(path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise file_error(path, "file not found", hint) from None
    except OSError as exc:
        raise file_error(path, f"{exc.strerror or exc}", hint) from None


def read_cifar_bin(path: str | Path, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Read one binary-version batch file.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Raises:
        DataError: Missing file, length not a multiple of 3073, or a label >= 10.
    """
    path = Path(path)
    raw = _read(path, hint)
    if len(raw) == 0 or len(raw) % CIFAR_RECORD_BYTES:
        raise file_error(
            path,
            f"size {len(raw)} bytes is not a positive multiple of the "
            f"{CIFAR_RECORD_BYTES}-byte CIFAR-10 record",
            hint,
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    return _to_images(records[:, 1:]), _check_labels(path, records[:, 0], hint)


def read_cifar_py(path: str | Path, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Read one python-version batch file through the restricted unpickler.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Raises:
        DataError: Missing file, a refused global, a broken pickle or a malformed dict.
    """
    path = Path(path)
    raw = _read(path, hint)
    try:
        obj = restricted_loads(raw)
    except DataError as exc:
        raise file_error(path, str(exc), hint) from None
    except Exception as exc:  # any unpickling failure means a bad file
        raise file_error(path, f"not a valid pickle ({type(exc).__name__}: {exc})", hint) from None
    if not isinstance(obj, dict):
        raise file_error(path, f"expected a pickled dict, got {type(obj).__name__}", hint)
    batch = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    if b"data" not in batch or b"labels" not in batch:
        raise file_error(path, "the dict lacks the keys b'data' and b'labels'", hint)
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise file_error(path, "b'data' must be a 2-D uint8 numpy array", hint)
    if data.shape[1] != CIFAR_RECORD_BYTES - 1:
        raise file_error(path, f"b'data' rows have {data.shape[1]} values, expected 3072", hint)
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise file_error(path, "b'labels' must be a list of ints", hint) from None
    if labels.shape != (data.shape[0],):
        raise file_error(
            path, f"{data.shape[0]} images but {labels.size} labels (b'labels' shape)", hint
        )
    return _to_images(data), _check_labels(path, labels, hint)


def _find_folder(root: Path, subdir: str, suffix: str) -> Path | None:
    for folder in (root, root / subdir):
        if any((folder / f"{stem}{suffix}").is_file() for stem in ("test_batch", "data_batch_1")):
            return folder
    return None


def load_cifar10(data_dir: str | Path, split: str, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Load a CIFAR-10 split, preferring the binary version over the python version.

    Args:
        data_dir: The folder holding the batch files, or its parent holding
            ``cifar-10-batches-bin`` or ``cifar-10-batches-py``.
        split: ``"train"`` (the five data batches) or ``"test"``.
        hint: Appended to error messages.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Raises:
        DataError: No CIFAR-10 files found, or one is missing or malformed.
    """
    root = Path(data_dir)
    stems = _SPLIT_STEMS[split]
    folder = _find_folder(root, "cifar-10-batches-bin", ".bin")
    if folder is not None:
        parts = [read_cifar_bin(folder / f"{stem}.bin", hint) for stem in stems]
    else:
        folder = _find_folder(root, "cifar-10-batches-py", "")
        if folder is None:
            raise file_error(
                root,
                "no CIFAR-10 batch files (data_batch_1.bin .. test_batch.bin, or the python "
                "version's data_batch_1 .. test_batch) here or in cifar-10-batches-bin/ or "
                "cifar-10-batches-py/ below it",
                hint,
            )
        parts = [read_cifar_py(folder / stem, hint) for stem in stems]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return images, labels


def _split_batches(split_arrays: Mapping[str, tuple[np.ndarray, np.ndarray]], num_train: int):
    for split, (images, labels) in split_arrays.items():
        if split not in _SPLIT_STEMS:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        images = np.asarray(images, dtype=np.uint8).reshape(len(labels), 3072)
        labels = np.asarray(labels, dtype=np.uint8)
        stems = _SPLIT_STEMS[split][:num_train] if split == "train" else _SPLIT_STEMS[split]
        chunks = zip(
            np.array_split(images, len(stems)), np.array_split(labels, len(stems)), strict=True
        )
        yield from zip(stems, chunks, strict=True)


def write_cifar_bin(
    folder: str | Path,
    split_arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_train_batches: int = 5,
) -> Path:
    """Test helper: write splits as binary-version CIFAR-10 batch files in ``folder``.

    Args:
        folder: Created if missing; the ``.bin`` files go directly inside it.
        split_arrays: ``{"train": (images, labels), "test": ...}`` with uint8 images of shape
            ``(N, 3, 32, 32)``; the train split is cut into ``num_train_batches`` files.
        num_train_batches: How many ``data_batch_*`` files to write (5 in the real set).

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (images, labels) in _split_batches(split_arrays, num_train_batches):
        records = np.concatenate([labels[:, None], images], axis=1)
        (folder / f"{stem}.bin").write_bytes(records.tobytes())
    return folder


def write_cifar_py(
    folder: str | Path,
    split_arrays: Mapping[str, tuple[np.ndarray, np.ndarray]],
    num_train_batches: int = 5,
    protocol: int = 4,
) -> Path:
    """Test helper: write splits as python-version CIFAR-10 batch files (pickled dicts).

    Same arguments as :func:`write_cifar_bin`, plus the pickle ``protocol``.

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, (images, labels) in _split_batches(split_arrays, num_train_batches):
        batch = {
            b"batch_label": stem.encode(),
            b"labels": [int(v) for v in labels],
            b"data": images,
            b"filenames": [f"{stem}_{i}.png".encode() for i in range(len(labels))],
        }
        (folder / stem).write_bytes(pickle.dumps(batch, protocol=protocol))
    return folder
