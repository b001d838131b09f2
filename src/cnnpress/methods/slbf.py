"""SLBF: stacking low-dimensional binary filters.

Lan & Lan, "Compressing Deep Convolutional Neural Networks by Stacking Low-dimensional Binary
Convolution Filters", AAAI 2021 (arXiv:2010.02778).

A layer with ``n`` filters over ``c`` input channels and a ``k x k`` kernel is cut into
``s = c / d`` slices of ``d`` channels. One shared bank ``B`` in {-1,+1}^(m x d x k x k) holds
``m`` binary filters; filter ``i`` is the stack over slices ``j`` of ``B[p(i, j)]`` (times an
optional scale ``alpha_i``)::

    W[i, j*d:(j+1)*d] = alpha_i * B[p(i, j)]

Training (the estimator). The layer keeps full-precision *latent* filters ``w`` (n x c x k x k,
like the weights of the conv it replaces) and, in training mode, projects them onto the SLBF
set before every forward: one Lloyd step of binary k-means over the unit-norm slices (each
slice goes to the bank filter it agrees with most, ``p(i, j) = argmax_t <w_ij, B_t>``; each
bank filter becomes the sign of its members' vote; an unused one is re-seeded from the slice
the bank fits worst). The forward computes with the projection; backward, the gradient of
the stacked binary filters goes to ``w`` straight through, divided by each filter's mean
``|w_i|``: the binary filter stands for ``mean|w_i| * S_i`` (as in BWN), so the latent
filters move as the dense weights would and a plain ``torch.optim.SGD`` over
``model.parameters()`` trains them at the dense model's learning rates. Bank bits flip when
their members' majority flips, selections change when a slice moves nearer another bank
filter (the periodic re-assignment of Sub-bit Neural Networks, Wang et al. ICCV 2021, done
every step), and no bank filter stays unused. With ``scale`` the layer's ``alpha_i`` is the
L2-optimal ``<w_i, S_i> / |S_i|^2``, computed from ``w`` (not a free parameter, so nothing
but the filters sets the output magnitude in a network without BatchNorm).

This replaces the first estimator (a bank proxy with a clipped sign STE and selection logits
with an identity STE): measured on a pretrained ResNet-20, 60 SGD steps flipped none of its
20,736 bank bits and changed 1 of 3,712 selections (``benchmarks/slbf_learning.py``).

Forward by split-transform-merge: a grouped conv of the input (``s`` groups) with the bank
gives ``s*m`` maps ``z[j, t] = x_j * B[t]``; output ``i`` is ``sum_j z[j, p(i, j)]``. By
linearity this equals the dense conv with the stacked filters, which is the path used while
training (cheaper in PyTorch, same values; the tests check both).

Stored bits: ``m*d*k*k`` (bank) + ``n*s*ceil(log2 m)`` (indices) + 32 per scale and bias.
Operations per output pixel: ``m*c*k*k`` binary-weight MACs and ``n*s`` additions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnpress import kernel
from cnnpress.errors import ConfigError
from cnnpress.floats import float_encoding, stored_float_bits
from cnnpress.geometry import numeric_padding, out_hw
from cnnpress.methods import slbf_init
from cnnpress.methods.base import (
    METHODS,
    PLAIN_CONV,
    CTarget,
    LayerCost,
    Method,
    config_from_dict,
    following_batchnorm,
    replace_module,
    select_layers,
    to_numpy,
)
from cnnpress.methods.binary_kmeans import lloyd_step, unit_slices
from cnnpress.methods.slbf_config import SLBFConfig, check_slices, index_bits
from cnnpress.quantizers import binary_sign

__all__ = [
    "SLBF",
    "SLBFConfig",
    "SLBFConv2d",
    "SLBFLayer",
    "SLBFLinear",
    "describe",
    "index_bits",
    "learning_stats",
    "set_path",
    "snapshot",
]

PATHS = ("auto", "dense", "stm", "kernel")
INIT_ROUNDS = 3
_TINY = 1e-12


class SLBFLayer(nn.Module):
    """Latent filters, the binary bank and selections they project to, optional scale, bias.

    Shared by the conv and linear layers; see the module docstring for the estimator.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        slice_channels: int,
        num_filters: int,
        scale: bool,
        bias: bool,
    ) -> None:
        super().__init__()
        check_slices(in_channels, slice_channels, num_filters)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.slice_channels, self.num_filters = slice_channels, num_filters
        self.num_slices = in_channels // slice_channels
        self.has_scale = bool(scale)
        self.revive_unused = True  # ablation switches (SLBFConfig): re-seed unused filters,
        self.latent_gain = True  # divide the latent gradient by mean |w_i|
        kh, kw = kernel_size
        self.latent = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.register_buffer("binary_bank", torch.ones(num_filters, slice_channels, kh, kw))
        self.register_buffer(
            "selection", torch.zeros(out_channels, self.num_slices, dtype=torch.long)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.latent, a=math.sqrt(5))  # as nn.Conv2d does
        with torch.no_grad():
            self.binary_bank.copy_(binary_sign(torch.randn_like(self.binary_bank)))
        self.project(INIT_ROUNDS)
        self.path = "auto"

    # -- the binary parts -------------------------------------------------------------------
    def bank(self) -> torch.Tensor:
        """The binary bank B in {-1,+1}, shape (m, d, kh, kw) (no gradient)."""
        return self.binary_bank

    def indices(self) -> torch.Tensor:
        """Selections p(i, j), shape (n, s), int64 in [0, m)."""
        return self.selection

    def bank_usage(self) -> int:
        """How many of the m bank filters are selected at least once."""
        return int(self.selection.unique().numel())

    def usage_counts(self) -> torch.Tensor:
        """How often each bank filter is selected, shape (m,)."""
        return torch.bincount(self.selection.flatten(), minlength=self.num_filters)

    def binary_filters(self) -> torch.Tensor:
        """The stacked binary filters S (n, c, kh, kw) in {-1,+1}: S[i, j-th slice] = B[p(i, j)]."""
        return self.binary_bank[self.selection].reshape(self.latent.shape)

    @property
    def scale(self) -> torch.Tensor | None:
        """Per-filter scale alpha_i = <w_i, S_i> / |S_i|^2 of the latent filters (or None)."""
        if not self.has_scale:
            return None
        s = self.binary_filters().flatten(1).to(self.latent.dtype)
        return (self.latent.flatten(1) * s).mean(1).clamp_min(_TINY)

    @torch.no_grad()
    def project(self, rounds: int = 1) -> None:
        """Bank and selections from the latent filters: ``rounds`` Lloyd steps (module doc)."""
        n, s, m = self.out_channels, self.num_slices, self.num_filters
        x = unit_slices(self.latent, self.slice_channels).reshape(n * s, -1)
        bank = self.binary_bank.reshape(m, -1).to(x.dtype)
        for _ in range(rounds):
            bank = lloyd_step(x, bank, n, s, self.revive_unused)
        self.binary_bank.copy_(bank.view_as(self.binary_bank))
        self.selection.copy_((x @ bank.T).argmax(1).view(n, s))

    def stacked_weight(self) -> torch.Tensor:
        """Dense filters (n, c, kh, kw): the stacked bank filters times the scales.

        Differentiable: the gradient reaches the latent filters through the straight-through
        estimator, divided by each filter's mean ``|w_i|`` (module docstring).
        """
        w = self.binary_filters().to(self.latent.dtype)
        gain = self.latent.detach().abs().flatten(1).mean(1).clamp_min(_TINY)
        if not self.latent_gain:
            gain = torch.ones_like(gain)
        w = w + (self.latent - self.latent.detach()) / gain.view(-1, 1, 1, 1)
        if self.has_scale:
            w = w * self.scale.view(-1, 1, 1, 1)
        return w

    def load_selection(
        self, indices: torch.Tensor, bank: torch.Tensor, scale: torch.Tensor | None = None
    ) -> None:
        """Set the selections and the bank; the latent filters become ``scale_i * S_i``.

        Without a ``scale``, filters get unit norm. Either way the latent filters project back
        to exactly this bank and these selections (one Lloyd step leaves them unchanged).
        """
        kh, kw = self.kernel_size
        with torch.no_grad():
            self.selection.copy_(indices.long().view_as(self.selection))
            self.binary_bank.copy_(binary_sign(bank.reshape(self.binary_bank.shape)))
            if scale is None:
                scale = torch.full((self.out_channels,), (self.in_channels * kh * kw) ** -0.5)
            s = self.binary_filters()
            self.latent.copy_(s * scale.to(s).view(-1, 1, 1, 1))

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the bank, selections and latent filters (for :func:`learning_stats`)."""
        return {
            "bank": self.binary_bank.clone(),
            "selection": self.selection.clone(),
            "latent": self.latent.detach().clone(),
        }

    def stored_bits(self, float_bits: int = 32) -> int:
        """m*d*kh*kw + n*s*ceil(log2 m) + ``float_bits`` per scale and bias."""
        kh, kw = self.kernel_size
        bits = self.num_filters * self.slice_channels * kh * kw
        bits += self.out_channels * self.num_slices * index_bits(self.num_filters)
        floats = self.has_scale + (self.bias is not None)
        return bits + floats * stored_float_bits((self.out_channels,), float_bits)

    def fp32_bits(self) -> int:
        """Bits of the dense float32 layer this one replaces (weights and bias)."""
        kh, kw = self.kernel_size
        weights = self.out_channels * self.in_channels * kh * kw
        return 32 * (weights + (self.out_channels if self.bias is not None else 0))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"slice_channels={self.slice_channels}, num_filters={self.num_filters}, "
            f"scale={self.has_scale}, bias={self.bias is not None}, path={self.path}"
        )


class SLBFConv2d(SLBFLayer):
    """A Conv2d whose filters are stacks of binary filters from one shared bank.

    Args:
        in_channels: Input channels ``c``.
        out_channels: Filters ``n``.
        kernel_size: ``k`` (int or pair).
        stride, padding, dilation: As in ``nn.Conv2d``.
        bias: Learn a float bias.
        slice_channels: Slice width ``d``; must divide ``c``.
        num_filters: Bank size ``m`` (2 to 2**16).
        scale: Learn a per-filter scale ``alpha`` (leave off when BatchNorm follows).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        slice_channels: int = 8,
        num_filters: int = 16,
        scale: bool = False,
    ) -> None:
        ks = nn.modules.utils._pair(kernel_size)
        super().__init__(in_channels, out_channels, ks, slice_channels, num_filters, scale, bias)
        self.stride = nn.modules.utils._pair(stride)
        self.padding = nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, slice_channels: int, num_filters: int, scale: bool
    ) -> SLBFConv2d:
        """An SLBF layer of the same shape as ``conv`` (fresh bank and selections).

        Raises:
            ConfigError: ``conv`` is not a plain conv (:data:`cnnpress.methods.base.PLAIN_CONV`).
        """
        PLAIN_CONV.check(conv, method="slbf")
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            numeric_padding(conv),
            conv.dilation,
            conv.bias is not None,
            slice_channels,
            num_filters,
            scale,
        )

    def _conv(self, x: torch.Tensor, w: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, groups)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Dense conv with the stacked filters (the training path)."""
        y = self._conv(x, self.stacked_weight())
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def forward_stm(self, x: torch.Tensor) -> torch.Tensor:
        """Split-transform-merge: grouped conv with the bank, then gather and sum per filter.

        The inference form (the bank and selections are fixed; no gradient reaches the latent
        filters): training always runs :meth:`forward_dense`.
        """
        s, m, n = self.num_slices, self.num_filters, self.out_channels
        bank = self.binary_bank.to(x.dtype)
        z = self._conv(x, bank.repeat(s, 1, 1, 1), groups=s)  # N, s*m, H, W
        flat = self.selection + torch.arange(s, device=z.device).mul(m).view(1, s)
        y = z[:, flat.flatten()].unflatten(1, (n, s)).sum(dim=2)
        if self.has_scale:
            y = y * self.scale.view(1, -1, 1, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.project()
            return self.forward_dense(x)
        if self.path in ("auto", "kernel"):  # fast inference (cnnpress.kernel) in eval mode
            return kernel.forward(self, x)
        if self.path == "stm":
            return self.forward_stm(x)
        return self.forward_dense(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}, padding={self.padding}"


class SLBFLinear(SLBFLayer):
    """SLBF for a Linear layer: a 1x1 conv over ``in_features`` channels (k = 1)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        slice_channels: int = 8,
        num_filters: int = 16,
        scale: bool = True,
    ) -> None:
        super().__init__(
            in_features, out_features, (1, 1), slice_channels, num_filters, scale, bias
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, slice_channels: int, num_filters: int, scale: bool
    ) -> SLBFLinear:
        """An SLBF layer of the same shape as ``linear``."""
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            slice_channels,
            num_filters,
            scale,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.project()
        w = self.stacked_weight().flatten(1)
        return F.linear(x, w, self.bias)


@METHODS.register("slbf")
class SLBF(Method):
    """SLBF (Lan & Lan, AAAI 2021): every filter a stack of binary filters from a shared bank."""

    name = "slbf"
    Config = SLBFConfig
    layer_types = (SLBFConv2d, SLBFLinear)
    represents = PLAIN_CONV  # groups 1, zero padding
    c_kinds = ("slbf",)
    distil_from_init = True  # the bank starts far from the trained filters: KD helps most

    def report(self, model: nn.Module) -> dict[str, Any]:
        """The bank usage of every layer (:func:`describe`)."""
        return {"bank_usage": describe(model)}

    def convert(self, model: nn.Module, config: SLBFConfig) -> nn.Module:
        batchnorms = following_batchnorm(model)
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(SLBFConfig)}
        for name, module, overrides in select_layers(
            model, config, represents=self.represents, method=self.name
        ):
            settings = config_from_dict(SLBFConfig, {**base, **overrides, "layers": {}})
            c = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            check_slices(c, settings.slice_channels, settings.num_filters, name)
            scale = settings.scale if settings.scale is not None else name not in batchnorms
            if isinstance(module, nn.Conv2d):
                new: nn.Module = SLBFConv2d.from_conv(
                    module, settings.slice_channels, settings.num_filters, scale
                )
            else:
                new = SLBFLinear.from_linear(
                    module, settings.slice_channels, settings.num_filters, scale
                )
            new.revive_unused, new.latent_gain = settings.revive_unused, settings.latent_gain
            new.to(next(module.parameters()).device)
            if slbf_init.wants_weights(settings.init):
                slbf_init.init_from_module(new, module, batchnorms.get(name))
            new.to(dtype=module.weight.dtype)  # init in float32, then the replaced layer's dtype
            replace_module(model, name, new)
        return model

    def cost(
        self, layer: nn.Module, input_shape: tuple[int, ...], float_bits: int = 32
    ) -> LayerCost:
        """Bits from :meth:`stored_bits`; per output pixel m*c*k*k binary MACs, n*s adds."""
        if isinstance(layer, SLBFConv2d):
            oh, ow = out_hw(layer, *input_shape[-2:])
            pixels = oh * ow
        else:
            pixels = math.prod(input_shape[:-1]) if len(input_shape) > 1 else 1
        kh, kw = layer.kernel_size
        binary = layer.num_filters * layer.in_channels * kh * kw * pixels
        adds = layer.out_channels * layer.num_slices * pixels
        scale_macs = layer.out_channels * pixels if layer.scale is not None else 0
        return LayerCost(layer.stored_bits(float_bits), layer.fp32_bits(), scale_macs, binary, adds)

    def pack(self, layer: nn.Module, float_bits: int = 32) -> dict[str, tuple[str, Any]]:
        """Bank as 1-bit values (1 = +1), indices at ceil(log2 m) bits, floats as given."""
        arrays: dict[str, tuple[str, Any]] = {
            "bank": ("u1", to_numpy((layer.bank() > 0).to(torch.uint8))),
            "indices": (f"u{index_bits(layer.num_filters)}", to_numpy(layer.indices())),
        }
        enc = float_encoding(float_bits)
        for name in ("scale", "bias"):
            tensor = getattr(layer, name)
            if tensor is not None:
                arrays[name] = (enc, to_numpy(tensor))
        return arrays

    def unpack(self, layer: nn.Module, arrays: dict[str, Any]) -> None:
        """Selections, bank and scale from the stored bits (latent filters = scale * S)."""
        bank = torch.as_tensor(arrays["bank"].astype("float32") * 2.0 - 1.0)
        if arrays["indices"].size and int(arrays["indices"].max()) >= layer.num_filters:
            raise ValueError("a stored selection index is outside the bank")
        indices = torch.as_tensor(arrays["indices"].astype("int64"))
        scale = torch.as_tensor(arrays["scale"].astype("float32")) if "scale" in arrays else None
        layer.load_selection(indices, bank, scale)
        if layer.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(torch.as_tensor(arrays["bias"].astype("float32")))

    def snapshot(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The binary parts now, for :meth:`learning_stats` at the end of an epoch."""
        return snapshot(model)

    def learning_stats(self, model: nn.Module, before: Any) -> dict[str, Any]:
        """What training changed in the binary parts since ``before`` (:func:`learning_stats`)."""
        return learning_stats(model, before)

    def c_weights(self, layer: nn.Module, target: CTarget) -> dict[str, Any]:
        """Bank bits and selections for the C SLBF kernel (bank responses of a tile of output
        positions, then the gather-add of the selected ones), with its scratch."""
        g, bits = target.geometry, index_bits(layer.num_filters)
        scratch = _c_scratch(
            target, g["n"], layer.num_slices, layer.num_filters, g["kh"] * g["kw"], bits
        )
        return dict(
            kind=target.weight_kinds["slbf"],
            code=target.array("bank"),
            sel=target.array("indices"),
            code_bits=bits,
            d=layer.slice_channels,
            m=layer.num_filters,
            scale=target.array("scale"),
            scale_n=g["n"] if layer.has_scale else 0,
            scratch=scratch,
        )

    def onnx_form(self, layer: nn.Module) -> str | None:
        """A conv as split-transform-merge over its bit-packed bank; a linear layer dense."""
        return "packed_stm" if isinstance(layer, SLBFConv2d) else None

    def use_plain_path(self, layer: nn.Module) -> None:
        """A conv's ``path`` set to ``"dense"`` (:func:`set_path`)."""
        if isinstance(layer, SLBFConv2d):
            layer.path = "dense"


def _c_scratch(target: CTarget, n: int, s: int, m: int, kk: int, bits: int) -> int:
    """Scratch (32-bit words) of the C SLBF kernel for n outputs of s slices over m bank
    filters with kk = kh * kw: a tile's patches of one channel, responses and sums, and, when
    the selections are Huffman-coded, the decoder's tables and the n * s selections decoded
    into their fixed-width form (``bits`` each)."""
    decoded = target.huff_ints(1 << bits) + -(-n * s * bits // 32) if target.huff & 1 else 0
    return target.defines["CNNP_TILE"] * (kk + m + 1 + n) + decoded


def describe(model: nn.Module) -> list[dict[str, Any]]:
    """Per SLBF layer: name, d, m, bank usage (selected filters out of m)."""
    return [
        {
            "layer": name,
            "slice_channels": mod.slice_channels,
            "num_filters": mod.num_filters,
            "bank_used": mod.bank_usage(),
        }
        for name, mod in model.named_modules()
        if isinstance(mod, SLBFLayer)
    ]


def snapshot(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Per SLBF layer name: copies of its bank, selections and latent filters."""
    return {name: m.snapshot() for name, m in model.named_modules() if isinstance(m, SLBFLayer)}


def learning_stats(model: nn.Module, before: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """How far training moved the binary parts since ``before`` (a :func:`snapshot`).

    Returns:
        ``{"total": {...}, "layers": {name: {...}}}`` with ``bits_flipped`` (of ``bank_bits``),
        ``selections_changed`` (of ``selections``), ``filters_used`` (of ``num_filters``) and
        ``latent_change``: ``|w - w_before| / |w_before|`` of the latent filters (the estimator
        has no clip, so no latent value saturates; this says whether they move at all).
    """
    layers: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, SLBFLayer) or name not in before:
            continue
        old = before[name]
        latent = mod.latent.detach()
        layers[name] = {
            "bits_flipped": int((mod.binary_bank != old["bank"]).sum()),
            "bank_bits": mod.binary_bank.numel(),
            "selections_changed": int((mod.selection != old["selection"]).sum()),
            "selections": mod.selection.numel(),
            "filters_used": mod.bank_usage(),
            "num_filters": mod.num_filters,
            "latent_change": float((latent - old["latent"]).norm() / old["latent"].norm()),
        }
    keys = (
        "bits_flipped",
        "bank_bits",
        "selections_changed",
        "selections",
        "filters_used",
        "num_filters",
    )
    total: dict[str, Any] = {k: sum(v[k] for v in layers.values()) for k in keys}
    return {"total": total, "layers": layers}


def set_path(model: nn.Module, path: str) -> int:
    """Set ``path`` on every ``SLBFConv2d`` of ``model``; returns how many layers were set.

    Args:
        model: Any model.
        path: ``"auto"``, ``"kernel"`` (``cnnpress.kernel``), ``"dense"`` or ``"stm"``.

    Raises:
        ConfigError: ``path`` is not one of those.
    """
    if path not in PATHS:
        raise ConfigError(f"path must be one of {', '.join(PATHS)}; got {path!r}")
    layers = [m for m in model.modules() if isinstance(m, SLBFConv2d)]
    for layer in layers:
        layer.path = path
    return len(layers)
