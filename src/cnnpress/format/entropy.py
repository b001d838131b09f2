"""Canonical Huffman coding of small-alphabet integer streams (selection and cluster indices).

Stream layout: the code length of every symbol of the alphabet (0 = unused), each packed at
5 bits (``format.bitpack`` order), then the codes of the values, most significant code bit
first, in one bit stream whose bit ``t`` is bit ``t % 8`` of its byte (LSB-first, as
bitpack). Codes are canonical (Schwartz & Kallick, 1964): sorted by (length, symbol), so the
lengths alone define them. Lengths are capped at 24 bits (heights of a Huffman tree over at
most 2^16 symbols stay far below that for any stream short enough to store).
"""

from __future__ import annotations

import heapq

import numpy as np

from cnnpress.format.bitpack import pack_bits, packed_size, unpack_bits

__all__ = ["code_lengths", "huffman_decode", "huffman_encode", "huffman_size"]

_LEN_BITS = 5
MAX_LEN = 24


def code_lengths(values: np.ndarray, alphabet: int) -> np.ndarray:
    """Huffman code length of each symbol of ``range(alphabet)`` for ``values`` (0 = unused)."""
    freq = np.bincount(np.asarray(values, dtype=np.int64).reshape(-1), minlength=alphabet)
    used = np.flatnonzero(freq)
    lengths = np.zeros(alphabet, dtype=np.int64)
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    heap = [(int(freq[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        f1, _, a = heapq.heappop(heap)
        f2, _, b = heapq.heappop(heap)
        lengths[a + b] += 1
        heapq.heappush(heap, (f1 + f2, tie, a + b))
        tie += 1
    if lengths.max() > MAX_LEN:
        raise ValueError("Huffman code longer than 24 bits; store this stream packed instead")
    return lengths


def _canonical(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol (meaningful where its length > 0)."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s] = code
        prev = int(lengths[s])
        code += 1
    return codes


def huffman_size(values: np.ndarray, alphabet: int) -> int:
    """Bytes :func:`huffman_encode` writes for ``values``."""
    lengths = code_lengths(values, alphabet)
    bits = int(lengths[np.asarray(values, dtype=np.int64).reshape(-1)].sum())
    return packed_size(alphabet, _LEN_BITS) + (bits + 7) // 8


def huffman_encode(values: np.ndarray, alphabet: int) -> bytes:
    """Code table and coded stream of ``values`` (integers in ``range(alphabet)``)."""
    flat = np.asarray(values, dtype=np.int64).reshape(-1)
    lengths = code_lengths(flat, alphabet)
    codes = _canonical(lengths)
    ln, cd = lengths[flat], codes[flat]
    # bit t of value v's code, most significant first
    owner = np.repeat(np.arange(len(flat)), ln)
    pos = np.arange(int(ln.sum())) - np.repeat(np.cumsum(ln) - ln, ln)
    bits = (cd[owner] >> (ln[owner] - 1 - pos)) & 1
    table = pack_bits(lengths, _LEN_BITS)
    return table + np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()


def huffman_decode(data: bytes, alphabet: int, count: int) -> np.ndarray:
    """Inverse of :func:`huffman_encode`: ``count`` values as ``uint16``.

    Raises:
        ValueError: The table or the stream is damaged.
    """
    head = packed_size(alphabet, _LEN_BITS)
    if len(data) < head:
        raise ValueError("Huffman stream shorter than its code table")
    lengths = unpack_bits(data[:head], _LEN_BITS, alphabet).astype(np.int64)
    if lengths.max(initial=0) > MAX_LEN or (count and not lengths.any()):
        raise ValueError("invalid Huffman code table")
    codes = _canonical(lengths)
    kraft = sum(2.0 ** -int(n) for n in lengths if n)
    if kraft > 1.0 + 1e-12:
        raise ValueError("invalid Huffman code table (Kraft inequality violated)")
    lookup = {(int(lengths[s]), int(codes[s])): s for s in np.flatnonzero(lengths)}
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=head), bitorder="little")
    out = np.empty(count, dtype=np.uint16)
    code = length = i = 0
    for bit in bits.tolist():
        if i == count:
            break
        code = (code << 1) | bit
        length += 1
        symbol = lookup.get((length, code))
        if symbol is not None:
            out[i] = symbol
            i += 1
            code = length = 0
        elif length > MAX_LEN:
            raise ValueError("invalid Huffman stream")
    if i != count:
        raise ValueError("Huffman stream ends early")
    return out
