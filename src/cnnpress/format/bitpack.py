"""Pack unsigned integers of 1 to 16 bits into bytes, any count, vectorised.

Bit order (documented, stable): the values form one little-endian bit stream. Value ``i``
occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first; stream bit ``t`` is bit
``t % 8`` (LSB = 0) of byte ``t // 8``. The last byte is zero-padded. ``n`` values of ``b``
bits take exactly ``ceil(n*b/8)`` bytes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "packed_size", "unpack_bits"]


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take: ceil(count*bits/8)."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer from 1 to 16, got {bits!r}")


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack the unsigned integers ``values`` (any shape, read in C order) at ``bits`` each.

    Raises:
        ValueError: A value is negative or does not fit in ``bits`` bits.
    """
    _check_bits(bits)
    flat = np.asarray(values).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack at {bits} bits")
    v = flat.astype("<u2")
    # (count, 16) matrix of each value's bits, least significant first; keep the low `bits`
    stream = np.unpackbits(v.view(np.uint8).reshape(-1, 2), axis=1, bitorder="little")
    return np.packbits(stream[:, :bits].reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` values as ``uint16``.

    Raises:
        ValueError: ``data`` holds fewer than ``packed_size(count, bits)`` bytes.
    """
    _check_bits(bits)
    need = packed_size(count, bits)
    if len(data) < need:
        raise ValueError(f"{count} values of {bits} bits need {need} bytes, got {len(data)}")
    raw = np.frombuffer(data, dtype=np.uint8, count=need)
    stream = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    full = np.zeros((count, 16), dtype=np.uint8)
    full[:, :bits] = stream
    return np.packbits(full, axis=1, bitorder="little").view("<u2").reshape(count).astype(np.uint16)
