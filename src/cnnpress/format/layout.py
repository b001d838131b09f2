"""Which arrays a model stores, in which order and encoding: the payload layout.

Layers of registered methods store what their method's ``pack`` returns; every other module
stores its own parameters and the buffers inference needs (BatchNorm running statistics,
not ``num_batches_tracked``) as float32, float16 or int8 with scales (:mod:`cnnpress.floats`).
The order is the model's module order, so the file needs no tensor names: the loader rebuilds
the model and derives the same list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnpress.floats import float_encoding, q8_decode, q8_encode, stored_float_bits
from cnnpress.format.bitpack import pack_bits, packed_size, unpack_bits
from cnnpress.format.entropy import huffman_decode, huffman_encode, huffman_size
from cnnpress.methods import method_for

__all__ = [
    "Entry",
    "decode",
    "encode",
    "entropy_code",
    "entropy_report",
    "folds",
    "layout",
    "load_folded_batchnorm",
    "nbytes",
]

_SKIP = ("num_batches_tracked",)


@dataclass(frozen=True)
class Entry:
    """One stored array: where it goes, how it is encoded, its shape and (when saving) values."""

    module: str
    name: str
    encoding: str
    shape: tuple[int, ...]
    values: Any = None
    size: int | None = None  # bytes, for entropy-coded arrays ("hB") whose size is data's

    @property
    def nbytes(self) -> int:
        """Bytes this array takes in the file."""
        return self.size if self.size is not None else nbytes(self.encoding, self.shape)

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name


def nbytes(encoding: str, shape: tuple[int, ...]) -> int:
    """Bytes an array of ``shape`` takes in ``encoding`` (bit-packed ones rounded up).

    Entropy-coded arrays (``"hB"``) have a data-dependent size: see ``Entry.nbytes``.
    """
    count = int(np.prod(shape, dtype=np.int64))
    if encoding == "f4":
        return 4 * count
    if encoding == "f2":
        return 2 * count
    if encoding == "q8":
        return stored_float_bits(shape, 8) // 8
    return packed_size(count, int(encoding[1:]))


def encode(entry: Entry) -> bytes:
    """The bytes of one array."""
    if entry.encoding == "f4":
        return np.ascontiguousarray(entry.values, dtype="<f4").tobytes()
    if entry.encoding == "f2":
        return np.ascontiguousarray(entry.values, dtype="<f2").tobytes()
    if entry.encoding == "q8":
        return q8_encode(np.asarray(entry.values))
    if entry.encoding.startswith("h"):
        return huffman_encode(np.asarray(entry.values), 1 << int(entry.encoding[1:]))
    return pack_bits(np.asarray(entry.values), int(entry.encoding[1:]))


def decode(data: bytes, encoding: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`encode` (floats come back as float32)."""
    count = int(np.prod(shape, dtype=np.int64))
    if encoding in ("f4", "f2"):
        arr = np.frombuffer(data, dtype="<" + encoding, count=count).astype(np.float32)
    elif encoding == "q8":
        arr = q8_decode(data, shape)
    elif encoding.startswith("h"):
        arr = huffman_decode(data, 1 << int(encoding[1:]), count)
    else:
        arr = unpack_bits(data, int(encoding[1:]), count)
    return arr.reshape(shape)


def entropy_code(entries: list[Entry]) -> list[Entry]:
    """Huffman-code every packed integer stream of 2+ bits where that makes it smaller."""
    out = []
    for e in entries:
        if e.encoding.startswith("u") and int(e.encoding[1:]) >= 2 and e.values is not None:
            bits = int(e.encoding[1:])
            size = huffman_size(np.asarray(e.values), 1 << bits)
            if size < nbytes(e.encoding, e.shape):
                e = dataclasses.replace(e, encoding=f"h{bits}", size=size)
        out.append(e)
    return out


def entropy_report(entries: list[Entry]) -> list[dict[str, Any]]:
    """What Huffman coding does to each packed integer stream of 2+ bits (with values).

    One row per stream: its key, bits per symbol, count, packed bytes, Huffman bytes (code
    table included), the Shannon entropy of its symbols in bits (the bound a per-symbol code
    approaches) and the bytes the file stores (the smaller of the two).
    """
    rows = []
    for e in entries:
        if not (e.encoding.startswith("u") and int(e.encoding[1:]) >= 2 and e.values is not None):
            continue
        values = np.asarray(e.values).ravel()
        bits = int(e.encoding[1:])
        packed = nbytes(e.encoding, e.shape)
        coded = huffman_size(values, 1 << bits)
        p = np.bincount(values, minlength=1 << bits) / max(1, values.size)
        p = p[p > 0]
        rows.append(
            {
                "array": e.key,
                "bits": bits,
                "count": int(values.size),
                "packed_bytes": packed,
                "huffman_bytes": coded,
                "entropy_bits": float(-(p * np.log2(p)).sum()),
                "stored_bytes": min(packed, coded),
            }
        )
    return rows


def _folded_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> list[tuple[str, torch.Tensor]]:
    """Inference BatchNorm as one affine map per channel: y = scale * x + shift."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return [("scale", scale), ("shift", bn.bias.detach() - bn.running_mean * scale)]


def load_folded_batchnorm(bn: nn.modules.batchnorm._BatchNorm, arrays: dict[str, Any]) -> None:
    """Set an eval-mode BatchNorm to compute ``scale * x + shift`` (mean 0, var 1 - eps)."""
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(arrays["scale"]))
        bn.bias.copy_(torch.from_numpy(arrays["shift"]))
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)


def folds(module: nn.Module, fold_batchnorm: bool) -> bool:
    """Whether ``module`` is a BatchNorm stored folded (affine, with running statistics)."""
    return (
        fold_batchnorm
        and isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.affine
        and module.track_running_stats
    )


def layout(
    model: nn.Module, float_bits: int = 32, with_values: bool = False, fold_batchnorm: bool = False
) -> list[Entry]:
    """Every array ``model`` stores, in file order.

    With ``fold_batchnorm`` each affine BatchNorm stores two values per channel (the
    inference scale and shift) instead of four (weight, bias, running mean and variance).
    """
    enc = float_encoding(float_bits)
    entries: list[Entry] = []
    for mod_name, module in model.named_modules():
        method = method_for(module)
        if method is not None:
            for name, (encoding, values) in method.pack(module, float_bits).items():
                arr = np.asarray(values)
                entries.append(
                    Entry(mod_name, name, encoding, tuple(arr.shape), arr if with_values else None)
                )
            continue
        if any(method_for(parent) is not None for parent in _parents(model, mod_name)):
            continue
        if folds(module, fold_batchnorm):
            tensors = _folded_batchnorm(module)
        else:
            tensors = list(module.named_parameters(recurse=False))
            tensors += [(n, b) for n, b in module.named_buffers(recurse=False) if n not in _SKIP]
        for name, tensor in tensors:
            if not torch.is_floating_point(tensor):
                continue
            values = tensor.detach().cpu().float().numpy() if with_values else None  # bf16 too
            entries.append(Entry(mod_name, name, enc, tuple(tensor.shape), values))
    return entries


def _parents(model: nn.Module, name: str) -> list[nn.Module]:
    parts = name.split(".") if name else []
    return [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
