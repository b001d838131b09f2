"""Quantising functions with straight-through estimators (STE).

Forward passes quantise; backward passes hand a surrogate gradient to the full-precision
input (Bengio et al., 2013; Courbariaux et al., BinaryConnect, 2015).
"""

from __future__ import annotations

import torch

__all__ = ["binary_sign", "sign_ste", "one_hot_argmax_ste"]


def binary_sign(x: torch.Tensor) -> torch.Tensor:
    """Sign into {-1, +1}, with sign(0) = +1 (so every value is a real bit)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class _SignSTE(torch.autograd.Function):
    """Forward ``binary_sign(x)``; backward passes the gradient where ``|x| <= 1`` (hard tanh)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class _OneHotArgmaxSTE(torch.autograd.Function):
    """Forward ``one_hot(argmax(q, dim=-1))``; backward passes the gradient to ``q`` unchanged."""

    @staticmethod
    def forward(ctx, q: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        index = q.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(q).scatter_(-1, index, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """Binarise ``x`` to {-1, +1} with the clipped straight-through gradient."""
    return _SignSTE.apply(x)


def one_hot_argmax_ste(q: torch.Tensor) -> torch.Tensor:
    """One-hot of the argmax over the last dimension, with the identity gradient to ``q``.

    Ties go to the lowest index (``torch.argmax``), so the result is always exactly one-hot.
    """
    return _OneHotArgmaxSTE.apply(q)
