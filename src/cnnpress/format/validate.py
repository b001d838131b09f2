"""Check a ``.cnnp`` manifest's values before anything is built from them.

The checksum says a file arrived as it was written; it says nothing about whether what was
written is sane. A manifest is JSON that anyone can write, and the loader builds a model from
it: without these checks a 42 KB file that claims a ResNet-20 of width 2000 makes the loader
allocate gigabytes for tens of seconds before it finds that the payload cannot fill them.

What is checked, each failure one :class:`ManifestError` line:

* **Sizes that need no model.** The manifest inflates to at most :data:`MAX_MANIFEST_BYTES`
  (a zlib bomb is refused while inflating); it lists at most :data:`MAX_ARRAYS` arrays; every
  size it gives lies inside the payload; a format-1 array needs at least one bit per element.
* **Types and ranges.** The architecture is registered and its arguments have the types and
  signs of its factory (``cnnpress.models.check_args``), with caps: :data:`MAX_IN_CHANNELS`,
  :data:`MAX_CLASSES`, :data:`MAX_MODEL_ARG` for any other number (a width). The method is
  registered and its config passes the method's own checks (``config_from_dict``), as a
  recipe's would; a recorded config is explicit, so a size budget (``target_size``) in it is
  refused (rebuilding would re-run the planner). Lloyd iterations, which the loader reruns on
  placeholder weights, are at most :data:`MAX_ITERATIONS`.
* **What the payload can hold.** The architecture's parameters are counted on the meta
  device (nothing allocated) and bounded by the payload. A file without a method stores
  every parameter in at least 8 bits (int8), so it has at most ``payload bits / 8``. A
  compressed file stores far fewer bits than parameters; how few depends on the method, and
  the extreme is not SLBF at 200x (about 6 parameters per payload bit) but filter pruning that
  keeps 1% of the filters: VGG-16 pruned with ``ratio=0.99`` to int8, BatchNorm folded, has
  532 parameters per payload bit. :data:`PARAMS_PER_BIT` (4096) leaves a factor of 8 above
  that. Every file may claim :data:`FREE_PARAMS` whatever its payload, and none more than
  :data:`MAX_PARAMS` (512 MiB of float32; VGG-16 has 15M). The settings that make a method
  allocate beyond the architecture are bounded the same way: an SLBF bank of ``m`` filters of
  ``d`` channels is stored as at least ``m * d`` bits, a codebook of ``2**bits`` values (k-means,
  PQ) as at least ``8 * 2**bits`` bits (times the subvector length), a sparse layout's
  nonzeros as at least one bit each.
* **The data set and the activations.** A data set's ``mean`` and ``std`` (where given) are
  lists of finite numbers, one per channel (``in_channels``, where given), every ``std``
  positive. Recorded activation quantization (format 4, ``"activations"``) is
  ``{"bits": 8 or 4, "observer": str, "tensors": {node: [scale, zero_point]}}`` with at most
  :data:`MAX_ACTIVATION_TENSORS` tensors, each scale a finite number above 0 and each zero
  point an integer that ``bits`` signed bits hold (TFLite's per-tensor scheme).

A file that cnnpress wrote passes all of these; the loader's own checks (the layout the
rebuilt model implies against the payload) still follow.
"""

from __future__ import annotations

import binascii
import math
import struct
import zlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from cnnpress import methods, models
from cnnpress.errors import CnnpressError, ConfigError
from cnnpress.floats import FLOAT_BITS
from cnnpress.methods.base import config_from_dict

__all__ = [
    "ACTIVATION_BITS",
    "FREE_PARAMS",
    "MAX_ACTIVATION_TENSORS",
    "MAX_ARRAYS",
    "MAX_CLASSES",
    "MAX_IN_CHANNELS",
    "MAX_ITERATIONS",
    "MAX_MANIFEST_BYTES",
    "MAX_MODEL_ARG",
    "MAX_PARAMS",
    "PARAMS_PER_BIT",
    "ManifestError",
    "array_checksums",
    "check_activations",
    "check_arch",
    "check_array_checksums",
    "check_dataset",
    "check_manifest",
    "check_method",
    "check_parameter_bound",
    "check_sizes",
    "inflate",
    "parameter_count",
    "split_checksums",
]

MAX_MANIFEST_BYTES = 8 << 20
MAX_ARRAYS = 1 << 16
MAX_IN_CHANNELS = 1024
MAX_CLASSES = 100_000
MAX_MODEL_ARG = 1 << 16
MAX_ITERATIONS = 1000
MAX_PARAMS = 1 << 27
FREE_PARAMS = 1 << 20
PARAMS_PER_BIT = 4096
#: The activation widths a file may record, and how many tensors (graph nodes) at most.
ACTIVATION_BITS = (8, 4)
MAX_ACTIVATION_TENSORS = 100_000
MAX_NAME_CHARS = 256
#: Hex digits per array in ``manifest["crc16"]`` (format 3, from the binary block).
CRC_DIGITS = 4


class ManifestError(CnnpressError):
    """A manifest value of the wrong type, out of range, or more than the payload can hold."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def inflate(blob: bytes, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """The zlib-compressed manifest, refused once it inflates past ``limit`` bytes.

    Raises:
        ManifestError: It inflates past ``limit``.
        zlib.error: It is not a complete zlib stream.
    """
    inflater = zlib.decompressobj()
    text = inflater.decompress(blob, limit + 1)
    if len(text) > limit:
        raise ManifestError(f"the manifest inflates to more than {limit:,} bytes")
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return text


def check_sizes(manifest: dict[str, Any], payload_bytes: int, version: int) -> None:
    """The top-level values: their types, and every size inside the payload."""
    bits = manifest.get("float_bits", 32)
    if isinstance(bits, bool) or bits not in FLOAT_BITS:
        raise ManifestError(f"unsupported float width {bits!r}")
    if not isinstance(manifest.get("fold_batchnorm", False), bool):
        raise ManifestError(
            f"fold_batchnorm must be true or false, got {manifest['fold_batchnorm']!r:.40}"
        )
    for key in ("dataset", "provenance", "method"):
        if not isinstance(manifest.get(key), (dict, type(None))):
            raise ManifestError(
                f"manifest {key} must be a mapping or null, got {manifest[key]!r:.40}"
            )
    if "arrays" in manifest:
        _check_listed(manifest["arrays"], payload_bytes)
    else:
        _check_counted(manifest, payload_bytes, version)


def _check_listed(listed: Any, payload_bytes: int) -> None:
    """Format 1: ``[[encoding, shape(, size)], ...]`` with at least a bit per element."""
    if not isinstance(listed, list) or len(listed) > MAX_ARRAYS:
        raise ManifestError(f"manifest arrays must be a list of at most {MAX_ARRAYS} arrays")
    elements = 0
    for i, item in enumerate(listed):
        ok = isinstance(item, list) and len(item) in (2, 3) and isinstance(item[0], str)
        ok = ok and isinstance(item[1], list) and all(_is_int(v) and v >= 0 for v in item[1])
        ok = ok and (len(item) == 2 or (_is_int(item[2]) and 0 <= item[2] <= payload_bytes))
        if not ok:
            raise ManifestError(f"manifest array {i} is not [encoding, shape]: {item!r:.60}")
        count = 1
        for v in item[1]:
            count *= v
        elements += count
        if elements > 8 * payload_bytes:
            raise ManifestError(
                f"manifest array {i} has shape {item[1]}: more elements than the "
                f"{payload_bytes:,}-byte payload has bits"
            )


def _check_counted(manifest: dict[str, Any], payload_bytes: int, version: int) -> None:
    """Formats 2 and 3: an array count, the entropy-coded sizes (and per-array checksums)."""
    count, coded = manifest.get("count"), manifest.get("coded")
    if not _is_int(count) or not 0 <= count <= MAX_ARRAYS:
        raise ManifestError(
            f"manifest count must be an integer from 0 to {MAX_ARRAYS}, got {count!r:.40}"
        )
    if not isinstance(coded, dict):
        raise ManifestError("manifest has no table of entropy-coded arrays")
    for key, size in coded.items():
        if not _is_int(size) or not 0 <= size <= payload_bytes:
            raise ManifestError(
                f"manifest gives array {key} the size {size!r:.40}; the payload holds "
                f"{payload_bytes:,} bytes"
            )


def check_arch(arch: Any) -> None:
    """A registered architecture with arguments of the right types, signs and sizes, or a
    graph that builds (``cnnpress.models.graph``)."""
    if not isinstance(arch, dict):
        raise ManifestError("manifest has no architecture")
    if "graph" in arch:  # a user's network: its graph is checked as it is built (on meta)
        try:
            parameter_count(arch)
        except ConfigError as err:
            raise ManifestError(f"the network's graph: {err}") from None
        return
    name = arch.get("name")
    if not isinstance(name, str) or name not in models.names():
        raise ManifestError(
            f"unknown model {name!r:.40}; this cnnpress has {', '.join(models.names())}"
        )
    args = {k: v for k, v in arch.items() if k != "name"}
    try:
        models.check_args(name, args)
    except ConfigError as err:
        raise ManifestError(str(err)) from None
    caps = {"in_channels": MAX_IN_CHANNELS, "num_classes": MAX_CLASSES}
    for key, value in args.items():
        cap = caps.get(key, MAX_MODEL_ARG)
        if isinstance(value, (int, float)) and value > cap:
            raise ManifestError(f"model {name}: {key} {value!r} is beyond {cap:,}")


class _NoRandomInit(TorchFunctionMode):
    """Skip ``Tensor.normal_`` (a meta tensor has no values to draw; on the meta device it
    goes through ``torch._refs`` and imports the compiler stack: seconds, once a process)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.Tensor.normal_:
            return args[0]
        return func(*args, **(kwargs or {}))


def parameter_count(arch: dict[str, Any]) -> int:
    """The parameters of architecture ``arch`` (a registry name or a graph), counted on the
    meta device (no memory)."""
    with torch.device("meta"), _NoRandomInit():
        model = models.from_arch(arch)
    return sum(p.numel() for p in model.parameters())


def check_parameter_bound(manifest: dict[str, Any], payload_bytes: int) -> None:
    """At most as many parameters as the payload can hold (see the module doc)."""
    params = parameter_count(manifest["arch"])
    bits = 8 * payload_bytes
    holds = bits * PARAMS_PER_BIT if manifest.get("method") else bits // 8
    limit = min(MAX_PARAMS, max(FREE_PARAMS, holds))
    if params > limit:
        why = (
            f"the absolute limit of {MAX_PARAMS:,}"
            if limit == MAX_PARAMS
            else f"what a {payload_bytes:,}-byte payload can hold ({limit:,})"
        )
        raise ManifestError(
            f"the architecture has {params:,} parameters, more than {why}; the file is damaged "
            "or was not written by cnnpress"
        )


def _layer_settings(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config and each per-layer override merged over it."""
    merged = [config]
    for override in (config.get("layers") or {}).values():
        if isinstance(override, dict):
            merged.append({**config, **override})
    return merged


def _bounded(name: str, value: Any, bits_needed: int, payload_bits: int, what: str) -> None:
    if bits_needed > payload_bits:
        raise ManifestError(
            f"method setting {name} {value!r} needs at least {bits_needed:,} bits ({what}), "
            f"more than the payload's {payload_bits:,}"
        )


def check_method(method: Any, payload_bytes: int) -> None:
    """A registered method with a config its own checks accept, explicit per layer, whose
    banks, codebooks and sparse layouts fit in the payload and whose iterations are bounded."""
    if method is None:
        return
    name, config = method.get("name"), method.get("config")
    if not isinstance(name, str) or name not in methods.names():
        raise ManifestError(
            f"unknown method {name!r:.40}; this cnnpress has {', '.join(methods.names())}"
        )
    if not isinstance(config, dict):
        raise ManifestError(f"method {name} has no config mapping")
    checked = dict(config)
    if checked.get("init") in ("auto", "weights"):
        checked["init"] = "random"  # as the loader rebuilds it
    try:
        config_from_dict(methods.get(name).Config, checked)
    except CnnpressError as err:
        raise ManifestError(f"method {name}: {err}") from None
    for key in ("target_size", "target_ratio"):
        if config.get(key) is not None:
            raise ManifestError(f"method {name}: a file records explicit settings, not {key}")
    bits = 8 * payload_bytes
    for st in _layer_settings(config):
        _check_allocations(st, bits)


def _check_allocations(st: dict[str, Any], bits: int) -> None:
    m, d = st.get("num_filters"), st.get("slice_channels")
    if _is_int(m) and _is_int(d):
        _bounded("num_filters", m, m * d, bits, f"a bank of {m} x {d} binary values")
    b, s = st.get("bits"), st.get("subvector")
    if _is_int(b) and 0 < b <= 16:
        size = 2**b * (s if _is_int(s) and s > 0 else 1)
        _bounded("bits", b, 8 * size, bits, f"a codebook of {size:,} values")
    it = st.get("iterations")
    if _is_int(it) and it > MAX_ITERATIONS:
        raise ManifestError(f"method setting iterations {it} is beyond {MAX_ITERATIONS}")
    layout = st.get("sparse_layout")
    if isinstance(layout, dict):
        records = [r for r in layout.values() if isinstance(r, list) and len(r) == 3]
        nonzeros = sum(r[0] for r in records if all(_is_int(v) for v in r))
        _bounded("sparse_layout", f"({len(records)} layers)", nonzeros, bits, "nonzeros")


def _is_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float (JSON ints have no bound)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_dataset(dataset: Any) -> None:
    """A data set's ``mean`` and ``std``, where given: finite numbers, one per channel, every
    ``std`` positive (what normalisation divides by)."""
    if not isinstance(dataset, dict):
        return  # null, or refused by check_sizes
    channels = dataset.get("in_channels")
    for key in ("mean", "std"):
        if key not in dataset:
            continue
        values = dataset[key]
        if not isinstance(values, list) or not 0 < len(values) <= MAX_IN_CHANNELS:
            raise ManifestError(
                f"dataset {key} must be a list of 1 to {MAX_IN_CHANNELS} numbers, "
                f"got {values!r:.40}"
            )
        for v in values:
            if not _is_number(v) or (key == "std" and v <= 0):
                what = "a positive number" if key == "std" else "a finite number"
                raise ManifestError(f"dataset {key} value {v!r:.40} is not {what}")
        if _is_int(channels) and len(values) != channels:
            raise ManifestError(f"dataset {key} has {len(values)} values for {channels} channels")


def check_activations(activations: Any) -> None:
    """Recorded activation quantization, or ``None``: ``{"bits": 8 or 4, "observer": str,
    "tensors": {node: [scale, zero_point]}}`` (one scale and zero point per tensor; a tensor
    kept at another width, such as the input and the logits of a 4-bit model, adds its bits:
    ``[scale, zero_point, 8]``)."""
    if activations is None:
        return
    if not isinstance(activations, dict):
        raise ManifestError(f"manifest activations must be a mapping, got {activations!r:.40}")
    bits, observer = activations.get("bits"), activations.get("observer")
    if not _is_int(bits) or bits not in ACTIVATION_BITS:
        raise ManifestError(f"activation bits must be 8 or 4, got {bits!r:.40}")
    if not isinstance(observer, str) or not 0 < len(observer) <= 64:
        raise ManifestError(
            f"activation observer must be a name of 1 to 64 characters, got {observer!r:.40}"
        )
    tensors = activations.get("tensors")
    if not isinstance(tensors, dict):
        raise ManifestError(f"activation tensors must be a mapping, got {tensors!r:.40}")
    if len(tensors) > MAX_ACTIVATION_TENSORS:
        raise ManifestError(
            f"activation tensors: {len(tensors):,} is more than {MAX_ACTIVATION_TENSORS:,}"
        )
    for name, entry in tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ManifestError(f"activation tensor name {name!r:.40} is no node name")
        _check_tensor(name, entry, bits)


def _check_tensor(name: str, entry: Any, bits: int) -> None:
    """One tensor's ``[scale, zero_point]`` or ``[scale, zero_point, bits]``."""
    if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3):
        raise ManifestError(
            f"activation tensor {name:.40} must be [scale, zero_point], got {entry!r:.40}"
        )
    scale, zero, own = (*entry, bits) if len(entry) == 2 else entry
    if not _is_int(own) or own not in ACTIVATION_BITS:
        raise ManifestError(f"activation tensor {name:.40} has bits {own!r:.40}, not 8 or 4")
    if not _is_number(scale) or scale <= 0:
        raise ManifestError(
            f"activation tensor {name:.40} has scale {scale!r:.40}, not a finite number > 0"
        )
    low, high = -(2 ** (own - 1)), 2 ** (own - 1) - 1
    if not _is_int(zero) or not low <= zero <= high:
        raise ManifestError(
            f"activation tensor {name:.40} has zero point {zero!r:.40}, not an integer "
            f"from {low} to {high}"
        )


def check_manifest(manifest: dict[str, Any], payload_bytes: int, version: int) -> None:
    """Every check of this module, cheapest first; raises :class:`ManifestError`."""
    check_sizes(manifest, payload_bytes, version)
    check_dataset(manifest.get("dataset"))
    check_activations(manifest.get("activations"))
    check_arch(manifest.get("arch"))
    check_method(manifest.get("method"), payload_bytes)
    check_parameter_bound(manifest, payload_bytes)


def array_checksums(blobs: list[bytes]) -> bytes:
    """The block format 3 writes after the payload: each stored array's CRC-16/CCITT
    (``binascii.crc_hqx``), a little-endian u16 each, in payload order.

    Binary and after the payload, not in the zlib-compressed manifest, so the file's size does
    not depend on the checksums' values (a size budget stays exact).
    """
    return struct.pack(f"<{len(blobs)}H", *(binascii.crc_hqx(b, 0) for b in blobs))


def split_checksums(manifest: dict[str, Any], body: bytes, version: int) -> bytes:
    """The payload of ``body`` (what follows the manifest, less the file checksum); from
    format 3 on, the per-array CRC-16 block at its end goes to ``manifest["crc16"]`` (hex).

    Raises:
        ManifestError: The manifest's array count is no count, or the block does not fit.
    """
    manifest.pop("crc16", None)  # only the binary block says what the checksums are
    if version < 3:
        return body
    count = manifest.get("count")
    if not _is_int(count) or not 0 <= count <= MAX_ARRAYS:
        raise ManifestError(
            f"manifest count must be an integer from 0 to {MAX_ARRAYS}, got {count!r:.40}"
        )
    size = 2 * count
    if size > len(body):
        raise ManifestError(f"the {count} array checksums do not fit in the file")
    manifest["crc16"] = body[len(body) - size :].hex()
    return body[: len(body) - size]


def check_array_checksums(
    manifest: dict[str, Any], arrays: list[tuple[str, int]], payload: bytes
) -> None:
    """Each stored array, ``(key, bytes)`` in payload order, against its CRC-16 (format 3;
    older files have none).

    Raises:
        ManifestError: The first array whose bytes do not match.
    """
    crc = manifest.get("crc16")
    if crc is None:
        return
    if len(crc) != CRC_DIGITS * len(arrays):
        raise ManifestError(
            f"the file has checksums for {len(crc) // CRC_DIGITS} arrays, the model {len(arrays)}"
        )
    want = struct.unpack(f"<{len(arrays)}H", bytes.fromhex(crc))
    offset = 0
    for i, ((key, size), crc16) in enumerate(zip(arrays, want, strict=True)):
        if binascii.crc_hqx(payload[offset : offset + size], 0) != crc16:
            raise ManifestError(
                f"array {i} ({key}) does not match its checksum: the payload is corrupt"
            )
        offset += size
