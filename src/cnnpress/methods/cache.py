"""The weight a layer derives from its parameters (signs and scales, a codebook lookup, a
mask), kept between inference forwards.

BWN, BinaryConnect and the k-means/pruned layers compute with a dense weight rebuilt from
their latent parameters on every forward, which is what training needs and what made them
4-8x slower than the fp32 model at batch 1 (VGG-16). A :class:`DerivedWeightLayer` rebuilds
it only while it can change: in training mode or with gradients on it always does (the
rebuilt weight carries the graph); in eval mode under ``torch.no_grad()`` it keeps the last
one and rebuilds it when one of the layer's own parameters or buffers is replaced or changed
in place (their storage address and PyTorch's version counter, which every in-place
operation bumps: an optimiser step, ``load_state_dict``, ``copy_``). A write through
``.data`` does not bump the counter: ``train()`` or ``eval()`` after one drops the copy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["DerivedWeightLayer"]


class DerivedWeightLayer(nn.Module):
    """A layer that computes with a weight derived from its parameters (module docstring)."""

    _kept: tuple[tuple, torch.Tensor] | None = None

    def derived_weight(self, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()``, or the copy kept from its last call while nothing it reads changed."""
        if self.training or torch.is_grad_enabled():
            self._kept = None
            return build()
        own = itertools.chain(self.parameters(recurse=False), self.buffers(recurse=False))
        key = tuple((t.data_ptr(), t._version) for t in own)
        if self._kept is not None and self._kept[0] == key:
            return self._kept[1]
        weight = build()
        self._kept = (key, weight)
        return weight

    def train(self, mode: bool = True) -> DerivedWeightLayer:
        self._kept = None
        return super().train(mode)
