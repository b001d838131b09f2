"""Binary-weight networks: BinaryConnect, BWN and XNOR-Net, one layer type with a ``mode``.

A compressed layer keeps latent full-precision weights ``W`` (n filters of c x kh x kw) and
computes with their signs ``sign(W)`` in {-1, +1} (sign(0) = +1), trained through the clipped
straight-through estimator (:func:`cnnpress.quantizers.sign_ste`: gradient passed where
``|W| <= 1``). The bias stays in float.

* ``binaryconnect`` (Courbariaux, Bengio & David, "BinaryConnect", NeurIPS 2015):
  ``y = conv(x, sign(W)) * s + b``; the optional learnable per-layer scale ``s`` (one float,
  starting at ``mean |W|``) is on only where no BatchNorm follows (a BatchNorm absorbs it).
* ``bwn`` (Rastegari et al., "XNOR-Net", ECCV 2016, Binary-Weight-Networks):
  ``y = conv(x, alpha * sign(W)) + b`` with ``alpha_i = mean |W_i|`` per output filter, computed
  from the latent weights in every forward (autograd differentiates it as a function of ``W``).
* ``xnor`` (same paper, XNOR-Networks): binary weights as BWN and binary inputs::

      A = mean_c |x|                      (N, 1, H, W)
      K = conv(A, ones(kh, kw) / (kh*kw))  same stride, padding and dilation as the layer
      y = conv(sign(x), sign(W)) * K * alpha + b

  ``sign(x)`` uses the same clipped STE. Padding is zeros (a third value next to +-1).
  ``input_shift`` (on by default) learns a per-channel threshold ``beta`` and uses
  ``x - beta`` in place of ``x``: the paper binarises BatchNorm outputs, but a conv that
  follows a ReLU (every conv of these ResNets and VGGs) sees ``x >= 0``, where ``sign(x)`` is
  +1 everywhere and the layer computes a function of ``K`` alone. ``beta`` starts at the
  per-channel mean of the first batch the layer sees in training mode (averaged over the
  processes of a distributed run), so the signs carry information from the first step; a
  buffer ``shift_ready`` records that this happened, and checkpoints keep it. Measured on
  ResNet-20 / Fashion-MNIST from fp32 weights, 2 epochs: see
  ``benchmarks/results/compare-fmnist``.

A Linear layer is a 1x1 conv over its features (``K = mean |x|`` per sample).

BinaryConnect's Algorithm 1 clips the latent weights to [-1, 1] after each update (outside,
the STE passes no gradient and a weight would be stuck). With ``clip_weights`` (default) the
layers clip them in place before each forward in training mode, which comes to the same.

Stored (``pack``): the signs at 1 bit (1 = +1), then ``alpha`` (n floats, BWN/XNOR), the scale
(1 float, BinaryConnect where on), ``beta`` (c floats, XNOR with ``input_shift``) and the bias,
floats at ``float_bits``. ``unpack`` sets ``W = alpha_i * sign`` (BinaryConnect: ``W = sign``),
so ``mean |W_i|`` gives back ``alpha_i`` and the reloaded layer computes what the saved one did.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cnnpress.errors import ConfigError
from cnnpress.floats import float_encoding, stored_float_bits
from cnnpress.geometry import numeric_padding, out_hw
from cnnpress.methods.base import (
    METHODS,
    MODEL_SETTINGS,
    PLAIN_CONV,
    CTarget,
    LayerCost,
    Method,
    MethodConfig,
    config_from_dict,
    following_batchnorm,
    replace_module,
    select_layers,
    to_numpy,
)
from cnnpress.methods.cache import DerivedWeightLayer
from cnnpress.quantizers import binary_sign, sign_ste

__all__ = [
    "BWN",
    "MODES",
    "BWNConfig",
    "BinaryConfig",
    "BinaryConnect",
    "BinaryConnectConfig",
    "BinaryConv2d",
    "BinaryLinear",
    "XNOR",
    "XNORConfig",
]

MODES = ("binaryconnect", "bwn", "xnor")


def _sign(t: torch.Tensor) -> torch.Tensor:
    """{-1, +1} with the clipped STE where a gradient is wanted, plain (traceable) otherwise."""
    return sign_ste(t) if torch.is_grad_enabled() and t.requires_grad else binary_sign(t)


class _BinaryBase(DerivedWeightLayer):
    """Latent weights, scales and bias shared by the conv and linear binary layers."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        mode: str,
        bias: bool,
        scale: bool,
        binarize_input: bool,
        input_shift: bool,
        clip_weights: bool,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"binary mode must be one of {list(MODES)}, got {mode!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.mode, self.clip_weights = kernel_size, mode, clip_weights
        self.binarize_input = mode == "xnor" and binarize_input
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default
        fan_in = in_channels * kernel_size[0] * kernel_size[1]
        has_scale = mode == "binaryconnect" and scale
        self.scale = nn.Parameter(torch.full((1,), fan_in**-0.5)) if has_scale else None
        has_shift = mode == "xnor" and input_shift
        self.shift = nn.Parameter(torch.zeros(in_channels)) if has_shift else None
        if has_shift:
            self.register_buffer("shift_ready", torch.zeros((), dtype=torch.bool))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @property
    def has_alpha(self) -> bool:
        """Whether the layer scales filter i by ``alpha_i = mean |W_i|`` (BWN and XNOR)."""
        return self.mode != "binaryconnect"

    def signs(self) -> torch.Tensor:
        """sign(W) in {-1, +1}, the weight's shape (no gradient)."""
        return binary_sign(self.weight.detach())

    def alpha(self) -> torch.Tensor:
        """``alpha_i = mean |W_i|`` per output filter, shape (n,), differentiable in ``W``."""
        return self.weight.abs().flatten(1).mean(dim=1)

    def _shifted(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """``x - beta``; in training, ``beta`` first becomes the batch's per-channel mean."""
        if self.shift is None:
            return x
        channel_dim %= x.dim()
        if self.training and not bool(self.shift_ready):
            with torch.no_grad():
                dims = [d for d in range(x.dim()) if d != channel_dim]
                mean = x.detach().float().mean(dim=dims)
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(mean)
                    mean /= dist.get_world_size()
                self.shift.copy_(mean)
                self.shift_ready.fill_(True)
        view = [1] * x.dim()
        view[channel_dim] = -1
        return x - self.shift.view(view)

    def _clip(self) -> None:
        if self.clip_weights and self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.clamp_(-1.0, 1.0)

    def binary_weight(self) -> torch.Tensor:
        """The weight the layer computes with (for XNOR: with float inputs): differentiable.

        BinaryConnect: ``sign(W) * s``; BWN/XNOR: ``alpha_i * sign(W_i)``.
        """
        w = _sign(self.weight)
        if self.has_alpha:
            w = w * self.alpha().view(-1, *([1] * (w.dim() - 1)))
        if self.scale is not None:
            w = w * self.scale
        return w

    @property
    def dense_weight(self) -> Any:
        """``binary_weight`` where one dense layer computes what this one does, else ``None``.

        With binary inputs (XNOR) no plain conv does, so ``cnnpress.runtime.dense.to_dense``
        (which looks for a callable ``dense_weight``) leaves such a layer as it is.
        """
        return None if self.binarize_input else self.binary_weight

    def copy_weights(self, source: nn.Conv2d | nn.Linear) -> None:
        """Latent weights (and bias) from a float layer of the same shape.

        BinaryConnect's scale, where on, starts at ``mean |W|`` of the whole layer (the
        least-squares scale of ``sign(W)``), so trained weights keep their output size.
        """
        with torch.no_grad():
            self.weight.copy_(source.weight.view_as(self.weight))
            if self.bias is not None:
                self.bias.copy_(source.bias)
            if self.scale is not None:
                self.scale.fill_(float(self.weight.abs().mean()))

    def float_count(self) -> int:
        """How many floats the layer stores besides the signs (alpha, scale, beta, bias)."""
        count = self.out_channels if self.has_alpha else 0
        for tensor in (self.scale, self.shift, self.bias):
            count += 0 if tensor is None else tensor.numel()
        return count

    def stored_bits(self, float_bits: int = 32) -> int:
        """n*c*kh*kw sign bits + ``float_bits`` per alpha, scale, beta and bias value."""
        sizes = [self.out_channels] if self.has_alpha else []
        sizes += [t.numel() for t in (self.scale, self.shift, self.bias) if t is not None]
        return self.weight.numel() + sum(stored_float_bits((k,), float_bits) for k in sizes)

    def fp32_bits(self) -> int:
        """Bits of the dense float32 layer this one replaces (weights and bias)."""
        return 32 * (self.weight.numel() + (0 if self.bias is None else self.out_channels))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"mode={self.mode}, binarize_input={self.binarize_input}, "
            f"scale={self.scale is not None}, input_shift={self.shift is not None}, "
            f"bias={self.bias is not None}"
        )


class BinaryConv2d(_BinaryBase):
    """A Conv2d with binary weights (and, in ``xnor`` mode, binary inputs); see the module doc.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias: As in
            ``nn.Conv2d`` (groups 1, numeric zero padding: a plain conv).
        mode: ``"binaryconnect"``, ``"bwn"`` or ``"xnor"``.
        scale: BinaryConnect only: learn a per-layer scale (leave off when BatchNorm follows).
        binarize_input: XNOR only: binarise the input and scale by ``K`` (off: same as BWN).
        input_shift: XNOR only: learn a per-channel threshold ``beta``, used as ``x - beta``.
        clip_weights: Clip the latent weights to [-1, 1] before each training forward.
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
        mode: str = "bwn",
        scale: bool = False,
        binarize_input: bool = True,
        input_shift: bool = True,
        clip_weights: bool = True,
    ) -> None:
        ks = nn.modules.utils._pair(kernel_size)
        super().__init__(
            in_channels, out_channels, ks, mode, bias, scale, binarize_input, input_shift,
            clip_weights,
        )  # fmt: skip
        self.stride = nn.modules.utils._pair(stride)
        self.padding = nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mode: str, **settings: Any) -> BinaryConv2d:
        """A binary layer of the same shape as ``conv``, its latent weights copied from it.

        Raises:
            ConfigError: ``conv`` is not a plain conv (:data:`cnnpress.methods.base.PLAIN_CONV`).
        """
        PLAIN_CONV.check(conv, method=mode)
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            numeric_padding(conv),
            conv.dilation,
            conv.bias is not None,
            mode,
            **settings,
        )
        new.copy_weights(conv)
        return new

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._clip()
        if self.binarize_input:
            x = self._shifted(x, 1)
            box = x.new_full((1, 1, *self.kernel_size), 1.0 / math.prod(self.kernel_size))
            k = self._conv(x.abs().mean(dim=1, keepdim=True), box)  # N, 1, H_out, W_out
            y = self._conv(_sign(x), _sign(self.weight)) * k * self.alpha().view(1, -1, 1, 1)
        else:
            y = self._conv(x, self.derived_weight(self.binary_weight))
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stride={self.stride}, padding={self.padding}"


class BinaryLinear(_BinaryBase):
    """Binary weights for a Linear layer: a 1x1 conv over ``in_features`` channels.

    Weight shape (out, in, 1, 1); in ``xnor`` mode ``K = mean |x|`` over the features. The
    settings are those of :class:`BinaryConv2d`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "bwn",
        scale: bool = False,
        binarize_input: bool = True,
        input_shift: bool = True,
        clip_weights: bool = True,
    ) -> None:
        super().__init__(
            in_features, out_features, (1, 1), mode, bias, scale, binarize_input, input_shift,
            clip_weights,
        )  # fmt: skip

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, **settings: Any) -> BinaryLinear:
        """A binary layer of the same shape as ``linear``, its latent weights copied from it."""
        new = cls(
            linear.in_features, linear.out_features, linear.bias is not None, mode, **settings
        )
        new.copy_weights(linear)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._clip()
        if self.binarize_input:
            x = self._shifted(x, -1)
            k = x.abs().mean(dim=-1, keepdim=True)
            y = F.linear(_sign(x), _sign(self.weight).flatten(1)) * k * self.alpha()
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.derived_weight(self.binary_weight).flatten(1), self.bias)


def _check_bool(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool) and not (name == "scale" and value is None):
            allowed = "true, false or null" if name == "scale" else "true or false"
            raise ConfigError(f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class BinaryConfig(MethodConfig):
    """Settings shared by the binary-weight methods (per layer overridable through ``layers``).

    Attributes:
        clip_weights: Clip latent weights to [-1, 1] before each training forward
            (BinaryConnect's Algorithm 1; with the clipped STE a weight outside is stuck).
    """

    clip_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bool(
            self,
            *(f.name for f in dataclasses.fields(self) if f.name not in ("layers", "float_bits")),
        )


@dataclass(frozen=True)
class BinaryConnectConfig(BinaryConfig):
    """BinaryConnect settings.

    Attributes:
        scale: A learnable per-layer scale: ``None`` means on exactly where no BatchNorm follows.
    """

    scale: bool | None = None


@dataclass(frozen=True)
class BWNConfig(BinaryConfig):
    """BWN settings (the common ones only: ``alpha`` is part of the method)."""


@dataclass(frozen=True)
class XNORConfig(BinaryConfig):
    """XNOR-Net settings.

    Attributes:
        binarize_input: Binarise the inputs and scale by ``K`` (off: the layer is BWN's).
        input_shift: Learn a per-channel threshold ``beta`` (starting at the input's mean)
            and binarise ``x - beta``; off, a conv after a ReLU sees ``sign(x) = +1`` only.
    """

    binarize_input: bool = True
    input_shift: bool = True


class _BinaryMethod(Method):
    """Conversion, cost and packing shared by the three modes (the layer's ``mode`` decides)."""

    layer_types = (BinaryConv2d, BinaryLinear)
    represents = PLAIN_CONV  # groups 1, zero padding
    c_kinds = ("binary",)

    def convert(self, model: nn.Module, config: BinaryConfig) -> nn.Module:
        with_bn = following_batchnorm(model)
        cls = type(config)
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
        for name, module, overrides in select_layers(
            model, config, represents=self.represents, method=self.name
        ):
            settings = config_from_dict(cls, {**base, **overrides, "layers": {}}).to_dict()
            for key in MODEL_SETTINGS:
                settings.pop(key)
            if "scale" in settings and settings["scale"] is None:
                settings["scale"] = name not in with_bn
            if isinstance(module, nn.Conv2d):
                new: nn.Module = BinaryConv2d.from_conv(module, self.name, **settings)
            else:
                new = BinaryLinear.from_linear(module, self.name, **settings)
            new.to(module.weight.device, module.weight.dtype)
            replace_module(model, name, new)
        return model

    def cost(
        self, layer: nn.Module, input_shape: tuple[int, ...], float_bits: int = 32
    ) -> LayerCost:
        """Stored bits from :meth:`_BinaryBase.stored_bits`; operations for one input.

        With ``P`` output positions (``H_out*W_out``; 1 for a Linear layer) and ``HW`` input
        positions: ``binary_macs = n*c*kh*kw*P`` in every mode: +-1-weight MACs (additions)
        for BinaryConnect and BWN, XNOR-popcount operations for XNOR. ``macs`` (float
        multiplies): BWN ``n*P`` (``alpha``), BinaryConnect ``n*P`` with a scale else 0; XNOR
        ``c*HW`` (``A``, counted as one MAC per input value) + ``kh*kw*P`` (the box filter
        giving ``K``) + ``n*P`` (the product by ``K``; ``alpha_i`` is a per-channel constant
        counted once with it, as it folds into a following BatchNorm). ``adds``: ``c*HW`` for
        XNOR's ``x - beta``. Not counted: bias adds and the ``c*HW`` input signs.
        """
        kh, kw = layer.kernel_size
        if isinstance(layer, BinaryLinear) or len(input_shape) < 3:
            positions = math.prod(input_shape[:-1]) if len(input_shape) > 1 else 1
            pixels = in_pixels = positions
        else:
            h, w = input_shape[-2:]
            oh, ow = out_hw(layer, h, w)
            pixels, in_pixels = oh * ow, h * w
        n, c = layer.out_channels, layer.in_channels
        binary = n * c * kh * kw * pixels
        scaled = layer.has_alpha or layer.scale is not None
        macs, adds = (n * pixels if scaled else 0), 0
        if layer.binarize_input:
            macs += c * in_pixels + kh * kw * pixels
            adds = c * in_pixels if layer.shift is not None else 0
        return LayerCost(layer.stored_bits(float_bits), layer.fp32_bits(), macs, binary, adds)

    def pack(self, layer: nn.Module, float_bits: int = 32) -> dict[str, tuple[str, Any]]:
        """Signs at 1 bit (1 = +1, the weight's shape); alpha, scale, shift, bias as floats."""
        enc = float_encoding(float_bits)
        arrays: dict[str, tuple[str, Any]] = {
            "sign": ("u1", to_numpy((layer.signs() > 0).to(torch.uint8)))
        }
        with torch.no_grad():
            if layer.has_alpha:
                arrays["alpha"] = (enc, to_numpy(layer.alpha()))
            for name in ("scale", "shift", "bias"):
                tensor = getattr(layer, name)
                if tensor is not None:
                    arrays[name] = (enc, to_numpy(tensor))
        return arrays

    def unpack(self, layer: nn.Module, arrays: dict[str, Any]) -> None:
        """Latent weights ``alpha_i * sign`` (BinaryConnect: ``sign``), then the floats."""
        sign = torch.as_tensor(arrays["sign"].astype(np.float32) * 2.0 - 1.0)
        weight = sign.view_as(layer.weight)
        if layer.has_alpha:
            alpha = torch.as_tensor(arrays["alpha"].astype(np.float32))
            if not bool(torch.isfinite(alpha).all()) or bool((alpha < 0).any()):
                raise ValueError("a stored filter scale alpha is negative or not finite")
            weight = weight * alpha.view(-1, 1, 1, 1)
        with torch.no_grad():
            layer.weight.copy_(weight)
            for name in ("scale", "shift", "bias"):
                if getattr(layer, name) is not None:
                    getattr(layer, name).copy_(torch.as_tensor(arrays[name].astype(np.float32)))
            if layer.shift is not None:
                layer.shift_ready.fill_(True)

    def c_weights(self, layer: nn.Module, target: CTarget) -> dict[str, Any] | str:
        """Signs and the scale (``alpha`` per filter, or BinaryConnect's one scale) for the C
        conv kernel; XNOR's binarised inputs have none."""
        if layer.binarize_input:
            return "XNOR's binary inputs have no C kernel"
        scale = target.array("alpha") or target.array("scale")
        count = 0 if scale is None else target.geometry["n"] if layer.has_alpha else 1
        return dict(
            kind=target.weight_kinds["binary"],
            code=target.array("sign"),
            scale=scale,
            scale_n=count,
        )


@METHODS.register("binaryconnect")
class BinaryConnect(_BinaryMethod):
    """BinaryConnect (Courbariaux, Bengio & David, NeurIPS 2015): ``y = conv(x, sign(W)) * s``.

    ``sign`` with the clipped STE, latent weights clipped to [-1, 1]; the per-layer scale
    ``s`` only where no BatchNorm follows. See the module doc.
    """

    name = "binaryconnect"
    Config = BinaryConnectConfig


@METHODS.register("bwn")
class BWN(_BinaryMethod):
    """Binary-Weight-Networks (Rastegari et al., XNOR-Net, ECCV 2016).

    ``W_i ~ alpha_i * sign(W_i)`` with ``alpha_i = mean |W_i|`` (the least-squares optimum
    for a fixed sign pattern). See the module doc.
    """

    name = "bwn"
    Config = BWNConfig


@METHODS.register("xnor")
class XNOR(_BinaryMethod):
    """XNOR-Networks (Rastegari et al., ECCV 2016): binary weights and binary inputs.

    ``y = conv(sign(x), sign(W)) * K * alpha`` with ``K`` the k x k box filter of
    ``A = mean_c |x|``. See the module doc.
    """

    name = "xnor"
    Config = XNORConfig
    no_decay = ("shift",)  # the input thresholds: weight decay pulls them to 0
