"""Sparse weights: where the non-zeros are, stored in as few bits as the mask allows.

Shared by magnitude pruning and k-means weight sharing (Han, Mao & Dally, "Deep Compression",
ICLR 2016). A layer of ``n`` weights keeps the ``z`` weights its 0/1 mask marks; their
positions are stored in whichever of two encodings takes fewer bits for that mask:

* **bitmap**: one bit per weight (``n`` bits, ``"u1"``);
* **relative**: for each kept weight in C order the number of zeros before it since the
  previous one, at ``B`` bits per entry (``1 <= B <= 16``). The code ``2**B - 1`` is a filler
  that skips ``2**B - 1`` zeros and keeps nothing, so a gap ``g`` takes ``g // (2**B - 1)``
  fillers and one entry ``g % (2**B - 1)``: ``B * (z + sum(g // (2**B - 1)))`` bits. Unlike
  Deep Compression's filler zero *weights*, the fillers store no value.

The choice is made from the mask alone (fewest bits; ties go to the bitmap, then to the
smaller ``B``) and written down as the layer's *record* ``[z, B, entries]`` (``B = 0`` means
bitmap, whose entries are ``n``). Array shapes in a file follow from the record, so a method
puts the records of all its layers in its config (``sparse_layout``): a model rebuilt from that
config gets a placeholder mask with the same record, which the file's payload then replaces.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnpress.errors import ConfigError
from cnnpress.geometry import out_hw
from cnnpress.methods.base import CTarget, config_from_dict
from cnnpress.methods.cache import DerivedWeightLayer

__all__ = [
    "MAX_GAP_BITS",
    "SparseLayer",
    "c_sparse_weights",
    "check_sparse_layout",
    "decode_positions",
    "describe_mask",
    "encode_positions",
    "is_fraction",
    "keep_largest",
    "layer_settings",
    "placeholder_mask",
    "position_bits",
    "recorded_layouts",
    "sync_layout",
]

MAX_GAP_BITS = 16


def _flat(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).reshape(-1).astype(bool)


def _gaps(flat: np.ndarray) -> np.ndarray:
    """Zeros before each kept position since the previous one."""
    pos = np.flatnonzero(flat)
    return np.diff(pos, prepend=-1) - 1


def _entries(gaps: np.ndarray, bits: int) -> int:
    return int(gaps.size + (gaps // ((1 << bits) - 1)).sum())


def describe_mask(mask: torch.Tensor | np.ndarray) -> list[int]:
    """The record ``[nonzeros, B, entries]`` of the cheaper encoding (``B = 0``: bitmap)."""
    flat = _flat(mask)
    gaps = _gaps(flat)
    best = [int(gaps.size), 0, int(flat.size)]
    best_bits = flat.size
    for bits in range(1, MAX_GAP_BITS + 1):
        entries = _entries(gaps, bits)
        if entries * bits < best_bits:
            best, best_bits = [int(gaps.size), bits, entries], entries * bits
    return best


def position_bits(record: list[int] | tuple[int, ...]) -> int:
    """Bits the positions of a record take: ``entries`` times ``B`` (1 for the bitmap)."""
    _, bits, entries = record
    return entries * max(bits, 1)


def encode_positions(mask: torch.Tensor | np.ndarray, bits: int) -> tuple[str, np.ndarray]:
    """``(encoding, codes)`` of the mask: the bitmap (``bits == 0``) or relative gaps."""
    flat = _flat(mask)
    if bits == 0:
        return "u1", flat.astype(np.uint8)
    gaps = _gaps(flat)
    filler = (1 << bits) - 1
    counts = gaps // filler + 1
    codes = np.full(int(counts.sum()), filler, dtype=np.int64)
    codes[np.cumsum(counts) - 1] = gaps % filler
    return f"u{bits}", codes


def decode_positions(codes: np.ndarray, bits: int, numel: int) -> np.ndarray:
    """The flat boolean mask of ``numel`` weights that :func:`encode_positions` stored.

    Raises:
        ValueError: The codes point past the end of the layer.
    """
    codes = np.asarray(codes, dtype=np.int64).reshape(-1)
    if bits == 0:
        if codes.size != numel:
            raise ValueError(f"a bitmap of {codes.size} bits does not fit {numel} weights")
        return codes.astype(bool)
    filler = (1 << bits) - 1
    real = codes != filler
    ends = np.cumsum(np.where(real, codes + 1, filler))
    pos = ends[real] - 1
    if pos.size and pos[-1] >= numel:
        raise ValueError(f"stored positions run past the {numel} weights of the layer")
    flat = np.zeros(numel, dtype=bool)
    flat[pos] = True
    return flat


def placeholder_mask(record: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """A mask of ``shape`` whose encoding under the record's ``B`` gives exactly the record.

    The kept weights form one run, after ``fillers * (2**B - 1)`` zeros for a relative record.
    """
    nonzeros, bits, entries = record
    numel = math.prod(shape)
    start = (entries - nonzeros) * ((1 << bits) - 1) if bits else 0
    if start + nonzeros > numel:
        raise ConfigError(
            f"sparse_layout record {record} does not fit a layer of {numel} weights; "
            "drop sparse_layout from the config to recompute it"
        )
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[start : start + nonzeros] = True
    return flat.view(shape)


def keep_largest(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the ``keep`` largest scores (ties: the earlier position wins)."""
    flat = score.detach().reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[: max(0, keep)]] = True
    return mask.view_as(score)


def check_sparse_layout(value: Any) -> None:
    """Refuse a ``sparse_layout`` config value that is not ``{name: [z, B, entries]}``."""
    if not isinstance(value, dict):
        raise ConfigError("sparse_layout must map layer names to [nonzeros, bits, entries]")
    for name, rec in value.items():
        ok = (
            isinstance(rec, (list, tuple))
            and len(rec) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in rec)
            and rec[1] <= MAX_GAP_BITS
            and (rec[1] == 0 or (rec[2] >= rec[0] and (rec[0] > 0 or rec[2] == 0)))
        )
        if not ok:
            raise ConfigError(
                f"sparse_layout[{name!r}] = {rec!r} is not a valid [nonzeros, bits, entries] "
                "record; drop sparse_layout from the config to recompute it"
            )


class SparseLayer(DerivedWeightLayer):
    """A conv or linear layer that computes with a rebuilt dense weight, maybe masked.

    Subclasses define :meth:`dense_weight`. The geometry is copied from ``source``; conv
    layers get ``stride``/``padding``/``dilation``/``groups``/``padding_mode`` (linear ones
    have none, so the dense runtime rebuilds the right kind): any conv is represented
    (:data:`cnnpress.methods.base.ANY_CONV`). With ``sparse`` the layer holds a boolean
    ``mask`` buffer and its ``record`` (see the module doc).
    """

    def __init__(self, source: nn.Conv2d | nn.Linear, sparse: bool) -> None:
        super().__init__()
        if isinstance(source, nn.Conv2d):
            self.in_channels, self.out_channels = source.in_channels, source.out_channels
            self.kernel_size = source.kernel_size
            self.stride, self.padding = source.stride, source.padding
            self.dilation, self.groups = source.dilation, source.groups
            self.padding_mode = source.padding_mode
            # what nn.Conv2d pads with when the mode is not zeros (F.pad's order)
            self._reversed_padding_repeated_twice = list(source._reversed_padding_repeated_twice)
        else:
            self.in_features, self.out_features = source.in_features, source.out_features
        self.weight_shape = tuple(source.weight.shape)
        dev = source.weight.device
        bias = source.bias
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        mask = torch.ones(self.weight_shape, dtype=torch.bool, device=dev) if sparse else None
        self.register_buffer("mask", mask)
        self.record: list[int] | None = describe_mask(mask) if sparse else None

    @property
    def is_conv(self) -> bool:
        return hasattr(self, "stride")

    def dense_weight(self) -> torch.Tensor:
        """The float weight the layer computes with."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.derived_weight(self.dense_weight)
        if not self.is_conv:
            return F.linear(x, w, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d does
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return F.conv2d(x, w, self.bias, self.stride, padding, self.dilation, self.groups)

    def numel(self) -> int:
        """Weights of the dense layer."""
        return math.prod(self.weight_shape)

    def kept(self) -> int:
        """Weights stored (the mask's non-zeros, or all)."""
        return int(self.mask.sum()) if self.mask is not None else self.numel()

    def fp32_bits(self) -> int:
        """Bits of the dense float32 layer this one replaces (weights and bias)."""
        return 32 * (self.numel() + (self.bias.numel() if self.bias is not None else 0))

    def pixels(self, input_shape: tuple[int, ...]) -> int:
        """Output positions per sample for one input (C, H, W), or rows for a linear layer."""
        if not self.is_conv:
            return math.prod(input_shape[:-1]) if len(input_shape) > 1 else 1
        oh, ow = out_hw(self, *input_shape[-2:])
        return oh * ow

    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask and recompute the record."""
        self.mask.copy_(mask.view(self.weight_shape))
        self.record = describe_mask(self.mask)

    def apply_record(self, record: list[int]) -> None:
        """Adopt a recorded layout: keep the mask if it matches, else a placeholder mask."""
        record = [int(v) for v in record]
        if record[1] == 0 and record[2] != self.numel():
            raise ConfigError(
                f"sparse_layout record {record}: a bitmap of a layer of {self.numel()} weights "
                "has that many entries; drop sparse_layout from the config to recompute it"
            )
        _, codes = encode_positions(self.mask, record[1])
        if [self.kept(), record[1], codes.size] != record:
            self.mask.copy_(placeholder_mask(record, self.weight_shape))
        self.record = record

    def positions(self) -> tuple[str, np.ndarray]:
        """The stored positions under the recorded encoding.

        Raises:
            ConfigError: The mask changed since the record was made (the file would not load).
        """
        encoding, codes = encode_positions(self.mask, self.record[1])
        if self.kept() != self.record[0] or codes.size != self.record[2]:
            raise ConfigError(
                f"{type(self).__name__}: the mask no longer matches its recorded layout "
                f"{self.record}; call cnnpress.methods.sparse.sync_layout(model) before saving"
            )
        return encoding, codes

    def load_positions(self, codes: np.ndarray, values_count: int) -> torch.Tensor:
        """Set the mask from stored codes; returns it. Checks it keeps ``values_count``."""
        flat = decode_positions(codes, self.record[1], self.numel())
        if int(flat.sum()) != values_count:
            raise ValueError(
                f"positions mark {int(flat.sum())} weights, the file stores {values_count}"
            )
        self.mask.copy_(torch.from_numpy(flat).view(self.weight_shape))
        return self.mask


def sync_layout(model: nn.Module) -> dict[str, list[int]]:
    """Re-record every sparse layer's layout from its mask, also in ``model.cnnpress_method``.

    Call after changing masks by hand (training hooks call it themselves), before saving.

    Returns:
        ``{layer name: record}`` of the sparse layers.
    """
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLayer) and module.mask is not None:
            module.record = describe_mask(module.mask)
            layout[name] = list(module.record)
    info = getattr(model, "cnnpress_method", None)
    config = info.get("config") if isinstance(info, dict) else None
    if isinstance(config, dict) and "sparse_layout" in config and layout:
        config["sparse_layout"] = {**config["sparse_layout"], **layout}
    return layout


def recorded_layouts(model: nn.Module) -> dict[str, list[int]]:
    """``{layer name: record}`` of the sparse layers, as recorded (not recomputed)."""
    return {
        name: list(m.record)
        for name, m in model.named_modules()
        if isinstance(m, SparseLayer) and m.record is not None
    }


def c_sparse_weights(layer: SparseLayer, target: CTarget, **fields: Any) -> dict[str, Any]:
    """The C conv descriptor's weight ``fields`` (kind, values) of a sparse layer with its
    kept positions when it is pruned, and the scratch of the Huffman decoders of its coded
    streams (:meth:`cnnpress.methods.base.Method.c_weights`)."""
    if layer.record is not None:
        kept, bits, entries = layer.record
        fields.update(pos=target.array("positions"), pos_bits=bits, pos_count=entries, kept=kept)
    decoders = ((1, fields.get("code_bits", 0)), (2, fields.get("pos_bits", 0)))
    fields["scratch"] = sum(target.huff_ints(1 << b) for flag, b in decoders if target.huff & flag)
    return fields


def is_fraction(value: Any) -> bool:
    """Whether ``value`` is a number (not a bool) in [0, 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def layer_settings(cls: type, config: Any, overrides: dict[str, Any], allowed: set[str]) -> Any:
    """The config ``cls`` of one layer: ``config`` with its per-layer ``overrides`` applied.

    Raises:
        ConfigError: An override names a setting outside ``allowed``, or a value is invalid.
    """
    extra = sorted(set(overrides) - allowed)
    if extra:
        raise ConfigError(
            f"per-layer setting(s) {', '.join(extra)} are not allowed; per layer only "
            f"{', '.join(sorted(allowed))}"
        )
    base = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
    return config_from_dict(cls, {**base, **overrides, "layers": {}})
