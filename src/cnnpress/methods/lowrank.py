"""Low-rank factorisation: truncated SVD for Linear layers, Tucker-2 for convolutions.

Linear (``W`` out x in): the truncated SVD ``W ~ U_r S_r V_r^T`` becomes two maps, ``first =
S_r^(1/2) V_r^T`` (r x in) then ``last = U_r S_r^(1/2)`` (out x r), plus the bias. By
Eckart-Young this is the best rank-r approximation: ``||W - last @ first||_F^2 = sum_{i>r}
s_i^2``.

Conv2d (``W`` n x c x kh x kw): Tucker-2 (Kim et al., "Compression of Deep Convolutional Neural
Networks for Fast and Low Power Mobile Applications", ICLR 2016)::

    W ~ G x_0 U_out x_1 U_in,   G: r_out x r_in x kh x kw,  U_out: n x r_out,  U_in: c x r_in

computed as three convs: 1x1 (c -> r_in, weight ``U_in^T``), kh x kw (r_in -> r_out, weight
``G``, with the layer's stride, padding and dilation), 1x1 (r_out -> n, weight ``U_out``) plus
the bias. Initialisation by HOSVD: ``U_out`` and ``U_in`` are the leading left singular
vectors of the mode-0 (n x c*kh*kw) and mode-1 (c x n*kh*kw) unfoldings, ``G = W x_0 U_out^T
x_1 U_in^T``. The factors are then fine-tuned by training.

Ranks (``[r]`` for Linear, ``[r_in, r_out]`` for conv) depend on the weights, so
:meth:`LowRank.resolve` chooses them and records them in the config's ``ranks``:

* ``energy`` (default 0.9): per unfolding, the smallest rank whose squared singular values sum
  to at least that fraction of all of them (conv: r_out from mode 0, r_in from mode 1);
* ``ratio`` (if set, instead of ``energy``): the ranks whose factors hold about ``1/ratio`` of
  the dense weights. Linear: the integer r nearest to ``out*in / (ratio * (out + in))``.
  Conv: ``r_in = round(rho*c)``, ``r_out = round(rho*n)`` with ``rho`` the positive root of
  ``rho*(c^2 + n^2) + rho^2*c*n*kh*kw = c*n*kh*kw / ratio``.

Either way the ranks are then lowered (the larger of r_in/c, r_out/n first) until the factors
hold fewer weights than the dense layer, or are all 1: a factorisation that stores more than
the layer it replaces is never chosen (unless even rank 1 does). Explicit ``ranks`` are used
as given.

Stored bits: ``float_bits`` per factor entry and bias. MACs: those of the factor maps (conv:
``H*W*c*r_in`` at the input resolution + ``oh*ow*(r_out*r_in*kh*kw + n*r_out)``).
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

__all__ = [
    "LowRank",
    "LowRankConfig",
    "LowRankConv2d",
    "LowRankLinear",
    "energy_rank",
    "factor_weights",
    "ratio_ranks",
]


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum_{i<r} s_i^2 >= energy * sum_i s_i^2`` (values sorted descending)."""
    sq = singular_values.detach().double().pow(2)
    total = float(sq.sum())
    if total <= 0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    return min(int((kept < energy - 1e-12).sum()) + 1, sq.numel())


def factor_weights(shape: tuple[int, ...], ranks: list[int]) -> int:
    """Factor weights (no bias): ``r*(out+in)`` or ``c*r_in + r_out*r_in*kh*kw + n*r_out``."""
    if len(shape) == 2:
        out, inp = shape
        return ranks[0] * (out + inp)
    n, c, kh, kw = shape
    r_in, r_out = ranks
    return c * r_in + r_out * r_in * kh * kw + n * r_out


def ratio_ranks(shape: tuple[int, ...], ratio: float) -> list[int]:
    """Ranks whose factors hold about ``1/ratio`` of the dense weights (module docstring)."""
    dense = math.prod(shape)
    if len(shape) == 2:
        out, inp = shape
        target = dense / ratio
        return [min(range(1, min(shape) + 1), key=lambda r: (abs(r * (out + inp) - target), r))]
    n, c, kh, kw = shape
    a, b = c * n * kh * kw, c * c + n * n
    rho = (-b + math.sqrt(b * b + 4 * a * dense / ratio)) / (2 * a)
    return [min(c, max(1, round(rho * c))), min(n, max(1, round(rho * n)))]


def _cap(shape: tuple[int, ...], ranks: list[int]) -> list[int]:
    """Lower ranks until the factors hold fewer weights than the dense layer (ranks >= 1)."""
    ranks = [max(1, r) for r in ranks]
    dims = [min(shape)] if len(shape) == 2 else [shape[1], shape[0]]  # r / its largest value
    while factor_weights(shape, ranks) >= math.prod(shape) and max(ranks) > 1:
        lowerable = [j for j in range(len(ranks)) if ranks[j] > 1]
        i = max(lowerable, key=lambda j: (ranks[j] / dims[j], ranks[j]))
        ranks[i] -= 1
    return ranks


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = U diag(S) Vh``, always computed on the tall orientation.

    LAPACK's wide path is the slower one, and much slower on busy multi-core machines.
    """
    if a.shape[0] >= a.shape[1]:
        return torch.linalg.svd(a, full_matrices=False)
    u, s, vh = torch.linalg.svd(a.T, full_matrices=False)
    return vh.T, s, u.T


def _unfold(weight: torch.Tensor, mode: int) -> torch.Tensor:
    return weight.transpose(0, mode).reshape(weight.shape[mode], -1)


class LowRankLinear(nn.Module):
    """``y = last @ (first @ x) + bias``: a Linear layer factorised at rank ``r``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ConfigError(
                f"rank {rank} must lie in 1..{min(in_features, out_features)} for a "
                f"{out_features}x{in_features} Linear"
            )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Parameter(torch.empty(rank, in_features))
        self.last = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.first, std=in_features**-0.5)
        nn.init.normal_(self.last, std=rank**-0.5)

    @property
    def ranks(self) -> list[int]:
        return [self.rank]

    def init_from(self, weight: torch.Tensor) -> None:
        """Truncated SVD of ``weight`` (out x in), singular values split evenly over the factors."""
        U, S, Vh = _svd(weight.detach().double())
        root = S[: self.rank].sqrt()
        with torch.no_grad():
            self.first.copy_(root[:, None] * Vh[: self.rank])
            self.last.copy_(U[:, : self.rank] * root[None, :])

    def fp32_bits(self) -> int:
        """Bits of the dense float32 layer this one replaces (weights and bias)."""
        return 32 * (self.out_features * (self.in_features + (self.bias is not None)))

    def dense_weight(self) -> torch.Tensor:
        """``last @ first`` (out x in)."""
        return self.last @ self.first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.first), self.last, self.bias)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, bias={bias}"


class LowRankConv2d(nn.Module):
    """Tucker-2 conv: 1x1 (c -> r_in), kh x kw (r_in -> r_out), 1x1 (r_out -> n), plus bias."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        ranks: list[int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        r_in, r_out = ranks
        if not (1 <= r_in <= in_channels and 1 <= r_out <= out_channels):
            raise ConfigError(
                f"ranks [{r_in}, {r_out}] must lie in 1..{in_channels} and 1..{out_channels}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride = nn.modules.utils._pair(stride)
        self.padding = nn.modules.utils._pair(padding)
        self.dilation = nn.modules.utils._pair(dilation)
        self.r_in, self.r_out = r_in, r_out
        kh, kw = self.kernel_size
        self.first = nn.Parameter(torch.empty(r_in, in_channels, 1, 1))
        self.core = nn.Parameter(torch.empty(r_out, r_in, kh, kw))
        self.last = nn.Parameter(torch.empty(out_channels, r_out, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        for p in (self.first, self.core, self.last):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    @property
    def ranks(self) -> list[int]:
        return [self.r_in, self.r_out]

    def init_from(self, weight: torch.Tensor) -> None:
        """HOSVD of ``weight`` (n x c x kh x kw) truncated to ``[r_in, r_out]``."""
        w = weight.detach().double()
        u_out = _svd(_unfold(w, 0))[0][:, : self.r_out]
        u_in = _svd(_unfold(w, 1))[0][:, : self.r_in]
        core = torch.einsum("nchw,nr,cs->rshw", w, u_out, u_in)
        with torch.no_grad():
            self.first.copy_(u_in.t()[:, :, None, None])
            self.core.copy_(core)
            self.last.copy_(u_out[:, :, None, None])

    def fp32_bits(self) -> int:
        """Bits of the dense float32 layer this one replaces (weights and bias)."""
        weights = self.out_channels * self.in_channels * math.prod(self.kernel_size)
        return 32 * (weights + (self.out_channels if self.bias is not None else 0))

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense filters ``G x_0 U_out x_1 U_in`` (n x c x kh x kw)."""
        return torch.einsum(
            "rshw,nr,sc->nchw", self.core, self.last[:, :, 0, 0], self.first[:, :, 0, 0]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.first)
        x = F.conv2d(x, self.core, None, self.stride, self.padding, self.dilation)
        return F.conv2d(x, self.last, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"ranks=[{self.r_in}, {self.r_out}], stride={self.stride}, padding={self.padding}, "
            f"bias={self.bias is not None}"
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """Low-rank settings; ``energy`` and ``ratio`` are per layer overridable through ``layers``.

    Attributes:
        energy: Fraction of squared singular values kept, in (0, 1].
        ratio: If set (>= 1), choose ranks that store about 1/ratio of each layer instead.
        ranks: ``{layer name: [r]}`` (Linear) or ``[r_in, r_out]`` (conv); filled in by
            ``resolve`` for every compressed layer not listed.
    """

    energy: float = 0.9
    ratio: float | None = None
    ranks: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        e = self.energy
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e <= 1:
            raise ConfigError(f"energy must be a number in (0, 1], got {e!r}")
        r = self.ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or r < 1):
            raise ConfigError(f"ratio must be a number >= 1 or null, got {r!r}")
        if not isinstance(self.ranks, dict):
            raise ConfigError("ranks must map layer names to lists of ranks")
        clean = {}
        for name, value in self.ranks.items():
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 2:
                raise ConfigError(
                    f"ranks[{name!r}] must be [r] (Linear) or [r_in, r_out] (conv), got {value!r}"
                )
            if not all(_is_int(v) and v >= 1 for v in value):
                raise ConfigError(f"ranks[{name!r}] must hold positive integers, got {value!r}")
            clean[str(name)] = [int(v) for v in value]
        object.__setattr__(self, "ranks", clean)


@METHODS.register("lowrank")
class LowRank(Method):
    """Truncated SVD (Linear) and Tucker-2 with HOSVD initialisation (Kim et al., ICLR 2016)."""

    name = "lowrank"
    Config = LowRankConfig
    layer_types = (LowRankConv2d, LowRankLinear)
    represents = PLAIN_CONV  # groups 1, zero padding

    def _layers(self, model: nn.Module, config: LowRankConfig) -> list[tuple[str, nn.Module, Any]]:
        base = {"energy": config.energy, "ratio": config.ratio}
        chosen = []
        for name, module, overrides in select_layers(
            model, config, represents=self.represents, method=self.name
        ):
            extra = sorted(set(overrides) - set(base))
            if extra:
                raise ConfigError(
                    f"layer {name}: only energy and ratio can be set per layer, not "
                    f"{', '.join(extra)} (fixed ranks go in ranks: {{NAME: [...]}})"
                )
            chosen.append((name, module, config_from_dict(LowRankConfig, {**base, **overrides})))
        unknown = sorted(set(config.ranks) - {name for name, _, _ in chosen})
        if unknown:
            raise ConfigError(
                f"ranks names layer(s) {', '.join(unknown)} that lowrank does not compress"
            )
        return chosen

    def resolve(self, model: nn.Module, config: LowRankConfig) -> LowRankConfig:
        """Choose the ranks of every compressed layer not in ``config.ranks`` (module docstring)."""
        ranks = dict(config.ranks)
        for name, module, st in self._layers(model, config):
            if name in ranks:
                continue
            w = module.weight.detach().double().cpu()
            if st.ratio is not None:
                chosen = ratio_ranks(tuple(w.shape), st.ratio)
            elif w.dim() == 2:
                chosen = [energy_rank(torch.linalg.svdvals(w), st.energy)]
            else:
                r_in = energy_rank(torch.linalg.svdvals(_unfold(w, 1)), st.energy)
                r_out = energy_rank(torch.linalg.svdvals(_unfold(w, 0)), st.energy)
                chosen = [r_in, r_out]
            ranks[name] = _cap(tuple(w.shape), chosen)
        return dataclasses.replace(config, ranks=ranks)

    def convert(self, model: nn.Module, config: LowRankConfig) -> nn.Module:
        for name, module, _ in self._layers(model, config):
            if name not in config.ranks:
                raise ConfigError(f"no ranks for layer {name}: run LowRank.resolve before convert")
            ranks = config.ranks[name]
            where = f"layer {name}: "
            try:
                if isinstance(module, nn.Conv2d):
                    if len(ranks) != 2:
                        raise ConfigError(f"a conv needs ranks [r_in, r_out], got {ranks}")
                    new: nn.Module = LowRankConv2d(
                        module.in_channels,
                        module.out_channels,
                        module.kernel_size,
                        ranks,
                        module.stride,
                        numeric_padding(module),
                        module.dilation,
                        module.bias is not None,
                    )
                else:
                    if len(ranks) != 1:
                        raise ConfigError(f"a Linear needs ranks [r], got {ranks}")
                    new = LowRankLinear(
                        module.in_features, module.out_features, ranks[0], module.bias is not None
                    )
            except ConfigError as err:
                raise ConfigError(where + str(err)) from None
            new.init_from(module.weight)
            if module.bias is not None:
                with torch.no_grad():
                    new.bias.copy_(module.bias)
            new.to(module.weight.device, module.weight.dtype)
            replace_module(model, name, new)
        return model

    def cost(
        self, layer: nn.Module, input_shape: tuple[int, ...], float_bits: int = 32
    ) -> LayerCost:
        """Bits of the factors and bias; MACs of the factor maps (module docstring)."""
        if isinstance(layer, LowRankConv2d):
            n, c, (kh, kw) = layer.out_channels, layer.in_channels, layer.kernel_size
            h, w = input_shape[-2:]
            oh, ow = out_hw(layer, h, w)
            macs = h * w * c * layer.r_in + oh * ow * (
                layer.r_out * layer.r_in * kh * kw + n * layer.r_out
            )
        else:
            rows = math.prod(input_shape[:-1]) if len(input_shape) > 1 else 1
            macs = rows * layer.rank * (layer.in_features + layer.out_features)
        tensors = [getattr(layer, n, None) for n in ("first", "core", "last", "bias")]
        stored = sum(
            stored_float_bits(tuple(t.shape), float_bits) for t in tensors if t is not None
        )
        return LayerCost(stored, layer.fp32_bits(), macs)

    def pack(self, layer: nn.Module, float_bits: int = 32) -> dict[str, tuple[str, Any]]:
        """The factors (``first``, ``core`` for conv, ``last``) and bias as ``f4``/``f2``."""
        enc = float_encoding(float_bits)
        names = ("first", "core", "last", "bias")
        return {
            n: (enc, to_numpy(getattr(layer, n)))
            for n in names
            if getattr(layer, n, None) is not None
        }

    def unpack(self, layer: nn.Module, arrays: dict[str, Any]) -> None:
        """Fill the factors and bias of a layer converted with the same ranks."""
        with torch.no_grad():
            for name, values in arrays.items():
                getattr(layer, name).copy_(torch.as_tensor(values.astype("float32")))
