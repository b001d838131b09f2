"""How the floats a file keeps unpacked are stored: float32, float16 or int8 with scales.

``float_bits`` is a storage setting of every method (``MethodConfig.float_bits``) and of
``cnnpress.save``: 32 (``"f4"``), 16 (``"f2"``) or 8 (``"q8"``). ``"q8"`` is symmetric int8
quantisation: an array of two or more dimensions gets one float32 scale per row (per output
channel of a weight: ``max |row| / 127``), a vector one scale for the whole vector; each value
is ``round(x / scale)`` in [-127, 127]. Stored: the scales (float32: a float16 scale of small
values such as BatchNorm shifts would be subnormal and lose their precision), then the int8
values.
Methods and the file format both use these helpers, so a layer's cost and the bytes written
agree exactly.
"""

from __future__ import annotations

import numpy as np

from cnnpress.errors import ConfigError

__all__ = [
    "FLOAT_BITS",
    "check_float_bits",
    "float_encoding",
    "q8_decode",
    "q8_encode",
    "q8_rows",
    "stored_float_bits",
]

FLOAT_BITS = (8, 16, 32)
_ENCODING = {32: "f4", 16: "f2", 8: "q8"}


def check_float_bits(value: object) -> None:
    """Refuse a float width other than 8, 16 or 32 with one line."""
    if isinstance(value, bool) or value not in FLOAT_BITS:
        raise ConfigError(f"float_bits must be 8, 16 or 32, got {value!r}")


def float_encoding(float_bits: int) -> str:
    """The array encoding of ``float_bits``: ``"f4"``, ``"f2"`` or ``"q8"``."""
    check_float_bits(float_bits)
    return _ENCODING[float_bits]


def q8_rows(shape: tuple[int, ...]) -> int:
    """Scales a ``"q8"`` array of ``shape`` stores: its rows, or 1 for a vector or scalar."""
    return int(shape[0]) if len(shape) >= 2 else 1


def stored_float_bits(shape: tuple[int, ...], float_bits: int) -> int:
    """Bits an array of floats of ``shape`` takes at ``float_bits`` (the q8 scales included)."""
    count = int(np.prod(shape, dtype=np.int64))
    check_float_bits(float_bits)
    if float_bits == 8:
        return 8 * count + 32 * q8_rows(shape) if count else 0
    return float_bits * count


def q8_encode(values: np.ndarray) -> bytes:
    """Scales (float32, one per row) then int8 values of ``values``."""
    x = np.asarray(values, dtype=np.float32)
    rows = x.reshape(q8_rows(x.shape), -1) if x.size else x.reshape(0, 0)
    if not x.size:
        return b""
    scale = (np.abs(rows).max(axis=1) / np.float32(127.0)).astype("<f4")
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.clip(np.rint(rows / safe), -127, 127).astype(np.int8)
    return scale.tobytes() + q.tobytes()


def q8_decode(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`q8_encode`: float32 values of ``shape``."""
    count = int(np.prod(shape, dtype=np.int64))
    if not count:
        return np.zeros(shape, dtype=np.float32)
    rows = q8_rows(shape)
    scale = np.frombuffer(data, dtype="<f4", count=rows)
    q = np.frombuffer(data, dtype=np.int8, count=count, offset=4 * rows).astype(np.float32)
    return (q.reshape(rows, -1) * scale[:, None]).reshape(shape)
