"""Product quantization of filters.

Jegou, Douze & Schmid, "Product Quantization for Nearest Neighbor Search", TPAMI 2011; applied
to CNN weights by Gong et al., "Compressing Deep Convolutional Networks using Vector
Quantization", 2014, and Wu et al., "Quantized Convolutional Neural Networks for Mobile
Devices" (Q-CNN), CVPR 2016.

A layer with ``n`` filters of ``c x kh x kw`` values is read as the matrix ``W`` (n x c*kh*kw),
each row a filter flattened in (channel, row, column) order. With sub-vector length ``s``
(must divide c*kh*kw; default kh*kw, one channel's kernel) row ``i`` splits into ``M = c*kh*kw
/ s`` consecutive sub-vectors ``W[i, j*s:(j+1)*s]``; sub-space ``j`` is column block ``j``. A
codebook ``C_g`` of ``K = 2**bits`` centroids in R^s quantises them::

    W[i, j*s:(j+1)*s] = C_g(j)[q(i, j)],  q(i, j) in [0, K)

with ``g(j) = j`` (one codebook per sub-space: product quantization proper) or ``g(j) = 0``
(``shared_codebook``: one codebook for all sub-spaces of the layer, vector quantization of
kernel slices; the default, since a small conv layer has too few filters to fill one codebook
per sub-space). Codebooks are learned at convert time from the layer's current weights by
k-means (k-means++ seeding with a fixed seed, then Lloyd iterations; all point-to-centroid
distances of a step come from one batched matmul). Training fine-tunes the codebooks with
the codes fixed: the weight is the gather ``C[q]``, and each codeword's gradient is the mean
of its members' gradients (``cnnpress.quantizers.mean_gather``: the sum would make the step
grow with the number of members).

Stored bits: ``G*K*s*float_bits`` (codebooks, ``G`` = 1 or ``M``) + ``n*M*bits`` (codes) +
``float_bits`` per bias. Where that would be no less than the float32 weights (``K`` as large
as the number of sub-vectors a codebook codes, in a small layer) ``bits`` is lowered for that
layer, as low-rank lowers its ranks (:func:`capped_bits`, recorded in ``layers``).
Operations counted: the dense conv with the reconstructed filters (``n*c*kh*kw`` MACs per
output pixel); PQ's lookup-table inference is not counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnpress.errors import ConfigError
from cnnpress.floats import float_encoding, stored_float_bits
from cnnpress.geometry import numeric_padding, out_hw
from cnnpress.methods.base import (
    METHODS,
    PLAIN_CONV,
    LayerCost,
    Method,
    MethodConfig,
    config_from_dict,
    replace_module,
    select_layers,
    to_numpy,
)
from cnnpress.quantizers import mean_gather

__all__ = ["PQ", "PQConfig", "PQConv2d", "PQLinear", "capped_bits", "kmeans"]

MAX_BITS = 16
_PLUSPLUS_LIMIT = 1024  # above this many centroids, seed from a random sample (k-means++ is serial)
_CHUNK = 1 << 22  # distance-matrix entries per assignment chunk


def _assign(data: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for every point: (G, N, s), (G, K, s) -> (G, N)."""
    step = max(1, _CHUNK // max(1, centroids.shape[0] * centroids.shape[1]))
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term does not change the argmin
    norms = centroids.pow(2).sum(-1)[:, None, :]
    ct = centroids.transpose(1, 2)
    parts = [
        torch.baddbmm(norms, data[:, i : i + step], ct, alpha=-2).argmin(dim=-1)
        for i in range(0, data.shape[1], step)
    ]
    return torch.cat(parts, dim=1)


def kmeans(
    data: torch.Tensor, k: int, iterations: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means: ``G`` independent problems of ``N`` points in R^s, ``k`` centroids each.

    Seeding: k-means++ (``k <= 1024``) or a random sample of the points, from a generator with
    ``seed``; when ``k >= N`` every point is a centroid (the rest are repeats), so the fit is
    exact. Then ``iterations`` Lloyd steps; an empty cluster keeps its centroid.

    Args:
        data: Points, shape (G, N, s).
        k: Centroids per problem.
        iterations: Lloyd iterations.
        seed: Seed of the seeding's random choices.

    Returns:
        Centroids (G, k, s) and the index of each point's nearest centroid (G, N), int64.
    """
    data = data.detach().float().cpu()
    G, N, s = data.shape
    gen = torch.Generator().manual_seed(seed)
    rows = torch.arange(G)
    if k >= N:
        extra = torch.randint(N, (G, k - N), generator=gen)
        idx = torch.cat([torch.arange(N).expand(G, N), extra], dim=1)
        centroids = data[rows[:, None], idx]
        return centroids, _assign(data, centroids)
    if k > _PLUSPLUS_LIMIT:
        idx = torch.stack([torch.randperm(N, generator=gen)[:k] for _ in range(G)])
        centroids = data[rows[:, None], idx]
    else:
        centroids = torch.empty(G, k, s)
        first = torch.randint(N, (G,), generator=gen)
        centroids[:, 0] = data[rows, first]
        d2 = (data - centroids[:, :1]).pow(2).sum(-1)
        for j in range(1, k):
            weights = d2.clamp_min(0)
            weights[weights.sum(1) <= 0] = 1.0  # all points already centroids: pick any
            pick = torch.multinomial(weights, 1, generator=gen).squeeze(1)
            centroids[:, j] = data[rows, pick]
            d2 = torch.minimum(d2, (data - centroids[:, j : j + 1]).pow(2).sum(-1))
    for _ in range(iterations):
        codes = _assign(data, centroids)
        sums = torch.zeros(G, k, s).scatter_add_(1, codes[..., None].expand(G, N, s), data)
        counts = torch.zeros(G, k).scatter_add_(1, codes, torch.ones(G, N))
        mean = sums / counts.clamp_min(1)[..., None]
        centroids = torch.where(counts[..., None] > 0, mean, centroids)
    return centroids, _assign(data, centroids)


def _check(
    fan_in: int, subvector: int, bits: int, where: str = "", kernel: int | None = None
) -> None:
    at = f"layer {where}: " if where else ""
    if not isinstance(subvector, int) or isinstance(subvector, bool) or subvector < 1:
        raise ConfigError(f"{at}subvector must be a positive integer, got {subvector!r}")
    if fan_in % subvector:
        divisors = [v for v in range(1, fan_in + 1) if fan_in % v == 0]
        hint = f" (one channel's kernel is {kernel})" if kernel else ""
        raise ConfigError(
            f"{at}subvector {subvector} does not divide the {fan_in} values of a filter"
            f"{hint}; choose one of {divisors} (per layer: layers: {{NAME: {{subvector: S}}}})"
        )
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"{at}bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")


def capped_bits(
    out_channels: int, fan_in: int, subvector: int, bits: int, shared_codebook: bool
) -> int:
    """``bits`` lowered until codebooks and codes take fewer bits than the float32 weights.

    A codebook with as many centroids as the sub-vectors it codes (``2**bits >= n*M``
    shared, ``>= n`` per sub-space) holds every sub-vector once more and stores more than the
    layer it replaces; so, as low-rank caps its ranks, ``bits`` goes down (to 1 at least)
    while ``G * 2**bits * s * 32 + n * M * bits >= n * fan_in * 32`` (``M = fan_in / s``).
    """
    subspaces = fan_in // subvector
    books = 1 if shared_codebook else subspaces
    dense = 32 * out_channels * fan_in
    while bits > 1 and books * 2**bits * subvector * 32 + out_channels * subspaces * bits >= dense:
        bits -= 1
    return bits


class _PQBase(nn.Module):
    """Codebooks (parameters), codes (buffer) and bias shared by the conv and linear layers."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        subvector: int,
        bits: int,
        shared_codebook: bool,
        bias: bool,
    ) -> None:
        super().__init__()
        kh, kw = kernel_size
        fan_in = in_channels * kh * kw
        _check(fan_in, subvector, bits)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.subvector, self.bits, self.shared_codebook = subvector, bits, shared_codebook
        self.num_subspaces = fan_in // subvector
        groups = 1 if shared_codebook else self.num_subspaces
        self.codebooks = nn.Parameter(torch.zeros(groups, 2**bits, subvector))
        self.register_buffer(
            "codes", torch.zeros(out_channels, self.num_subspaces, dtype=torch.long)
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def dense_weight(self) -> torch.Tensor:
        """The reconstructed filters ``C_g(j)[q(i, j)]``, shape (n, c, kh, kw); differentiable."""
        k = self.codebooks.shape[1]
        rows = self.codes  # a row of the codebooks seen as one (groups * k, subvector) table
        if not self.shared_codebook:
            rows = rows + k * torch.arange(self.num_subspaces, device=rows.device)
        w = mean_gather(self.codebooks.reshape(-1, self.subvector), rows)
        return w.reshape(self.out_channels, self.in_channels, *self.kernel_size)

    def quantize_from(self, weight: torch.Tensor, iterations: int = 10, seed: int = 0) -> None:
        """Learn the codebooks and codes from dense weights (n, c, kh, kw) by k-means."""
        n, m, s = self.out_channels, self.num_subspaces, self.subvector
        sub = weight.detach().reshape(n, m, s)
        data = sub.reshape(1, n * m, s) if self.shared_codebook else sub.transpose(0, 1)
        centroids, codes = kmeans(data, 2**self.bits, iterations, seed)
        codes = codes.reshape(n, m) if self.shared_codebook else codes.transpose(0, 1)
        with torch.no_grad():
            self.codebooks.copy_(centroids)
            self.codes.copy_(codes)

    def stored_bits(self, float_bits: int = 32) -> int:
        """Codebook floats + ``bits`` per code + ``float_bits`` per bias."""
        bias = self.out_channels if self.bias is not None else 0
        floats = stored_float_bits(tuple(self.codebooks.shape), float_bits)
        return floats + stored_float_bits((bias,), float_bits) + self.codes.numel() * self.bits

    def fp32_bits(self) -> int:
        """Bits of the dense float32 layer this one replaces (weights and bias)."""
        weights = self.out_channels * self.in_channels * math.prod(self.kernel_size)
        return 32 * (weights + (self.out_channels if self.bias is not None else 0))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"subvector={self.subvector}, bits={self.bits}, "
            f"shared_codebook={self.shared_codebook}, bias={self.bias is not None}"
        )


class PQConv2d(_PQBase):
    """A Conv2d whose filters are product-quantized (see the module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        subvector: int | None = None,
        bits: int = 8,
        shared_codebook: bool = True,
    ) -> None:
        ks = nn.modules.utils._pair(kernel_size)
        sub = subvector if subvector is not None else ks[0] * ks[1]
        super().__init__(in_channels, out_channels, ks, sub, bits, shared_codebook, bias)
        self.stride = nn.modules.utils._pair(stride)
        self.padding = nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation)


class PQLinear(_PQBase):
    """Product quantization of a Linear layer's rows (a 1x1 conv, kh = kw = 1)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        subvector: int | None = None,
        bits: int = 8,
        shared_codebook: bool = True,
    ) -> None:
        sub = subvector if subvector is not None else 1
        super().__init__(in_features, out_features, (1, 1), sub, bits, shared_codebook, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight().flatten(1), self.bias)


@dataclass(frozen=True)
class PQConfig(MethodConfig):
    """Product-quantization settings (per layer overridable through ``layers``).

    Attributes:
        subvector: Values per sub-vector ``s``; must divide c*kh*kw. ``None``: kh*kw (one
            channel's kernel, so every conv qualifies; 1 for a Linear layer).
        bits: Code width; each codebook has ``2**bits`` centroids (1 to 16). Lowered per
            layer where the codebooks would store more than the float32 weights
            (:func:`capped_bits`); ``resolve`` records the lowered value in ``layers``.
        shared_codebook: One codebook for all sub-spaces of a layer (``True``) or one per
            sub-space (product quantization proper; pays off for layers with many filters).
        iterations: Lloyd iterations of k-means at convert time.
        seed: Seed of the k-means seeding.
    """

    subvector: int | None = None
    bits: int = 8
    shared_codebook: bool = True
    iterations: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        sub = self.subvector
        if sub is not None and (not isinstance(sub, int) or isinstance(sub, bool) or sub < 1):
            raise ConfigError(f"subvector must be a positive integer or null, got {sub!r}")
        b = self.bits
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= MAX_BITS:
            raise ConfigError(f"bits must be an integer from 1 to {MAX_BITS}, got {b!r}")
        if not isinstance(self.shared_codebook, bool):
            raise ConfigError(
                f"shared_codebook must be true or false, got {self.shared_codebook!r}"
            )
        it = self.iterations
        if not isinstance(it, int) or isinstance(it, bool) or it < 0:
            raise ConfigError(f"iterations must be a non-negative integer, got {it!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


@METHODS.register("pq")
class PQ(Method):
    """Product quantization (Jegou et al. 2011; Gong et al. 2014; Wu et al., CVPR 2016)."""

    name = "pq"
    Config = PQConfig
    layer_types = (PQConv2d, PQLinear)
    represents = PLAIN_CONV  # groups 1, zero padding

    def _layers(
        self, model: nn.Module, config: PQConfig
    ) -> list[tuple[str, nn.Module, PQConfig, int, int]]:
        """Per compressed layer: its name, module, settings, sub-vector length and code bits
        (``bits`` capped by :func:`capped_bits`)."""
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(PQConfig)}
        chosen = []
        for name, module, overrides in select_layers(
            model, config, represents=self.represents, method=self.name
        ):
            st = config_from_dict(PQConfig, {**base, **overrides, "layers": {}})
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                fan_in, kernel = module.in_channels * kh * kw, kh * kw
            else:
                fan_in, kernel = module.in_features, None
            sub = st.subvector if st.subvector is not None else kernel or 1
            _check(fan_in, sub, st.bits, name, kernel)
            n = module.weight.shape[0]
            bits = capped_bits(n, fan_in, sub, st.bits, st.shared_codebook)
            chosen.append((name, module, st, sub, bits))
        return chosen

    def resolve(self, model: nn.Module, config: PQConfig) -> PQConfig:
        """Record in ``layers`` the ``bits`` of each layer where :func:`capped_bits` lowers
        them (codebooks as large as the sub-vectors they code would store more than fp32)."""
        layers = dict(config.layers)
        for name, _, st, _, bits in self._layers(model, config):
            if bits != st.bits:
                old = layers.get(name)
                layers[name] = {**(old if isinstance(old, dict) else {}), "bits": bits}
        return dataclasses.replace(config, layers=layers)

    def convert(self, model: nn.Module, config: PQConfig) -> nn.Module:
        for name, module, st, sub, bits in self._layers(model, config):
            weight = module.weight
            if isinstance(module, nn.Conv2d):
                new: _PQBase = PQConv2d(
                    module.in_channels,
                    module.out_channels,
                    module.kernel_size,
                    module.stride,
                    numeric_padding(module),
                    module.dilation,
                    module.bias is not None,
                    sub,
                    bits,
                    st.shared_codebook,
                )
            else:
                new = PQLinear(
                    module.in_features,
                    module.out_features,
                    module.bias is not None,
                    sub,
                    bits,
                    st.shared_codebook,
                )
            new.quantize_from(weight, st.iterations, st.seed)
            if module.bias is not None:
                with torch.no_grad():
                    new.bias.copy_(module.bias)
            new.to(weight.device, weight.dtype)
            replace_module(model, name, new)
        return model

    def cost(
        self, layer: nn.Module, input_shape: tuple[int, ...], float_bits: int = 32
    ) -> LayerCost:
        """Bits from :meth:`_PQBase.stored_bits`; MACs of the dense conv (n*c*kh*kw per pixel)."""
        if isinstance(layer, PQConv2d):
            oh, ow = out_hw(layer, *input_shape[-2:])
            pixels = oh * ow
        else:
            pixels = math.prod(input_shape[:-1]) if len(input_shape) > 1 else 1
        macs = layer.out_channels * layer.in_channels * math.prod(layer.kernel_size) * pixels
        return LayerCost(layer.stored_bits(float_bits), layer.fp32_bits(), macs)

    def pack(self, layer: nn.Module, float_bits: int = 32) -> dict[str, tuple[str, Any]]:
        """Codebooks and bias as ``f4``/``f2``, codes as ``u<bits>``."""
        enc = float_encoding(float_bits)
        arrays: dict[str, tuple[str, Any]] = {
            "codebooks": (enc, to_numpy(layer.codebooks)),
            "codes": (f"u{layer.bits}", to_numpy(layer.codes)),
        }
        if layer.bias is not None:
            arrays["bias"] = (enc, to_numpy(layer.bias))
        return arrays

    def unpack(self, layer: nn.Module, arrays: dict[str, Any]) -> None:
        """Codebooks, codes and bias from the stored arrays."""
        codes = arrays["codes"]
        if codes.size and int(codes.max()) >= layer.codebooks.shape[1]:
            raise ValueError("a stored code is outside the codebook")
        with torch.no_grad():
            layer.codebooks.copy_(torch.as_tensor(arrays["codebooks"].astype("float32")))
            layer.codes.copy_(torch.as_tensor(codes.astype("int64")))
            if layer.bias is not None:
                layer.bias.copy_(torch.as_tensor(arrays["bias"].astype("float32")))
