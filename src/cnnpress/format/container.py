"""The ``.cnnp`` file: a compressed model that loads back without pickle.

Layout (all integers little-endian)::

    magic      8 bytes   b"\\x89CNNP\\r\\n\\x1a"
    version    u16       format version (this code writes 3 or 4 and reads 1 to 4)
    length     u32       bytes of the manifest
    manifest   zlib-compressed UTF-8 JSON: architecture (registry name and arguments), method
               and config, float width, dataset spec (normalisation, class names),
               provenance (command, commit, accuracy), the array count and the sizes of
               the entropy-coded arrays; from format 4, the activation quantization
               (``"activations"``: bits, observer, a scale and zero point per tensor)
    payload    the arrays in layout order (``format.layout``), each padded to a whole byte
    crc16      u16 per array (format 3): CRC-16/CCITT of each array's bytes, in payload order
    checksum   u32       CRC-32 of everything before it

The loader checks magic, version and checksum, then the manifest's values and what the payload
can hold (``format.validate``) before it builds anything, rebuilds the model from the registry,
derives the array layout from it, refuses a manifest that disagrees with it and checks each
array against its CRC-16. Every problem raises :class:`FormatError` with one line; nothing else
escapes. Format 1 listed every array's encoding and shape; format 2 has no per-array CRCs.
A file is written with the oldest version that holds it: 4 where it records activations (an
older reader would drop them and run the model in float), else 3.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnpress.atomic import atomic_write_bytes
from cnnpress.errors import CnnpressError
from cnnpress.floats import FLOAT_BITS, check_float_bits
from cnnpress.format.layout import (
    Entry,
    decode,
    encode,
    entropy_code,
    folds,
    layout,
    load_folded_batchnorm,
    nbytes,
)
from cnnpress.format.validate import (
    array_checksums,
    check_activations,
    check_array_checksums,
    check_manifest,
    inflate,
    split_checksums,
)
from cnnpress.methods import get as get_method
from cnnpress.methods import method_for
from cnnpress.methods.apply import rebuild
from cnnpress.models import arch_of
from cnnpress.pretrained import resolve

__all__ = ["FORMAT_VERSION", "MAGIC", "FormatError", "FileInfo", "load", "read_info", "save"]

MAGIC = b"\x89CNNP\r\n\x1a"
FORMAT_VERSION = 4
#: The version of files that record no activations (what format 4 adds).
_PLAIN_VERSION = 3
_HEAD = struct.Struct("<8sHI")


class FormatError(CnnpressError):
    """A ``.cnnp`` file that is not one, is damaged, too new or disagrees with itself."""


class FileInfo(dict):
    """What :func:`read_info` finds: manifest, sizes, and the arrays with their byte counts."""


def _assemble(manifest: dict[str, Any], payload: bytes, version: int = FORMAT_VERSION) -> bytes:
    blob = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9)
    body = _HEAD.pack(MAGIC, version, len(blob)) + blob + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _activations(
    model: nn.Module, given: dict[str, Any] | None, path: str | Path
) -> dict[str, Any] | None:
    """``given``, else what ``model`` records, checked as the loader will check it."""
    activations = given if given is not None else getattr(model, "cnnpress_activations", None)
    try:
        check_activations(activations)
    except CnnpressError as err:
        raise FormatError(f"cannot save {path}: {err}") from None
    return activations


def save(
    model: nn.Module,
    path: str | Path,
    *,
    float16: bool | None = None,
    float_bits: int | None = None,
    fold_batchnorm: bool | None = None,
    entropy: bool | None = None,
    dataset: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    activations: dict[str, Any] | None = None,
) -> int:
    """Write ``model`` to ``path`` as a ``.cnnp`` file, atomically; returns the file's bytes.

    Args:
        model: A model built by ``cnnpress.models.create`` (and maybe ``cnnpress.compress``).
        path: Destination.
        float16: Store the floating-point tensors that are not bit-packed (BatchNorm, biases,
            scales, uncompressed layers) as float16 instead of float32 (``float_bits=16``).
        float_bits: The width of those floats: 32, 16, or 8 (int8 with a float32 scale per
            row, :mod:`cnnpress.floats`); overrides ``float16``.
        fold_batchnorm: Store each BatchNorm as its inference scale and shift (2 values per
            channel instead of 4). The loaded model computes the same function in eval mode;
            its BatchNorm statistics are gone, so it is for inference, not further training.
        entropy: Huffman-code the packed integer streams of 2+ bits (SLBF selections,
            cluster indices) wherever that is smaller; the manifest records each coded size.
            For ``float_bits``, ``fold_batchnorm`` and ``entropy``, ``None`` (the default) takes
            the setting recorded in the model's method config (``float_bits``,
            ``fold_batchnorm``, ``entropy``, as SLBF with a size budget records them), else off.
        dataset: Dataset spec (``DatasetSpec.to_dict()``); default ``model.cnnpress_dataset``.
        provenance: Command, commit, accuracy...; default ``model.cnnpress_provenance``.
        activations: Activation quantization, ``{"bits": 8 or 4, "observer": name,
            "tensors": {graph node: [scale, zero_point]}}``; default
            ``model.cnnpress_activations``. A file that records it is format 4.

    Raises:
        FormatError: ``activations`` is malformed (``format.validate.check_activations``).
    """
    activations = _activations(model, activations, path)
    recorded = getattr(model, "cnnpress_method", None)
    wanted = (recorded or {}).get("config") or {}
    if float_bits is None:
        float_bits = 16 if float16 else 32 if float16 is not None else None
    if float_bits is None:
        float_bits = int(wanted.get("float_bits", 32))
    check_float_bits(float_bits)
    if fold_batchnorm is None:
        fold_batchnorm = bool(wanted.get("fold_batchnorm", False))
    if entropy is None:
        entropy = bool(wanted.get("entropy", False))
    if recorded:
        get_method(recorded["name"])().sync(model)
    entries = layout(model, float_bits, with_values=True, fold_batchnorm=fold_batchnorm)
    if entropy:
        entries = entropy_code(entries)
    manifest = {
        "arch": arch_of(model),
        "method": getattr(model, "cnnpress_method", None),
        "float_bits": float_bits,
        "fold_batchnorm": fold_batchnorm,
        "dataset": dataset if dataset is not None else getattr(model, "cnnpress_dataset", None),
        "provenance": provenance
        if provenance is not None
        else getattr(model, "cnnpress_provenance", None),
        # The layout follows from the model; the manifest keeps only what does not: how many
        # arrays there are and the sizes of the entropy-coded ones (version 1 listed every
        # array's encoding and shape: 144 of a 10 KB file's 862 header bytes).
        "count": len(entries),
        "coded": {str(i): e.size for i, e in enumerate(entries) if e.size is not None},
    }
    if activations is not None:
        manifest["activations"] = activations
    version = FORMAT_VERSION if activations is not None else _PLAIN_VERSION
    blobs = [encode(e) for e in entries]
    data = _assemble(manifest, b"".join(blobs) + array_checksums(blobs), version)
    atomic_write_bytes(path, data)
    return len(data)


def _fail(path: Path, problem: str) -> FormatError:
    return FormatError(f"{path}: {problem}")


def _parse(path: Path) -> tuple[dict[str, Any], bytes, int]:
    """Manifest, payload and header size, after every check that needs no model."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except OSError as err:
        raise _fail(path, f"cannot read ({err.strerror})") from None
    if len(data) < _HEAD.size + 4:
        raise _fail(path, f"truncated: {len(data)} bytes is shorter than any .cnnp file")
    magic, version, length = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise _fail(path, "not a .cnnp file (wrong magic bytes)")
    if version > FORMAT_VERSION:
        raise _fail(
            path,
            f"format version {version} is newer than this cnnpress reads "
            f"({FORMAT_VERSION}); upgrade cnnpress",
        )
    if version < 1:
        raise _fail(path, f"invalid format version {version}")
    (stored_crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != stored_crc:
        raise _fail(path, "checksum mismatch: the file is truncated or corrupt")
    end = _HEAD.size + length
    if end > len(data) - 4:
        raise _fail(path, "manifest length points past the end of the file")
    try:
        manifest = json.loads(inflate(data[_HEAD.size : end]))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError, CnnpressError) as err:
        raise _fail(path, f"unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arch"), dict):
        raise _fail(path, "manifest has no architecture")
    try:
        payload = split_checksums(manifest, data[end:-4], version)
        check_manifest(manifest, len(payload), version)
    except CnnpressError as err:
        raise _fail(path, str(err)) from None
    return manifest, payload, end


def _build(path: Path, manifest: dict[str, Any]) -> nn.Module:
    try:
        model = rebuild(manifest["arch"], manifest.get("method"))
    except CnnpressError as err:
        raise _fail(path, f"cannot rebuild the model: {err}") from None
    except (TypeError, KeyError) as err:
        raise _fail(path, f"cannot rebuild the model from its manifest ({err})") from None
    return model


def _check_layout(
    path: Path, manifest: dict[str, Any], expected: list[Entry], payload: bytes
) -> list[Entry]:
    """The arrays as stored: the model's layout, with the manifest's entropy-coded sizes."""
    if "arrays" not in manifest:
        stored = _coded_layout(path, manifest, expected)
    else:
        stored = _listed_layout(path, manifest, expected)
    size = sum(e.nbytes for e in stored)
    if size != len(payload):
        raise _fail(path, f"payload holds {len(payload)} bytes, the manifest needs {size}")
    return stored


def _coded_layout(path: Path, manifest: dict[str, Any], expected: list[Entry]) -> list[Entry]:
    """Format 2: an array count and the byte sizes of the entropy-coded arrays by index."""
    count, coded = manifest.get("count"), manifest.get("coded")
    if count != len(expected):
        raise _fail(path, f"manifest counts {count} arrays, the model needs {len(expected)}")
    if not isinstance(coded, dict):
        raise _fail(path, "manifest has no table of entropy-coded arrays")
    stored = list(expected)
    for key, size in coded.items():
        i = int(key) if isinstance(key, str) and key.isdigit() else -1
        want = stored[i] if 0 <= i < len(stored) else None
        if want is None or not want.encoding.startswith("u") or want.encoding == "u1":
            raise _fail(path, f"manifest codes array {key}, which is no packed integer stream")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _fail(path, f"manifest gives array {key} the size {size!r}")
        stored[i] = dataclasses.replace(want, encoding="h" + want.encoding[1:], size=size)
    return stored


def _listed_layout(path: Path, manifest: dict[str, Any], expected: list[Entry]) -> list[Entry]:
    """Format 1: every array's encoding and shape (and the size of entropy-coded ones)."""
    listed = manifest.get("arrays")
    if not isinstance(listed, list) or len(listed) != len(expected):
        count = len(listed) if isinstance(listed, list) else "no"
        raise _fail(path, f"manifest lists {count} arrays, the model needs {len(expected)}")
    stored = []
    for i, (item, want) in enumerate(zip(listed, expected, strict=True)):
        coded = (
            isinstance(item, list)
            and len(item) == 3
            and want.encoding.startswith("u")
            and item[:2] == ["h" + want.encoding[1:], list(want.shape)]
            and isinstance(item[2], int)
            and item[2] >= 0
        )
        if coded:
            stored.append(dataclasses.replace(want, encoding=item[0], size=item[2]))
        elif item == [want.encoding, list(want.shape)]:
            stored.append(want)
        else:
            raise _fail(
                path,
                f"array {i} ({want.key}) is listed as {item}, the model needs "
                f"{[want.encoding, list(want.shape)]}",
            )
    return stored


def load(path: str | Path) -> nn.Module:
    """Rebuild the model stored at ``path`` (or ``pretrained:NAME``), in eval mode, no pickle.

    The model gets ``cnnpress_dataset``, ``cnnpress_provenance`` and ``cnnpress_activations``
    (``None`` where the file records none) from the manifest.

    Raises:
        FormatError: The file is missing, damaged, too new or inconsistent (one line).
    """
    path = resolve(path)
    manifest, payload, _ = _parse(path)
    model = _build(path, manifest)
    float_bits = manifest.get("float_bits", 32)
    if float_bits not in FLOAT_BITS:
        raise _fail(path, f"unsupported float width {float_bits}")
    fold = bool(manifest.get("fold_batchnorm", False))
    expected = layout(model, float_bits, fold_batchnorm=fold)
    stored = _check_layout(path, manifest, expected, payload)
    try:
        check_array_checksums(manifest, [(e.key, e.nbytes) for e in stored], payload)
    except CnnpressError as err:
        raise _fail(path, str(err)) from None
    by_module: dict[str, dict[str, Any]] = {}
    offset = 0
    try:
        for e in stored:
            by_module.setdefault(e.module, {})[e.name] = decode(
                payload[offset : offset + e.nbytes], e.encoding, e.shape
            )
            offset += e.nbytes
    except ValueError as err:
        raise _fail(path, f"damaged array data ({err})") from None
    try:
        for mod_name, arrays in by_module.items():
            module = model.get_submodule(mod_name) if mod_name else model
            method = method_for(module)
            if method is not None:
                method.unpack(module, arrays)
                continue
            if folds(module, fold):
                load_folded_batchnorm(module, arrays)
                continue
            with torch.no_grad():
                for name, values in arrays.items():
                    getattr(module, name).copy_(torch.from_numpy(values))
    except (ValueError, RuntimeError) as err:
        raise _fail(path, f"payload does not fit the model ({err})") from None
    model.cnnpress_dataset = manifest.get("dataset")
    model.cnnpress_provenance = manifest.get("provenance")
    model.cnnpress_activations = manifest.get("activations")
    coded = bool(manifest.get("coded")) or any(  # some stream is Huffman-coded
        isinstance(a, list) and str(a[0]).startswith("h") for a in manifest.get("arrays") or []
    )
    model.cnnpress_storage = {  # how the file keeps its values (the ONNX export keeps them so)
        "float_bits": manifest.get("float_bits", 32),
        "fold_batchnorm": bool(manifest.get("fold_batchnorm", False)),
        "entropy": coded,
    }
    return model.eval()


def read_info(path: str | Path) -> FileInfo:
    """Manifest and byte accounting of a ``.cnnp`` file (header, payload per array, total)."""
    path = Path(path)
    manifest, payload, header = _parse(path)
    model = _build(path, manifest)
    fold = bool(manifest.get("fold_batchnorm", False))
    expected = layout(model, manifest.get("float_bits", 32), fold_batchnorm=fold)
    stored = _check_layout(path, manifest, expected, payload)
    try:
        check_array_checksums(manifest, [(e.key, e.nbytes) for e in stored], payload)
    except CnnpressError as err:
        raise _fail(path, str(err)) from None
    return FileInfo(
        manifest=manifest,
        header_bytes=header,
        checksum_bytes=(checks := 4 + len(manifest.get("crc16", "")) // 2),
        payload_bytes=len(payload),
        file_bytes=header + len(payload) + checks,
        arrays=[
            {
                "key": e.key,
                "module": e.module,
                "encoding": e.encoding,
                "shape": list(e.shape),
                "bytes": e.nbytes,
                "packed_bytes": nbytes("u" + e.encoding[1:], e.shape)
                if e.encoding.startswith("h")
                else e.nbytes,
            }
            for e in stored
        ],
    )
