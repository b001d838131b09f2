"""Small helpers shared by the method tests."""

from __future__ import annotations

import torch
from torch import nn

import cnnpress

__all__ = ["rel_err", "resnet"]


def resnet(seed: int = 0) -> nn.Module:
    """A width-8 ResNet-20 with trained-looking BatchNorm so comparisons are not trivial."""
    torch.manual_seed(seed)
    net = cnnpress.models.create("resnet20", 1, 10, width=8)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return net


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``a``."""
    return ((a - b).abs().max() / a.abs().max()).item()
