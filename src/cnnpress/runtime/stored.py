"""Export forms that keep the values as the ``.cnnp`` file stores them (ONNX ``stm`` mode).

An ONNX file that expands what cnnpress packed is not smaller where it is deployed. In these
forms every value stays in its stored width, and the graph widens it with standard operators:

* :class:`PackedSTMConv` (the form ``"packed_stm"``): an SLBF conv's bank once, bit-packed
  into ``uint8`` (8 signs a byte), unpacked with Cast, Div, Floor, Sub and Mul, then tiled for
  the grouped conv; its selections packed too, at their index width rounded up to 1, 2, 4 or
  8 bits (16 above 256 filters), unpacked the same way and widened by a Cast before the Gather.
  A method's layer takes the form in :data:`FORMS` that its method's
  :meth:`~cnnpress.methods.base.Method.onnx_form` names (:func:`packed_form`).
* :class:`StoredFloats`: the floats that are not bit-packed, in ``float16`` where the file
  keeps float16 (then a Cast), or ``int8`` with a float32 scale per row where it keeps int8
  (a Cast and a Mul); float32 otherwise.
* :class:`StoredConv`, :class:`StoredLinear`, :class:`StoredAffine` (a BatchNorm in eval
  mode, folded to a per-channel scale and shift): the plain layers with their floats so kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnpress.floats import check_float_bits, q8_encode, q8_rows
from cnnpress.methods import method_for

__all__ = [
    "FORMS",
    "PackedSTMConv",
    "StoredAffine",
    "StoredConv",
    "StoredFloats",
    "StoredLinear",
    "packed_form",
    "stored_form",
    "stored_tensors",
]


class StoredFloats(nn.Module):
    """A float tensor held at ``float_bits`` (32, 16, or 8: int8 and a scale per row)."""

    def __init__(self, values: torch.Tensor, float_bits: int) -> None:
        super().__init__()
        check_float_bits(float_bits)
        values = values.detach().float().cpu()
        self.shape = tuple(values.shape)
        self.float_bits = float_bits
        if float_bits == 8:
            data = q8_encode(values.numpy())
            rows = q8_rows(self.shape)
            scale = np.frombuffer(data, dtype="<f4", count=rows).copy()
            q = np.frombuffer(data, dtype=np.int8, offset=4 * rows).copy()
            self.register_buffer("data", torch.from_numpy(q.reshape(self.shape)))
            scale_shape = (rows,) + (1,) * (len(self.shape) - 1) if len(self.shape) >= 2 else ()
            self.register_buffer("scale", torch.from_numpy(scale).reshape(scale_shape))
        else:
            dtype = torch.float16 if float_bits == 16 else torch.float32
            self.register_buffer("data", values.to(dtype))
            self.scale = None

    def forward(self) -> torch.Tensor:
        if self.float_bits == 8:
            return self.data.float() * self.scale
        return self.data.float()

    def stored(self) -> list[str]:
        """The buffers the export keeps as they are (float32 needs no protection)."""
        return {32: [], 16: ["data"], 8: ["data", "scale"]}[self.float_bits]


def _optional(values: torch.Tensor | None, float_bits: int) -> StoredFloats | None:
    return None if values is None else StoredFloats(values, float_bits)


def _packing(num_filters: int) -> int:
    """Bits per selection in the export: the index width rounded up to 1, 2, 4 or 8 (so that
    whole indices fill a byte), or 16 for banks of more than 256 filters."""
    width = max(1, math.ceil(math.log2(num_filters)))
    return next(b for b in (1, 2, 4, 8, 16) if b >= width)


def _pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit indices, ``8 // bits`` a byte, first index in the high bits."""
    flat = indices.reshape(-1).astype(np.int64)
    if bits == 16:
        return flat.astype(np.int16)
    per = 8 // bits
    flat = np.concatenate([flat, np.zeros(-len(flat) % per, dtype=np.int64)])
    groups = flat.reshape(-1, per)
    shifts = bits * np.arange(per - 1, -1, -1)
    return (groups << shifts).sum(axis=1).astype(np.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits``-bit fields of ``packed`` (uint8, a trailing axis of 1), as floats along
    that axis, computed with Cast, Div, Floor and Mod (what every ONNX runtime has)."""
    per = 8 // bits
    weights = torch.tensor([float(2 ** (bits * k)) for k in range(per - 1, -1, -1)])
    return torch.fmod(torch.floor(packed.float() / weights), float(2**bits))


class PackedSTMConv(nn.Module):
    """An SLBF conv as split-transform-merge over its bit-packed bank (module doc).

    ``layer`` has ``bank()`` (m, d, kh, kw) of +-1 and ``indices()`` (n, s), ``num_slices``,
    ``num_filters``, ``slice_channels``, ``out_channels``, ``stride``, ``padding``,
    ``dilation``, ``scale`` and ``bias`` (``None`` or n values); ``sizes`` is its input and
    output size ``(h_in, w_in, h_out, w_out)``.
    """

    def __init__(self, layer: nn.Module, float_bits: int, sizes: tuple[int, int, int, int]) -> None:
        super().__init__()
        s, m, n = layer.num_slices, layer.num_filters, layer.out_channels
        self.num_slices, self.num_filters, self.out_channels = s, m, n
        self.slice_channels, self.sizes = layer.slice_channels, sizes
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation
        with torch.no_grad():
            bank = layer.bank()  # m, d, kh, kw in {-1, +1}
            indices = layer.indices().cpu().numpy()  # n, s
        self.filter_shape = tuple(bank.shape[1:])
        bits = (bank.reshape(-1) > 0).cpu().numpy()  # all m*d*kh*kw signs in one stream
        self.register_buffer("bank_bits", torch.from_numpy(np.packbits(bits).reshape(-1, 1)))
        self.index_bits = _packing(m)
        packed = _pack_indices(indices, self.index_bits)
        self.register_buffer("selection", torch.from_numpy(packed.reshape(-1, 1)))
        # where slice j's maps start among the s*m bank responses (none needed for one slice)
        dtype = np.uint8 if s * m <= 256 else np.int16 if s * m <= 2**15 else np.int32
        offsets = (np.arange(s) * m).astype(dtype).reshape(1, s)
        self.register_buffer("offsets", torch.from_numpy(offsets) if s > 1 else None)
        scale = None if layer.scale is None else layer.scale.view(1, n, 1, 1)
        bias = None if layer.bias is None else layer.bias.view(1, n, 1, 1)
        self.scale, self.bias = _optional(scale, float_bits), _optional(bias, float_bits)

    def bank(self) -> torch.Tensor:
        """The bank (m, d, kh, kw) of +-1 floats."""
        size = self.num_filters * int(np.prod(self.filter_shape))
        bit = _unpack(self.bank_bits, 1)  # bytes, 8
        if bit.numel() != size:  # the stream was padded to whole bytes
            bit = bit.reshape(-1)[:size]
        return bit.reshape(self.num_filters, *self.filter_shape) * 2.0 - 1.0

    def indices(self) -> torch.Tensor:
        """The selections (n, s) as int64."""
        n, s = self.out_channels, self.num_slices
        if self.index_bits == 16:
            return self.selection.long().view(n, s)
        field = _unpack(self.selection, self.index_bits)  # bytes, per
        if field.numel() != n * s:  # the last byte was padded
            field = field.reshape(-1)[: n * s]
        return field.reshape(n, s).long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, m, d = self.num_slices, self.num_filters, self.slice_channels
        h_in, w_in, h, w = self.sizes
        # every slice through the bank: one conv over (N*s, d, H, W), no tiled copy of it
        z = F.conv2d(
            x.reshape(-1, d, h_in, w_in),
            self.bank(),
            None,
            self.stride,
            self.padding,
            self.dilation,
        )
        z = z.reshape(-1, s * m, h, w)  # z[:, j*m + t] = x_j * B[t]
        index = self.indices()  # n, s
        if self.offsets is not None:
            index = index + self.offsets.long()  # [i, j] = j*m + p(i, j)
        y = z[:, index].sum(dim=2)  # one Gather of the n x s maps, then a ReduceSum
        if self.scale is not None:
            y = y * self.scale()
        if self.bias is not None:
            y = y + self.bias()
        return y

    def stored(self) -> list[str]:
        """The buffers that hold the file's packed values (the export keeps them as they are)."""
        return ["bank_bits", "selection"] + (["offsets"] if self.offsets is not None else [])


class StoredConv(nn.Module):
    """A plain ``nn.Conv2d`` with its weight and bias at ``float_bits``."""

    def __init__(self, conv: nn.Conv2d, float_bits: int) -> None:
        super().__init__()
        self.weight = StoredFloats(conv.weight, float_bits)
        self.bias = _optional(conv.bias, float_bits)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias()
        return F.conv2d(
            x, self.weight(), bias, self.stride, self.padding, self.dilation, self.groups
        )


class StoredLinear(nn.Module):
    """A plain ``nn.Linear`` with its weight and bias at ``float_bits``."""

    def __init__(self, linear: nn.Linear, float_bits: int) -> None:
        super().__init__()
        self.weight = StoredFloats(linear.weight, float_bits)
        self.bias = _optional(linear.bias, float_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), None if self.bias is None else self.bias())


class StoredAffine(nn.Module):
    """An eval-mode ``BatchNorm2d`` as ``x * scale + shift`` per channel, the two vectors as
    the rows of one array at ``float_bits`` (at int8 each row keeps its own scale, as the
    file's two vectors do)."""

    def __init__(self, bn: nn.BatchNorm2d, float_bits: int) -> None:
        super().__init__()
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.float()
            shift = -bn.running_mean.float() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.float()
        c = scale.numel()
        self.values = StoredFloats(torch.stack([scale, shift]).view(2, c, 1, 1), float_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = self.values()  # 2, c, 1, 1
        return x * values[0] + values[1]


#: The compact forms of a method's layers, by the name its method's ``onnx_form`` gives.
FORMS: dict[str, type[nn.Module]] = {"packed_stm": PackedSTMConv}


def form_name(module: nn.Module) -> str | None:
    """The name in :data:`FORMS` of ``module``'s compact form, or ``None`` (none: dense)."""
    method = method_for(module)
    return None if method is None else method.onnx_form(module)


def packed_form(
    module: nn.Module, float_bits: int, out_sizes: dict[int, tuple[int, int, int, int]]
) -> nn.Module | None:
    """The compact form of a method's layer (:func:`form_name`), or ``None`` to keep it (for
    ``replace_layers``); ``out_sizes`` holds its input and output size by ``id``."""
    name = form_name(module)
    return None if name is None else FORMS[name](module, float_bits, out_sizes[id(module)])


def stored_form(
    module: nn.Module, float_bits: int, out_sizes: dict[int, tuple[int, int, int, int]]
) -> nn.Module | None:
    """The storage-keeping export form of ``module``, or ``None`` to keep it (for
    ``replace_layers``); ``out_sizes`` holds the input and output size of each layer that has
    a compact form (:func:`packed_form`) by ``id``."""
    packed = packed_form(module, float_bits, out_sizes)
    if packed is not None:
        return packed
    if type(module) is nn.Conv2d:
        return StoredConv(module, float_bits)
    if type(module) is nn.Linear:
        return StoredLinear(module, float_bits)
    if type(module) is nn.BatchNorm2d and module.track_running_stats:
        return StoredAffine(module, float_bits)
    return None


def stored_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(module, buffer name)`` of ``model`` that holds packed or narrow stored values."""
    return [
        (m, name)
        for m in model.modules()
        if isinstance(m, (PackedSTMConv, StoredFloats))
        for name in m.stored()
    ]
