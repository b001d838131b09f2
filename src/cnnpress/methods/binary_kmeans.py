"""k-means with binary centroids over filter slices: the step SLBF's init and training share.

A dense layer's filters, each scaled to unit norm, are cut into slices of ``D = d*k*k``
values (:func:`unit_slices`). One Lloyd step (:func:`lloyd_step`) sends each slice to the
centroid in {-1,+1}^D it agrees with most and makes each used centroid the sign of its
members' vote (:func:`binary_votes`, weighted by their filter's fit ``alpha_i``: the
L2-optimal bits for fixed assignments); an unused centroid is re-seeded with the sign of the
slice the bank fits worst. ``slbf_init.cluster`` iterates it from a seeding; an SLBF layer in
training takes one step per forward from its latent filters.
"""

from __future__ import annotations

import torch

from cnnpress.quantizers import binary_sign

__all__ = ["binary_votes", "lloyd_step", "unit_slices"]

_TINY = 1e-12


def unit_slices(weight: torch.Tensor, slice_channels: int) -> torch.Tensor:
    """The unit-norm filters of ``weight`` (n, c[, kh, kw]) cut into slices: (n, s, d*kh*kw)."""
    w = weight.detach().float()
    w = w.reshape(w.shape[0], w.shape[1], -1)
    n, c, kk = w.shape
    w = w / w.flatten(1).norm(dim=1).clamp_min(_TINY).view(n, 1, 1)
    return w.reshape(n, c // slice_channels, slice_channels * kk)


def binary_votes(
    x: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, n: int, s: int, weighted: bool = True
) -> torch.Tensor:
    """Each centroid's vote (m, D): the sum of its member slices ``x`` (n*s, D), each times
    its filter's fit ``alpha_i = <x_i, B[p_i]> / (s*D)`` when ``weighted`` (zero rows for
    unused centroids)."""
    if weighted:
        alpha = (x * bank[idx]).sum(1).view(n, s).sum(1).clamp_min(0) / (s * x.shape[1])
        x = x * alpha.repeat_interleave(s).unsqueeze(1)
    return torch.zeros_like(bank).index_add_(0, idx, x)


def lloyd_step(
    x: torch.Tensor,
    bank: torch.Tensor,
    n: int,
    s: int,
    revive: bool = True,
    weighted: bool = True,
) -> torch.Tensor:
    """The bank after one k-means step over the slices ``x`` (n*s, D) of n filters.

    Assignment ``argmax_t <x, B_t>``; each used bank filter becomes the sign of its members'
    :func:`binary_votes`; with ``revive``, an unused one is re-seeded with the sign of the
    slice the new bank fits worst, so no stored filter stays dead.
    """
    idx = (x @ bank.T).argmax(1)
    used = torch.bincount(idx, minlength=bank.shape[0]) > 0
    votes = binary_votes(x, bank, idx, n, s, weighted)
    new = torch.where(used.unsqueeze(1), binary_sign(votes), bank)
    empty = (~used).nonzero().flatten()
    if revive and empty.numel():
        gap = x.abs().sum(1) - (x @ new.T).max(1).values
        worst = gap.topk(min(empty.numel(), gap.numel())).indices
        new[empty[: worst.numel()]] = binary_sign(x[worst])
    return new
