"""Integer arithmetic of quantized activations, as TFLite and CMSIS-NN define it.

A real multiplier ``M`` is stored as an int32 ``m`` and a power-of-two ``shift`` with
``M ~= m * 2**(shift - 31)`` (:func:`quantize_multiplier`); an int32 value is scaled by it with
a saturating rounding doubling high multiply and a rounding right shift
(:func:`multiply`, gemmlowp's ``SaturatingRoundingDoublingHighMul`` and
``RoundingDivideByPOT``). The C kernels (``csrc_c/cnnpress_q.h``) compute the same thing with
the same rounding, so PyTorch's integer forward and the C program agree bit for bit.

Activations are stored as ``q`` with ``real = scale * (q - zero_point)``, ``q`` in
``[-2**(bits-1), 2**(bits-1) - 1]`` (TFLite's int8 activations; 4-bit ones use the same
arithmetic over a narrower range).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ADD_SHIFT",
    "add_multipliers",
    "choose_qparams",
    "dequantize",
    "multiply",
    "qrange",
    "quantize_input",
    "quantize_multiplier",
    "round_away",
]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
#: Left shift of both terms of an integer addition before they are rescaled (TFLite: 20).
ADD_SHIFT = 20


def qrange(bits: int) -> tuple[int, int]:
    """The signed range of ``bits``-bit activations: (-128, 127) at 8 bits."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def choose_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale and zero point that map ``[lo, hi]`` (widened to hold 0) onto the ``bits``-bit
    range, zero exactly representable (TFLite's asymmetric activations)."""
    qmin, qmax = qrange(bits)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not math.isfinite(lo) or not math.isfinite(hi):
        raise ValueError(f"a non-finite activation range [{lo}, {hi}]")
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0.0:
        return 1.0, 0
    zero = int(round(qmin - lo / scale))
    return float(scale), max(qmin, min(qmax, zero))


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``(m, shift)`` with ``real ~= m * 2**(shift - 31)``, ``|m|`` in ``[2**30, 2**31)``;
    a negative ``real`` gets a negative ``m``; ``(0, 0)`` below ``2**-31``."""
    if real == 0.0 or abs(real) < 2.0**-31:
        return 0, 0
    q, exponent = math.frexp(abs(real))
    m = int(round(q * 2**31))
    if m == 2**31:
        m, exponent = m // 2, exponent + 1
    if exponent > 30:
        raise ValueError(f"a requantization multiplier of {real:.3g} is too large")
    return (m if real > 0 else -m), exponent


def round_away(x: torch.Tensor) -> torch.Tensor:
    """Round half away from zero (C's ``floorf(fabsf(v) + 0.5f)`` with the sign back), in
    ``x``'s own float precision."""
    a = torch.floor(x.abs() + 0.5)
    return torch.where(x < 0, -a, a)


def multiply(x: torch.Tensor, m: torch.Tensor | int, shift: torch.Tensor | int) -> torch.Tensor:
    """``x * M`` for ``M = m * 2**(shift - 31)``, rounded as TFLite rounds (int64 in and out;
    ``x`` within int32, ``m`` and ``shift`` broadcast against it)."""
    m = torch.as_tensor(m, dtype=torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64)
    x = x.to(torch.int64)
    if bool((shift > 0).any()):
        x = (x << shift.clamp(min=0)).clamp(INT32_MIN, INT32_MAX)
    right = (-shift).clamp(min=0)
    # the doubling high multiply: (x * m + nudge) / 2**31, truncated toward zero, where the
    # nudge is 2**30 for a non-negative product and 1 - 2**30 for a negative one
    v = x * m
    negative = v < 0
    v += 2**30
    v -= negative * (2**31 - 1)
    v += (v < 0) * (2**31 - 1)  # an arithmetic shift floors; this makes it truncate
    high = v >> 31
    # the rounding divide by 2**right: half away from zero
    mask = torch.bitwise_left_shift(torch.ones_like(right), right) - 1
    threshold = (mask >> 1) + (high < 0)
    return (high >> right) + ((high & mask) > threshold)


def add_multipliers(s_a: float, s_b: float, s_out: float) -> tuple[int, int, int, int, int, int]:
    """TFLite ADD's three multipliers: ``a`` and ``b`` (shifted left by :data:`ADD_SHIFT`)
    onto a common scale, then the sum onto ``s_out``: ``(ma, sa, mb, sb, mo, so)``."""
    twice = 2.0 * max(s_a, s_b)
    ma, sa = quantize_multiplier(s_a / twice)
    mb, sb = quantize_multiplier(s_b / twice)
    mo, so = quantize_multiplier(twice / ((1 << ADD_SHIFT) * s_out))
    return ma, sa, mb, sb, mo, so


def quantize_input(x: torch.Tensor, inv_scale: float, zero: int, bits: int) -> torch.Tensor:
    """float32 inputs to ``bits``-bit integers (int64) as the C program quantizes them:
    ``round_away(x * inv_scale) + zero``, clamped, every step in float32."""
    qmin, qmax = qrange(bits)
    v = x.to(torch.float32) * torch.tensor(inv_scale, dtype=torch.float32)
    v = round_away(v.clamp(-1e6, 1e6))
    return (v.to(torch.int64) + zero).clamp(qmin, qmax)


def dequantize(q: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """Integers back to float32 as the C program writes its logits: ``(q - zero) * scale``."""
    return (q - zero).to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
