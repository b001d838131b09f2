"""Read and write the IDX file format used by MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code and the number of
dimensions), one big-endian uint32 per dimension, then the data in C order, big-endian.
Files may be gzip-compressed; both are read the same way.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from cnnpress.data.errors import file_error

__all__ = ["IDX_DTYPES", "find_idx_file", "read_idx", "write_idx"]

#: IDX dtype code -> numpy dtype (big-endian, as stored).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path, hint: str) -> bytes:
    """Read a file, gunzipping it when it is gzip data (by content, not by name)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise file_error(path, "file not found", hint) from None
    except OSError as exc:
        raise file_error(path, f"{exc.strerror or exc}", hint) from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise file_error(path, f"corrupt gzip data ({exc})", hint) from None


def read_idx(path: str | Path, hint: str = "") -> np.ndarray:
    """Read an IDX file (plain or gzip) into a native-endian numpy array.

    Args:
        path: The file to read.
        hint: What the user should do if the file is bad; appended to error messages.

    Returns:
        A writable array with the file's dtype and shape.

    Raises:
        DataError: The file is missing, unreadable, not gzip-valid or not a valid IDX file.
    """
    path = Path(path)
    data = _read_bytes(path, hint)
    if len(data) < 4:
        raise file_error(path, f"too short for an IDX header ({len(data)} bytes)", hint)
    if data[0] != 0 or data[1] != 0:
        raise file_error(
            path, f"bad IDX magic {data[:4].hex()} (must start with two zero bytes)", hint
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise file_error(path, f"unknown IDX dtype code 0x{code:02x}", hint)
    if ndim == 0:
        raise file_error(path, "IDX header has zero dimensions", hint)
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise file_error(path, f"truncated IDX header (needs {header_len} bytes)", hint)
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        raise file_error(
            path,
            f"data size {actual} bytes does not match the header's shape {dims} "
            f"({expected} bytes); the file is truncated or corrupt",
            hint,
        )
    flat = np.frombuffer(data, dtype=dtype, offset=header_len)
    return flat.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed if ``gz``.

    Args:
        path: Where to write; the name is used as given (add ``.gz`` yourself if wanted).
        array: Array of a dtype IDX supports (uint8, int8, int16, int32, float32, float64).
        gz: Compress with gzip.

    Returns:
        The path written.

    Raises:
        ValueError: The dtype or number of dimensions cannot be stored in IDX.
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, codes[native], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    body = np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    payload = header + body
    if gz:
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path = Path(path)
    path.write_bytes(payload)
    return path


def find_idx_file(folder: str | Path, stem: str, hint: str = "") -> Path:
    """Return ``folder/stem`` or ``folder/stem.gz``, whichever exists (plain first).

    Raises:
        DataError: Neither exists; the message names ``folder/stem(.gz)``.
    """
    folder = Path(folder)
    for name in (stem, stem + ".gz"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    if not folder.is_dir():
        raise file_error(folder / f"{stem}(.gz)", f"folder {folder} not found", hint)
    raise file_error(folder / f"{stem}(.gz)", "file not found", hint)
