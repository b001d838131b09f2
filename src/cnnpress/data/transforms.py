"""Batch-wise image transforms: normalisation and training augmentation.

All functions act on a whole ``(N, C, H, W)`` batch at once with tensor ops (no per-image
Python loops) and draw their randomness from an explicit :class:`torch.Generator`, so the
same generator state always gives the same output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["normalize", "random_crop", "random_hflip"]


def _check_batch(x: torch.Tensor, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} expects an (N, C, H, W) batch, got shape {tuple(x.shape)}")


def normalize(
    images: torch.Tensor, mean: Sequence[float] | float, std: Sequence[float] | float
) -> torch.Tensor:
    """Scale pixel values to [0, 1] and standardise each channel.

    Args:
        images: ``(N, C, H, W)`` batch in 0..255 pixel units (normally uint8).
        mean: Per-channel mean in [0, 1] units (one value, or one per channel).
        std: Per-channel standard deviation in [0, 1] units.

    Returns:
        float32 tensor ``(images / 255 - mean) / std``.
    """
    _check_batch(images, "normalize")
    channels = images.shape[1]
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).reshape(-1)
    for name, v in (("mean", m), ("std", s)):
        if v.numel() not in (1, channels):
            raise ValueError(f"normalize: {name} has {v.numel()} values for {channels} channels")
    if bool((s <= 0).any()):
        raise ValueError("normalize: std values must be positive")
    x = images.to(torch.float32).div_(255.0)
    return x.sub_(m.view(1, -1, 1, 1)).div_(s.view(1, -1, 1, 1))


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels and crop it back at a random offset.

    Apply it to uint8 (or un-normalised) images so that the padding is black.

    Args:
        x: ``(N, C, H, W)`` batch.
        padding: Pixels of zero padding on every side; 0 returns ``x`` unchanged.
        generator: CPU generator the per-sample offsets are drawn from.

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    _check_batch(x, "random_crop")
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, got {padding}")
    if padding == 0 or x.shape[0] == 0:
        return x
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``.

    Args:
        x: ``(N, C, H, W)`` batch.
        generator: CPU generator the per-sample coin flips are drawn from.
        p: Flip probability in [0, 1].

    Returns:
        Tensor of ``x``'s shape and dtype.
    """
    _check_batch(x, "random_hflip")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_hflip: p must lie in [0, 1], got {p}")
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
